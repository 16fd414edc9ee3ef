//! `dinoflow-trainer distill`: a DistillJob manifest -> frozen teacher + student components ->
//! the pretraining loop (`train_with`), with the same output directory, checkpoints,
//! resume, evaluation and exit-code contract as `train`.
use std::path::Path;
use std::sync::Arc;

use dinoflow_api::TrainingConfig;
use dinoflow_api::distill::{CheckpointFormat, TeacherCheckpoint, TeacherSource};

use super::teacher::torch_home;
use super::{
    DistillData, DistillError, DistillModel, DistillSettings, FrozenTeacher, load_teacher,
};
use crate::cli::TrainArgs;
use crate::config;
use crate::dist::Collective;
use crate::launch::env::JobKind;
use crate::meta_arch::MetaArchConfig;
use crate::optim;
use crate::train_loop::Outcome;
use crate::train_loop::run::{Components, TrainError, build_components, local_device, train_with};

/// Where the operator also passes the resolved teacher checkpoint of `teacher.pretrainJob`.
const TEACHER_CHECKPOINT_ENV: &str = "DINOFLOW_TEACHER_CHECKPOINT";

fn permanent(e: DistillError) -> TrainError {
    TrainError::Permanent(e.to_string())
}

/// Loads the DistillJob named by `args` and runs it.
pub fn distill(args: &TrainArgs) -> Result<Outcome, TrainError> {
    let resolved = dinoflow_api::load_training_config(&args.config)?;
    let (Some(mut teacher), Some(recipe)) = (resolved.teacher, resolved.distillation) else {
        return Err(TrainError::Permanent(format!(
            "{}: kind: expected a DistillJob manifest (apiVersion dinoflow.dev/v1alpha1, kind \
             DistillJob, spec.teacher naming the frozen teacher); run pretraining configs with \
             `dinoflow-trainer train`",
            args.config.display()
        )));
    };
    if teacher.checkpoint.is_none()
        && let Some(path) = std::env::var(TEACHER_CHECKPOINT_ENV)
            .ok()
            .filter(|p| !p.is_empty())
    {
        teacher.checkpoint = Some(TeacherCheckpoint {
            path,
            format: CheckpointFormat::Dinoflow,
        });
    }
    let settings = DistillSettings::from(&recipe);
    // Bad flags are refused before any output is written.
    settings
        .check(resolved.training.ibot.loss_weight > 0.0)
        .map_err(permanent)?;
    train_with(args, JobKind::Distill, |training, out, collective| {
        build(training, out, collective, &teacher, &settings)
    })
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
    out: &Path,
    collective: &Arc<dyn Collective>,
    teacher: &TeacherSource,
    settings: &DistillSettings,
) -> Result<Components<DistillModel, DistillData, optim::Schedules>, TrainError> {
    let student = student_config(training, settings);
    let arch =
        config::meta_arch_config(&student).map_err(|e| TrainError::Permanent(e.to_string()))?;
    settings.check(arch.do_ibot()).map_err(permanent)?;
    let frozen = load_teacher(teacher, local_device(), &torch_home()).map_err(permanent)?;
    check_heads(&frozen, &arch).map_err(permanent)?;
    tracing::info!(
        format = %frozen.identity.format,
        path = %frozen.identity.path.display(),
        sha256 = %frozen.identity.sha256,
        "frozen teacher loaded"
    );
    let c = build_components(&student, out, collective)?;
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
