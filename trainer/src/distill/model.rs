//! The distillation [`Trainable`]: the pretraining meta-architecture for the student (its
//! `teacher` network serving as the student EMA) plus the frozen teacher that gives the
//! targets.
use std::collections::BTreeMap;

use tch::{Kind, Tensor};

use super::{DistillSettings, FrozenTeacher};
use crate::eval::EvalInputs;
use crate::meta_arch::{StepLosses, TargetSource};
use crate::model::DinoVisionTransformer;
use crate::train_loop::components::{Model, TrainBatch};
use crate::train_loop::{LossTerms, ScheduleValues, StepError, Trainable};

/// Checkpoint group of the student EMA (the final model).
pub const STUDENT_EMA: &str = "student_ema";
/// Guarded-field key of the frozen teacher's identity.
pub const TEACHER_GUARD: &str = "spec.teacher";
/// Guarded-field key of the recipe flags.
pub const RECIPE_GUARD: &str = "spec.distillation";

/// Student (with optimiser, centers, loss scaler and evaluation inputs, as in pretraining),
/// frozen teacher and recipe.
#[derive(Debug)]
pub struct DistillModel {
    /// `base.arch.student` is trained; `base.arch.teacher` is the student EMA.
    pub base: Model,
    pub teacher: FrozenTeacher,
    pub settings: DistillSettings,
}

impl DistillModel {
    /// The network evaluated and exported: the student EMA, or the student without one.
    pub fn final_backbone(&self) -> &DinoVisionTransformer {
        if self.settings.student_ema {
            &self.base.arch.teacher.backbone
        } else {
            &self.base.arch.student.backbone
        }
    }
}

impl Trainable for DistillModel {
    type Batch = TrainBatch;
    type Losses = StepLosses;

    /// Targets from the frozen teacher; the student EMA follows the student inside the step
    /// (after the optimiser, as in pretraining); the frozen teacher never changes.
    fn state_bytes(&self) -> Option<crate::parallel::MemoryBytes> {
        Some(self.base.arch.memory_bytes())
    }

    fn train_step(
        &mut self,
        batch: &TrainBatch,
        v: &ScheduleValues,
    ) -> Result<StepLosses, StepError> {
        let targets = TargetSource::Frozen {
            teacher: &self.teacher.net,
            student_ema_momentum: self.settings.ema_momentum(v.momentum),
        };
        self.base.step(batch, v, targets)
    }

    fn read_losses(&self, losses: &StepLosses) -> LossTerms {
        self.base.read(losses)
    }

    fn step_phases(&self) -> Option<crate::meta_arch::StepPhases> {
        self.base.arch.last_step_phases
    }

    /// The student (and its EMA) start like a pretraining student: `model.pretrainedWeights`
    /// or `model.weights` of the job's `training`.
    fn start_fresh(&mut self) -> Result<(), StepError> {
        self.base.start_fresh()
    }

    /// Student, student EMA (when kept), optimiser and centers; the frozen teacher is not
    /// stored (it is re-read from its source, whose checksum the guarded fields carry).
    fn state(&self) -> BTreeMap<String, Vec<(String, Tensor)>> {
        let mut state = self.base.state();
        let ema = state.remove("teacher");
        if let (true, Some(ema)) = (self.settings.student_ema, ema) {
            state.insert(STUDENT_EMA.into(), ema);
        }
        state
    }

    fn load_state(
        &mut self,
        mut state: BTreeMap<String, Vec<(String, Tensor)>>,
    ) -> Result<(), StepError> {
        let ema = match state.remove(STUDENT_EMA) {
            Some(ema) => ema,
            // Without an EMA the network is unused: keep what it holds.
            None if !self.settings.student_ema => self
                .base
                .arch
                .teacher
                .vs
                .variables()
                .into_iter()
                .map(|(k, t)| (k, t.detach().copy()))
                .collect(),
            None => {
                return Err(StepError(format!(
                    "the checkpoint has no {STUDENT_EMA} tensors (it was written with \
                     spec.distillation.studentEma false, or by a pretraining run)"
                )));
            }
        };
        state.insert("teacher".into(), ema);
        self.base.load_state(state)
    }

    fn json_state(&self) -> serde_json::Value {
        let mut state = self.base.json_state();
        state["teacher"] = serde_json::to_value(&self.teacher.identity).unwrap_or_default();
        state
    }

    fn load_json_state(&mut self, state: &serde_json::Value) -> Result<(), StepError> {
        self.base.load_json_state(state)
    }

    fn guarded(&self) -> BTreeMap<String, String> {
        let s = &self.settings;
        let recipe = serde_json::json!({
            "studentEma": s.student_ema,
            "studentEmaMomentum": s.student_ema_momentum,
            "masking": s.masking,
            "dropPath": s.drop_path,
            "ibotOnGlobalCrops": s.ibot_on_global_crops,
        });
        BTreeMap::from([
            (
                TEACHER_GUARD.to_string(),
                format!("sha256:{}", self.teacher.identity.sha256),
            ),
            (RECIPE_GUARD.to_string(), recipe.to_string()),
        ])
    }

    /// The student EMA (the student without one).
    fn final_backbone(&self) -> Option<&DinoVisionTransformer> {
        Some(DistillModel::final_backbone(self))
    }

    fn eval_inputs(&self) -> Option<(&EvalInputs, Kind)> {
        self.base.eval_inputs()
    }
}

#[cfg(test)]
mod tests {
    use tch::Device;

    use super::*;
    use crate::dist::Single;
    use crate::distill::load_teacher;
    use crate::distill::run::student_config;
    use crate::distill::test_support::{tiny_batch, tiny_training, write_pretrain_checkpoint};
    use crate::meta_arch::MetaArch;
    use crate::train_loop::components::TrainBatch;
    use dinoflow_api::distill::{CheckpointFormat, TeacherCheckpoint, TeacherSource};

    /// A 32-wide teacher from a checkpoint and a 16-wide student with the same prototypes.
    fn distill_model(dir: &std::path::Path, settings: DistillSettings) -> DistillModel {
        distill_model_with(dir, settings, |_| {})
    }

    /// [`distill_model`] with the student's config edited by `edit`.
    fn distill_model_with(
        dir: &std::path::Path,
        settings: DistillSettings,
        edit: impl FnOnce(&mut dinoflow_api::TrainingConfig),
    ) -> DistillModel {
        let (ckpt, _) = write_pretrain_checkpoint(dir, &tiny_training(32, 24));
        let src = TeacherSource {
            pretrain_job: None,
            checkpoint: Some(TeacherCheckpoint {
                path: ckpt.display().to_string(),
                format: CheckpointFormat::Dinoflow,
            }),
            model: None,
        };
        let teacher = load_teacher(&src, Device::Cpu, dir).unwrap();
        let mut student = student_config(&tiny_training(16, 24), &settings);
        edit(&mut student);
        tch::manual_seed(1);
        let arch = MetaArch::new(
            crate::config::meta_arch_config(&student).unwrap(),
            Device::Cpu,
        )
        .unwrap();
        DistillModel {
            base: Model {
                arch,
                seed: 7,
                rank: 0,
                collective: Box::new(Single),
                eval: None,
                init: None,
            },
            teacher,
            settings,
        }
    }

    fn values(momentum: f64) -> ScheduleValues {
        ScheduleValues {
            lr: 1e-3,
            wd: 0.04,
            momentum,
            teacher_temp: 0.04,
            last_layer_lr: 1e-3,
        }
    }

    /// One step, its losses read as the loop reads them.
    fn step(m: &mut DistillModel, batch: &TrainBatch, v: &ScheduleValues) -> LossTerms {
        let pending = m.train_step(batch, v).unwrap();
        m.read_losses(&pending)
    }

    fn batch(iteration: u64, settings: &DistillSettings) -> TrainBatch {
        TrainBatch {
            iteration,
            ssl: crate::distill::data::apply_flags(tiny_batch(), settings),
        }
    }

    fn snapshot(vs: &tch::nn::VarStore) -> BTreeMap<String, Tensor> {
        vs.variables()
            .into_iter()
            .map(|(k, v)| (k, v.detach().copy()))
            .collect()
    }

    #[test]
    fn the_frozen_teacher_is_bitwise_unchanged_while_the_student_learns() {
        let dir = tempfile::tempdir().unwrap();
        let settings = DistillSettings::default();
        let mut m = distill_model(dir.path(), settings.clone());
        let teacher_before = snapshot(&m.teacher.net.vs);
        let student_before = snapshot(&m.base.arch.student.vs);
        for it in 0..3 {
            let terms = step(&mut m, &batch(it, &settings), &values(0.9));
            let get = |n: &str| terms.iter().find(|(k, _)| k == n).map(|(_, v)| *v);
            assert!(get("total_loss").is_some_and(f64::is_finite), "{terms:?}");
            assert!(get("ibot_loss").is_some_and(f64::is_finite), "{terms:?}");
        }
        for (k, v) in m.teacher.net.vs.variables() {
            let same: bool = v.eq_tensor(&teacher_before[&k]).all().int64_value(&[]) == 1;
            assert!(same, "frozen teacher {k} changed");
        }
        let moved = m.base.arch.student.vs.variables()["backbone.blocks.0.attn.qkv.weight"]
            .equal(&student_before["backbone.blocks.0.attn.qkv.weight"]);
        assert!(!moved, "the student did not learn");
    }

    #[test]
    fn sinkhorn_knopp_targets_from_the_frozen_teacher_train_a_separate_ibot_head() {
        let dir = tempfile::tempdir().unwrap();
        let settings = DistillSettings::default();
        let mut m = distill_model_with(dir.path(), settings.clone(), |t| {
            t.loss.centering = dinoflow_api::training::Centering::SinkhornKnopp;
            t.ibot.separate_head = true;
        });
        assert!(m.base.arch.student.ibot_head.is_some());
        let teacher_before = snapshot(&m.teacher.net.vs);
        let ibot_before = snapshot(&m.base.arch.student.vs)["ibot_head.mlp.0.weight"].copy();
        let terms = step(&mut m, &batch(0, &settings), &values(0.9));
        assert!(terms.iter().all(|(_, v)| v.is_finite()), "{terms:?}");
        assert!(terms.iter().any(|(k, _)| k == "ibot_loss"), "{terms:?}");
        let ibot_after = &m.base.arch.student.vs.variables()["ibot_head.mlp.0.weight"];
        assert!(
            !ibot_after.equal(&ibot_before),
            "the student's iBOT head did not learn"
        );
        for (k, v) in m.teacher.net.vs.variables() {
            assert!(v.equal(&teacher_before[&k]), "frozen teacher {k} changed");
        }
    }

    #[test]
    fn the_student_ema_moves_by_the_scheduled_momentum_or_a_fixed_one() {
        for fixed in [None, Some(0.5)] {
            let dir = tempfile::tempdir().unwrap();
            let settings = DistillSettings {
                student_ema_momentum: fixed,
                ..DistillSettings::default()
            };
            let mut m = distill_model(dir.path(), settings.clone());
            let ema_before = snapshot(&m.base.arch.teacher.vs);
            m.train_step(&batch(0, &settings), &values(0.9)).unwrap();
            let momentum = fixed.unwrap_or(0.9);
            let student = m.base.arch.student.vs.variables();
            for (k, ema) in m.base.arch.teacher.vs.variables() {
                let expected = &ema_before[&k] * momentum + &student[&k] * (1.0 - momentum);
                assert!(
                    ema.allclose(&expected, 1e-6, 1e-7, false),
                    "{k}: EMA is not m·ema + (1−m)·student with m = {momentum}"
                );
            }
        }
    }

    #[test]
    fn without_student_ema_the_student_is_the_final_model_and_no_ema_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        let settings = DistillSettings {
            student_ema: false,
            ..DistillSettings::default()
        };
        let mut m = distill_model(dir.path(), settings.clone());
        let ema_before = snapshot(&m.base.arch.teacher.vs);
        m.train_step(&batch(0, &settings), &values(0.9)).unwrap();
        for (k, v) in m.base.arch.teacher.vs.variables() {
            assert!(v.equal(&ema_before[&k]), "{k} moved without an EMA");
        }
        let state = m.state();
        assert!(!state.contains_key(STUDENT_EMA) && !state.contains_key("teacher"));
        assert!(std::ptr::eq(
            m.final_backbone(),
            &m.base.arch.student.backbone
        ));
        m.load_state(state).unwrap();
    }

    #[test]
    fn state_round_trips_through_the_student_ema_group_and_guards_the_teacher() {
        let dir = tempfile::tempdir().unwrap();
        let settings = DistillSettings::default();
        let mut a = distill_model(dir.path(), settings.clone());
        a.train_step(&batch(0, &settings), &values(0.9)).unwrap();
        let state = a.state();
        assert!(state.contains_key(STUDENT_EMA) && !state.contains_key("teacher"));
        let dir2 = tempfile::tempdir().unwrap();
        let mut b = distill_model(dir2.path(), settings.clone());
        b.load_state(a.state()).unwrap();
        // Bitwise the same state: student, EMA, optimiser moments and steps, centers.
        let (sa, sb) = (a.state(), b.state());
        assert_eq!(sa.keys().collect::<Vec<_>>(), sb.keys().collect::<Vec<_>>());
        for (group, tensors) in &sa {
            let other: BTreeMap<&String, &Tensor> = sb[group].iter().map(|(k, t)| (k, t)).collect();
            assert_eq!(tensors.len(), other.len(), "{group}");
            for (name, t) in tensors {
                assert!(
                    t.equal(other[name]),
                    "{group}.{name} differs after load_state"
                );
            }
        }
        let g = a.guarded();
        assert_eq!(
            g[TEACHER_GUARD],
            format!("sha256:{}", a.teacher.identity.sha256)
        );
        assert!(g[RECIPE_GUARD].contains("\"masking\":false"), "{g:?}");
    }

    #[test]
    fn drop_path_false_removes_stochastic_depth_and_true_keeps_it() {
        let training = tiny_training(16, 24);
        let off = student_config(&training, &DistillSettings::default());
        assert_eq!(off.model.drop_path_rate, 0.0);
        let on = student_config(
            &training,
            &DistillSettings {
                drop_path: true,
                ..DistillSettings::default()
            },
        );
        assert_eq!(on.model.drop_path_rate, 0.1);
        // With it removed, two forwards in train mode agree (no random drops).
        let dir = tempfile::tempdir().unwrap();
        let m = distill_model(dir.path(), DistillSettings::default());
        let x = tiny_batch().global_crops;
        let f = |seed| {
            tch::manual_seed(seed);
            m.base
                .arch
                .student
                .backbone
                .forward_features(&x, None, true)
                .unwrap()
                .x_norm_clstoken
        };
        assert!(f(1).equal(&f(2)));
    }
}
