//! `training.dino` and `training.ibot`: the two self-distillation objectives and their heads.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Image-level DINO objective on the class token, and the KoLeo regulariser.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct DinoConfig {
    /// Weight of the DINO loss (official `dino.loss_weight`).
    #[schemars(range(min = 0.0))]
    pub loss_weight: f64,
    /// Prototypes (output width) of the DINO head (official `dino.head_n_prototypes`).
    #[schemars(range(min = 1))]
    pub head_n_prototypes: u32,
    /// Bottleneck width before the weight-normalised last layer (official
    /// `dino.head_bottleneck_dim`).
    #[schemars(range(min = 1))]
    pub head_bottleneck_dim: u32,
    /// Number of linear layers of the head MLP (official `dino.head_nlayers`).
    #[schemars(range(min = 1))]
    pub head_nlayers: u32,
    /// Hidden width of the head MLP (official `dino.head_hidden_dim`).
    #[schemars(range(min = 1))]
    pub head_hidden_dim: u32,
    /// Weight of the KoLeo regulariser on the student's class tokens (official
    /// `dino.koleo_loss_weight`); 0 disables it.
    #[schemars(range(min = 0.0))]
    pub koleo_loss_weight: f64,
}

impl Default for DinoConfig {
    fn default() -> Self {
        Self {
            loss_weight: 1.0,
            head_n_prototypes: 65536,
            head_bottleneck_dim: 256,
            head_nlayers: 3,
            head_hidden_dim: 2048,
            koleo_loss_weight: 0.1,
        }
    }
}

/// Patch-level iBOT objective on masked patch tokens.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct IbotConfig {
    /// Weight of the iBOT loss (official `ibot.loss_weight`); 0 disables masking.
    #[schemars(range(min = 0.0))]
    pub loss_weight: f64,
    /// Probability that a global crop in the batch gets masked at all (official
    /// `ibot.mask_sample_probability`), in [0, 1].
    #[schemars(range(min = 0.0, max = 1.0))]
    pub mask_sample_probability: f64,
    /// `[min, max]` fraction of patches masked in a masked crop (official
    /// `ibot.mask_ratio_min_max`), 0 <= min <= max <= 1.
    #[schemars(length(min = 2, max = 2))]
    pub mask_ratio_min_max: [f64; 2],
    /// Give iBOT its own head; `false` shares the DINO head and ignores the `head*` fields below
    /// (official `ibot.separate_head`).
    pub separate_head: bool,
    /// Prototypes of the separate iBOT head (official `ibot.head_n_prototypes`).
    #[schemars(range(min = 1))]
    pub head_n_prototypes: u32,
    /// Bottleneck width of the separate iBOT head (official `ibot.head_bottleneck_dim`).
    #[schemars(range(min = 1))]
    pub head_bottleneck_dim: u32,
    /// Linear layers of the separate iBOT head (official `ibot.head_nlayers`).
    #[schemars(range(min = 1))]
    pub head_nlayers: u32,
    /// Hidden width of the separate iBOT head (official `ibot.head_hidden_dim`).
    #[schemars(range(min = 1))]
    pub head_hidden_dim: u32,
}

impl Default for IbotConfig {
    fn default() -> Self {
        Self {
            loss_weight: 1.0,
            mask_sample_probability: 0.5,
            mask_ratio_min_max: [0.1, 0.5],
            separate_head: false,
            head_n_prototypes: 65536,
            head_bottleneck_dim: 256,
            head_nlayers: 3,
            head_hidden_dim: 2048,
        }
    }
}
