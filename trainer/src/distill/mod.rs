//! Distillation from a frozen teacher (`DistillJob`, `dinoflow-trainer distill`), the recipe of
//! the DINOv2 paper's "Distillation of smaller models": the pretraining loop and losses, with
//! the targets (centered or Sinkhorn-Knopp, teacher temperature schedule) computed by a larger,
//! frozen teacher (backbone and DINO/iBOT heads, never updated), a spare EMA of the student
//! kept as the final model, masking and stochastic depth removed and the iBOT loss applied
//! on all patch tokens of the two global crops (each flag of `spec.distillation` can turn its
//! part back).
use dinoflow_api::distill::DistillationConfig;

pub mod data;
pub mod model;
pub mod run;
pub mod teacher;
#[cfg(test)]
mod test_support;

pub use data::DistillData;
pub use model::DistillModel;
pub use teacher::{FrozenTeacher, TeacherIdentity, load_teacher};

/// A distillation setting that cannot work, at the YAML field to fix.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {message}")]
pub struct DistillError {
    pub field: &'static str,
    pub message: String,
}

/// `spec.distillation`, as the trainer uses it.
#[derive(Debug, Clone, PartialEq)]
pub struct DistillSettings {
    /// Keep an EMA of the student; it is evaluated and is the final model.
    pub student_ema: bool,
    /// Constant EMA momentum; None follows the teacher momentum schedule.
    pub student_ema_momentum: Option<f64>,
    /// Keep iBOT masking of the student's global crops.
    pub masking: bool,
    /// Keep the student's stochastic depth (`training.model.dropPathRate`).
    pub drop_path: bool,
    /// iBOT loss on all patch tokens of the two global crops.
    pub ibot_on_global_crops: bool,
}

impl From<&DistillationConfig> for DistillSettings {
    fn from(c: &DistillationConfig) -> Self {
        Self {
            student_ema: c.student_ema,
            student_ema_momentum: c.student_ema_momentum,
            masking: c.masking,
            drop_path: c.drop_path,
            ibot_on_global_crops: c.ibot_on_global_crops,
        }
    }
}

impl Default for DistillSettings {
    /// The paper's recipe (the CRD's defaults).
    fn default() -> Self {
        Self::from(&DistillationConfig::default())
    }
}

impl DistillSettings {
    /// Refuses combinations that cannot train; `do_ibot` is whether the student's iBOT loss
    /// is on (`training.ibot.lossWeight > 0`).
    pub fn check(&self, do_ibot: bool) -> Result<(), DistillError> {
        if let Some(m) = self.student_ema_momentum
            && !(m.is_finite() && (0.0..=1.0).contains(&m))
        {
            return Err(DistillError {
                field: "spec.distillation.studentEmaMomentum",
                message: format!(
                    "must be in [0, 1], got {m}; remove it to follow the teacher momentum schedule"
                ),
            });
        }
        if do_ibot && !self.masking && !self.ibot_on_global_crops {
            return Err(DistillError {
                field: "spec.distillation.ibotOnGlobalCrops",
                message: "with masking false the iBOT loss has no masked tokens to score; set \
                          ibotOnGlobalCrops: true (the paper's recipe), masking: true, or turn \
                          iBOT off with training.ibot.lossWeight: 0"
                    .into(),
            });
        }
        Ok(())
    }

    /// The student EMA's momentum at a step whose teacher momentum is `scheduled`; None when
    /// no EMA is kept.
    pub fn ema_momentum(&self, scheduled: f64) -> Option<f64> {
        self.student_ema
            .then(|| self.student_ema_momentum.unwrap_or(scheduled))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_paper_recipe() {
        let s = DistillSettings::default();
        assert!(s.student_ema && !s.masking && !s.drop_path && s.ibot_on_global_crops);
        assert_eq!(s.student_ema_momentum, None);
        s.check(true).unwrap();
    }

    #[test]
    fn the_ema_momentum_follows_the_schedule_unless_fixed_and_is_none_without_ema() {
        let s = DistillSettings::default();
        assert_eq!(s.ema_momentum(0.994), Some(0.994));
        let fixed = DistillSettings {
            student_ema_momentum: Some(0.999),
            ..s.clone()
        };
        assert_eq!(fixed.ema_momentum(0.994), Some(0.999));
        let off = DistillSettings {
            student_ema: false,
            ..s
        };
        assert_eq!(off.ema_momentum(0.994), None);
    }

    #[test]
    fn ibot_without_masking_or_global_crops_is_refused_naming_the_flag() {
        let s = DistillSettings {
            masking: false,
            ibot_on_global_crops: false,
            ..DistillSettings::default()
        };
        let err = s.check(true).unwrap_err().to_string();
        assert!(
            err.starts_with("spec.distillation.ibotOnGlobalCrops:"),
            "{err}"
        );
        s.check(false).unwrap();
        let bad = DistillSettings {
            student_ema_momentum: Some(1.5),
            ..DistillSettings::default()
        };
        assert!(
            bad.check(true)
                .unwrap_err()
                .to_string()
                .contains("studentEmaMomentum")
        );
    }
}
