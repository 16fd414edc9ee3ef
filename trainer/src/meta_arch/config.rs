//! The meta-architecture's settings and their validation.

use super::MetaArchError;
use crate::loss::CenteringMode;
use crate::model::{DinoHeadConfig, VitConfig};
use crate::optim::{AdamWConfig, ParamGroupConfig};
use crate::parallel::ParallelConfig;
use crate::precision::{LossScalerConfig, Precision};

/// Everything the meta-architecture needs (official `student`, `dino`, `ibot`, `train`,
/// `crops` and `optim` keys).
#[derive(Debug, Clone, PartialEq)]
pub struct MetaArchConfig {
    /// Student backbone (the teacher is the same without stochastic depth).
    pub student: VitConfig,
    /// DINO head (`dino.head_*`); `in_dim` must be the backbone width.
    pub dino_head: DinoHeadConfig,
    /// `Some` = separate iBOT head (`ibot.separate_head`), `None` = shared with DINO.
    pub ibot_head: Option<DinoHeadConfig>,
    /// `dino.loss_weight` (1.0); 0 turns the DINO loss off.
    pub dino_loss_weight: f64,
    /// `dino.koleo_loss_weight` (0.1).
    pub koleo_loss_weight: f64,
    /// `ibot.loss_weight` (1.0); 0 turns iBOT off.
    pub ibot_loss_weight: f64,
    /// `train.centering`.
    pub centering: CenteringMode,
    /// `crops.local_crops_number` (8).
    pub n_local_crops: i64,
    /// `optim.clip_grad` (3.0); 0 disables clipping.
    pub clip_grad: f64,
    /// Student softmax temperature (0.1) and center momentum (0.9) of both losses.
    pub student_temp: f64,
    pub center_momentum: f64,
    /// `loss.sinkhornKnoppIterations` (official `n_iterations=3`), in `sinkhorn_knopp` mode.
    pub sinkhorn_iterations: usize,
    pub param_groups: ParamGroupConfig,
    pub adamw: AdamWConfig,
    /// `precision.lossScale`: the fp16 loss scaler's settings (used only in fp16).
    pub loss_scaler: LossScalerConfig,
    pub precision: Precision,
    /// `precision.gradScaler`: dynamic loss scaling in every precision (the official
    /// `ShardedGradScaler` when `compute_precision.grad_scaler`); fp16 always scales.
    pub grad_scaler: bool,
    /// Sharding, reduce dtypes and flat-unit granularity of the student
    /// (`training.sharding.student`, the student `reduceDtype`s, `model.blockChunks`).
    pub parallel: ParallelConfig,
}

impl MetaArchConfig {
    /// The official default config for a given backbone (heads 65536/2048/256, shared iBOT head).
    pub fn official(student: VitConfig) -> Self {
        let head = DinoHeadConfig::official(student.embed_dim);
        Self {
            student,
            dino_head: head,
            ibot_head: None,
            dino_loss_weight: 1.0,
            koleo_loss_weight: 0.1,
            ibot_loss_weight: 1.0,
            centering: CenteringMode::Centering,
            n_local_crops: 8,
            clip_grad: 3.0,
            student_temp: 0.1,
            sinkhorn_iterations: crate::loss::centering::SINKHORN_ITERATIONS,
            center_momentum: 0.9,
            param_groups: ParamGroupConfig::default(),
            adamw: AdamWConfig::default(),
            loss_scaler: LossScalerConfig::default(),
            precision: Precision::Fp32,
            grad_scaler: false,
            parallel: ParallelConfig::default(),
        }
    }

    pub(super) fn validate(&self) -> Result<(), MetaArchError> {
        let bad = |field, message: String| Err(MetaArchError::InvalidConfig { field, message });
        if self.dino_head.in_dim != self.student.embed_dim {
            return bad(
                "dino.head",
                format!(
                    "in_dim {} must equal embed_dim {}",
                    self.dino_head.in_dim, self.student.embed_dim
                ),
            );
        }
        if let Some(h) = &self.ibot_head
            && h.in_dim != self.student.embed_dim
        {
            return bad(
                "ibot.head",
                format!(
                    "in_dim {} must equal embed_dim {}",
                    h.in_dim, self.student.embed_dim
                ),
            );
        }
        let chunks = i64::from(self.parallel.block_chunks);
        if chunks > self.student.depth {
            return bad(
                "model.blockChunks",
                format!(
                    "{chunks} chunks of a {}-block backbone leave empty chunks; use at most the depth (or 0)",
                    self.student.depth
                ),
            );
        }
        if self.n_local_crops < 0 {
            return bad(
                "crops.local_crops_number",
                format!("must be >= 0, got {}", self.n_local_crops),
            );
        }
        for (field, v) in [
            ("dino.loss_weight", self.dino_loss_weight),
            ("dino.koleo_loss_weight", self.koleo_loss_weight),
            ("ibot.loss_weight", self.ibot_loss_weight),
            ("optim.clip_grad", self.clip_grad),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return bad(field, format!("must be a finite number >= 0, got {v}"));
            }
        }
        Ok(())
    }

    pub fn do_dino(&self) -> bool {
        self.dino_loss_weight > 0.0
    }
    pub fn do_koleo(&self) -> bool {
        self.koleo_loss_weight > 0.0
    }
    pub fn do_ibot(&self) -> bool {
        self.ibot_loss_weight > 0.0
    }
}
