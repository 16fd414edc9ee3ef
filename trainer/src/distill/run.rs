//! Distillation wiring: a DistillJob's frozen teacher + the pretraining components for the
//! student, as the components [`crate::job::run`] trains (same output directory, checkpoints,
//! resume and evaluation as pretraining). `dinoflow-trainer distill` reads the manifest and
//! calls [`build`].
use dinoflow_api::TrainingConfig;
use dinoflow_api::distill::TeacherSource;

use super::teacher::torch_home;
use super::{
    DistillData, DistillError, DistillModel, DistillSettings, FrozenTeacher, load_teacher,
};
use crate::config::{self, MappingError};
use crate::curriculum::PhasedSchedules;
use crate::dist::World;
use crate::meta_arch::MetaArchConfig;
use crate::pretrain::{self, build_components};
use crate::train_loop::{Components, LoopPhase};

/// Why the distillation components could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The student's config.
    #[error(transparent)]
    Mapping(#[from] MappingError),
    /// The recipe, the frozen teacher, or a student that does not fit it.
    #[error(transparent)]
    Distill(#[from] DistillError),
    /// The student's pretraining components.
    #[error(transparent)]
    Student(#[from] pretrain::BuildError),
}

/// The student config the recipe implies: `dropPath: false` removes stochastic depth.
pub fn student_config(training: &TrainingConfig, settings: &DistillSettings) -> TrainingConfig {
    let mut student = training.clone();
    if !settings.drop_path {
        student.model.drop_path_rate = 0.0;
    }
    student
}

/// The distillation components: frozen teacher first (a bad one fails before the dataset is
/// opened), then the pretraining components for the student, wrapped.
pub fn build(
    training: &TrainingConfig,
    world: &World,
    teacher: &TeacherSource,
    settings: &DistillSettings,
) -> Result<Components<DistillModel, DistillData, PhasedSchedules>, BuildError> {
    let student = student_config(training, settings);
    let arch = config::meta_arch_config(&student)?;
    settings.check(arch.do_ibot())?;
    let frozen = load_teacher(teacher, world.device(), &torch_home())?;
    check_heads(&frozen, &arch)?;
    tracing::info!(
        format = %frozen.identity.format,
        path = %frozen.identity.path.display(),
        sha256 = %frozen.identity.sha256,
        "frozen teacher loaded"
    );
    let c = build_components(&student, world)?;
    Ok(Components {
        model: DistillModel {
            base: c.model,
            teacher: frozen,
            settings: settings.clone(),
        },
        data: DistillData {
            inner: c.data,
            settings: settings.clone(),
        },
        schedules: c.schedules,
        // The estimate counts the student's step only; the teacher's forward would make
        // an MFU from it wrong, so none is reported.
        flops_per_image: None,
        num_classes: c.num_classes,
        phases: c
            .phases
            .into_iter()
            .map(|p| LoopPhase {
                flops_per_image: None,
                ..p
            })
            .collect(),
    })
}

/// The student's heads must score the teacher's prototypes (same counts), and iBOT pairs
/// student and teacher patch tokens one to one (same patch size).
pub fn check_heads(teacher: &FrozenTeacher, arch: &MetaArchConfig) -> Result<(), DistillError> {
    let t_dino = teacher.net.dino_head.config.out_dim;
    if arch.dino_head.out_dim != t_dino {
        return Err(DistillError {
            field: "spec.training.dino.headNPrototypes",
            message: format!(
                "the student's DINO head has {} prototypes, the teacher's {t_dino}; set it to \
                 {t_dino}",
                arch.dino_head.out_dim
            ),
        });
    }
    if !arch.do_ibot() {
        return Ok(());
    }
    let t_patch = teacher.net.patch_head().config.out_dim;
    let (s_patch, field) = match &arch.ibot_head {
        Some(h) => (h.out_dim, "spec.training.ibot.headNPrototypes"),
        None => (arch.dino_head.out_dim, "spec.training.ibot.separateHead"),
    };
    if s_patch != t_patch {
        let teacher_head = if teacher.net.ibot_head.is_some() {
            "separate iBOT head"
        } else {
            "shared DINO/iBOT head"
        };
        return Err(DistillError {
            field,
            message: format!(
                "the student scores patch tokens on {s_patch} prototypes, the teacher's \
                 {teacher_head} on {t_patch}; give the student an iBOT head with {t_patch} \
                 prototypes (ibot.separateHead and ibot.headNPrototypes as the teacher's)"
            ),
        });
    }
    if teacher.patch_size != arch.student.patch_size {
        return Err(DistillError {
            field: "spec.training.model.patchSize",
            message: format!(
                "is {}, the teacher's {}: the iBOT loss pairs student and teacher patch tokens \
                 one to one; set it to {} or turn iBOT off with training.ibot.lossWeight: 0",
                arch.student.patch_size, teacher.patch_size, teacher.patch_size
            ),
        });
    }
    Ok(())
}
