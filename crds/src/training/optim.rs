//! `training.optim`: AdamW, learning-rate and weight-decay schedules, layer-wise decay.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// How `baseLr` is scaled by the global batch size (official `optim.scaling_rule`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ScalingRule {
    /// `lr = baseLr * sqrt(global_batch / 1024)` (the only rule of the official code).
    #[serde(rename = "sqrt_wrt_1024")]
    SqrtWrt1024,
    /// `lr = baseLr`, whatever the batch size.
    None,
}

/// Optimiser and schedules. Epochs are "official epochs" of `train.officialEpochLength`
/// iterations each, as in the official code.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct OptimConfig {
    /// Length of training in official epochs (official `optim.epochs`).
    #[schemars(range(min = 1))]
    pub epochs: u32,
    /// Weight decay at iteration 0 (official `optim.weight_decay`); cosine schedule to
    /// `weightDecayEnd`.
    #[schemars(range(min = 0.0))]
    pub weight_decay: f64,
    /// Weight decay at the last iteration (official `optim.weight_decay_end`).
    #[schemars(range(min = 0.0))]
    pub weight_decay_end: f64,
    /// Peak learning rate for a global batch of 1024 (official `optim.base_lr`), > 0.
    pub base_lr: f64,
    /// Peak learning rate actually used (official `optim.lr`, "set after applying the scaling
    /// rule"): 0 derives it from `baseLr` and `scalingRule`; a positive value is used as is.
    #[schemars(range(min = 0.0))]
    pub lr: f64,
    /// Linear warm-up length in official epochs (official `optim.warmup_epochs`); at most
    /// `epochs`.
    pub warmup_epochs: u32,
    /// Final learning rate of the cosine schedule (official `optim.min_lr`); at most `baseLr`.
    #[schemars(range(min = 0.0))]
    pub min_lr: f64,
    /// Gradient-norm clipping threshold per module (official `optim.clip_grad`); 0 disables.
    #[schemars(range(min = 0.0))]
    pub clip_grad: f64,
    /// Epochs during which the heads' last layer is frozen (official
    /// `optim.freeze_last_layer_epochs`); at most `epochs`.
    pub freeze_last_layer_epochs: u32,
    /// Batch-size scaling rule for the learning rate (official `optim.scaling_rule`).
    pub scaling_rule: ScalingRule,
    /// Learning-rate multiplier of the patch embedding (official `optim.patch_embed_lr_mult`).
    #[schemars(range(min = 0.0))]
    pub patch_embed_lr_mult: f64,
    /// Layer-wise learning-rate decay (official `optim.layerwise_decay`), in (0, 1]; 1 disables.
    #[schemars(range(min = 0.0, max = 1.0))]
    pub layerwise_decay: f64,
    /// AdamW beta1 (official `optim.adamw_beta1`), in [0, 1).
    #[schemars(range(min = 0.0, max = 1.0))]
    pub adamw_beta1: f64,
    /// AdamW beta2 (official `optim.adamw_beta2`), in [0, 1).
    #[schemars(range(min = 0.0, max = 1.0))]
    pub adamw_beta2: f64,
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            epochs: 100,
            weight_decay: 0.04,
            weight_decay_end: 0.4,
            base_lr: 0.004,
            lr: 0.0,
            warmup_epochs: 10,
            min_lr: 1.0e-6,
            clip_grad: 3.0,
            freeze_last_layer_epochs: 1,
            scaling_rule: ScalingRule::SqrtWrt1024,
            patch_embed_lr_mult: 0.2,
            layerwise_decay: 0.9,
            adamw_beta1: 0.9,
            adamw_beta2: 0.999,
        }
    }
}

impl OptimConfig {
    /// The peak learning rate for a global batch size: `lr` when set, else `baseLr` scaled by
    /// `scalingRule` (official `apply_scaling_rules_to_cfg`).
    pub fn scaled_lr(&self, global_batch_size: u64) -> f64 {
        if self.lr > 0.0 {
            return self.lr;
        }
        match self.scaling_rule {
            ScalingRule::SqrtWrt1024 => self.base_lr * (global_batch_size as f64 / 1024.0).sqrt(),
            ScalingRule::None => self.base_lr,
        }
    }
}
