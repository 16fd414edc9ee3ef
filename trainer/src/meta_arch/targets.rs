//! Where a step's teacher targets come from: the EMA teacher (pretraining) or a frozen network
//! (distillation), and so which momentum, if any, the EMA network follows the student with.

use tch::Tensor;

use super::{MetaArch, MetaArchError, SslBatch, SslNetwork};
use crate::dist::Collective;

/// The source of the teacher targets of one step.
#[derive(Debug, Clone, Copy)]
pub enum TargetSource<'t> {
    /// Pretraining: [`MetaArch::teacher`] gives the targets and then follows the student with
    /// the scheduled momentum.
    Ema,
    /// Distillation: a frozen network gives the targets. [`MetaArch::teacher`] is then the
    /// student EMA, updated with `student_ema_momentum`, or left as it is when that is None
    /// (no EMA kept).
    Frozen {
        teacher: &'t SslNetwork,
        student_ema_momentum: Option<f64>,
    },
}

impl TargetSource<'_> {
    /// The momentum the EMA network follows the student with after this step, if any.
    pub fn ema_momentum(&self, scheduled: f64) -> Option<f64> {
        match self {
            Self::Ema => Some(scheduled),
            Self::Frozen {
                student_ema_momentum,
                ..
            } => *student_ema_momentum,
        }
    }
}

impl MetaArch {
    /// Teacher targets `(dino [2·B, K] swapped order, ibot [n, K])` from `source`, updating
    /// the centers.
    pub(super) fn teacher_targets(
        &mut self,
        batch: &SslBatch,
        teacher_temp: f64,
        collective: &dyn Collective,
        source: TargetSource<'_>,
    ) -> Result<(Tensor, Option<Tensor>), MetaArchError> {
        let kind = self.config.precision.compute_kind();
        let network = match source {
            TargetSource::Ema => &self.teacher,
            TargetSource::Frozen { teacher, .. } => teacher,
        };
        let out = network.teacher_head_outputs(batch, kind, self.config.do_ibot())?;
        let mode = self.config.centering;
        let dino = tch::no_grad(|| {
            self.dino_loss
                .teacher_targets(mode, &out.cls_after_head, teacher_temp, collective)
        })?;
        let ibot = match (&mut self.ibot_loss, &out.masked_patches_after_head) {
            (Some(loss), Some(t)) => Some(tch::no_grad(|| {
                loss.teacher_targets(mode, t, teacher_temp, batch.n_masked_patches, collective)
            })?),
            _ => None,
        };
        Ok((dino, ibot))
    }
}
