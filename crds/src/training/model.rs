//! `training.model`: the student backbone (official `student` section).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Backbone size, as named by the official `dinov2.models.vision_transformer` factories.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Arch {
    /// ViT-S: embedding 384, depth 12, 6 heads.
    #[serde(rename = "vit_small")]
    VitSmall,
    /// ViT-B: embedding 768, depth 12, 12 heads.
    #[serde(rename = "vit_base")]
    VitBase,
    /// ViT-L: embedding 1024, depth 24, 16 heads.
    #[serde(rename = "vit_large")]
    VitLarge,
    /// ViT-g (the "giant2" variant of the official code): embedding 1536, depth 40, 24 heads.
    #[serde(rename = "vit_giant2")]
    VitGiant2,
    /// Not an official size: `embedDim`, `depth` and `numHeads` must be given
    /// (for smoke tests on a CPU).
    #[serde(rename = "custom")]
    Custom,
}

impl Arch {
    /// (embed_dim, depth, num_heads) of the official sizes; `None` for `custom`.
    pub fn dims(self) -> Option<(u32, u32, u32)> {
        match self {
            Arch::VitSmall => Some((384, 12, 6)),
            Arch::VitBase => Some((768, 12, 12)),
            Arch::VitLarge => Some((1024, 24, 16)),
            Arch::VitGiant2 => Some((1536, 40, 24)),
            Arch::Custom => None,
        }
    }
}

/// Feed-forward block of each transformer layer (official `student.ffn_layer`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum FfnLayer {
    /// Two linear layers with GELU.
    Mlp,
    /// SwiGLU (gated), hidden size 2/3 of the MLP's.
    Swiglu,
    /// SwiGLU with the official fused kernel's hidden size rounding (multiple of 8).
    Swiglufused,
    /// No feed-forward block.
    Identity,
}

/// The student backbone. The teacher is an exponential moving average of it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct ModelConfig {
    /// Backbone size (official `student.arch`).
    pub arch: Arch,
    /// Embedding width; only with `arch: custom`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub embed_dim: Option<u32>,
    /// Number of transformer blocks; only with `arch: custom`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub depth: Option<u32>,
    /// Attention heads per block; only with `arch: custom`, must divide `embedDim`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub num_heads: Option<u32>,
    /// Side of the square patches in pixels (official `student.patch_size`). Crop sizes must be
    /// multiples of it.
    #[schemars(range(min = 1))]
    pub patch_size: u32,
    /// Stochastic depth rate (official `student.drop_path_rate`), in [0, 1).
    #[schemars(range(min = 0.0, max = 1.0))]
    pub drop_path_rate: f64,
    /// Initial value of LayerScale (official `student.layerscale`); 0 disables LayerScale.
    #[schemars(range(min = 0.0))]
    pub layerscale: f64,
    /// Same drop-path rate in every block instead of a linear ramp (official
    /// `student.drop_path_uniform`).
    pub drop_path_uniform: bool,
    /// Backbone weights a run from scratch starts from (official `student.pretrained_weights`):
    /// the student backbone is loaded, the teacher starts as its copy, the heads keep their
    /// random init. An official hub name (`dinov2_vits14` ... `dinov2_vitg14`, `_reg` variants)
    /// is read from `$TORCH_HOME/hub/checkpoints/<name>_pretrain.pth`; otherwise a path to a
    /// release `.pth` (backbone keys), an official training checkpoint (`model_*.pth`,
    /// `teacher_checkpoint.pth`: its teacher backbone), a Dinoflow export (`.safetensors`) or
    /// checkpoint directory (its EMA teacher backbone). Strict: any missing, unexpected or
    /// mis-shaped key fails the start (exit 78) listing them all; only a position embedding of
    /// another grid is resized, with the model's own interpolation, to `crops.globalCropsSize`.
    /// A resumed run continues from its checkpoint and does not read it. Exclusive with
    /// `weights`; empty means random initialisation.
    pub pretrained_weights: String,
    /// Feed-forward block type (official `student.ffn_layer`).
    pub ffn_layer: FfnLayer,
    /// Blocks are grouped into chunks of `depth / blockChunks` consecutive blocks, each one
    /// sharding unit (official `student.block_chunks`: one FSDP unit per `BlockChunk`); 0
    /// means no chunking: the whole backbone is one unit. At most the depth.
    pub block_chunks: u32,
    /// Recompute each block's activations in the backward pass instead of keeping them
    /// (activation checkpointing, to trade compute for memory). Not supported: only `false` is
    /// accepted (the default; the official DINOv2 training has no such option either).
    /// Recomputing inside backward needs custom autograd functions or hooks, which libtorch's
    /// Rust binding (tch) does not expose; memory is saved with `SHARD_GRAD_OP` and fp16/bf16.
    pub activation_checkpointing: bool,
    /// Bias in the attention qkv projection (official `student.qkv_bias`).
    pub qkv_bias: bool,
    /// Bias in the attention output projection (official `student.proj_bias`).
    pub proj_bias: bool,
    /// Bias in the feed-forward layers (official `student.ffn_bias`).
    pub ffn_bias: bool,
    /// Register tokens appended after the class token (official `student.num_register_tokens`).
    pub num_register_tokens: u32,
    /// Antialias when interpolating position embeddings (official `student.interpolate_antialias`).
    pub interpolate_antialias: bool,
    /// Offset added before the position-embedding interpolation scale factor (official
    /// `student.interpolate_offset`).
    #[schemars(range(min = 0.0))]
    pub interpolate_offset: f64,
    /// Whole training checkpoint a run from scratch starts from (official top-level
    /// `MODEL.WEIGHTS` without a checkpoint to resume): student and teacher, backbones and
    /// heads, from an official `model_*.pth`, a Dinoflow checkpoint directory, or an official
    /// `teacher_checkpoint.pth` (teacher only: the student starts from it too). Optimiser state
    /// and iteration are not taken: the schedules start at 0. Strict like `pretrainedWeights`
    /// (position embeddings of another grid are resized). A resumed run does not read it.
    /// Exclusive with `pretrainedWeights`; empty means none.
    pub weights: String,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            arch: Arch::VitLarge,
            embed_dim: None,
            depth: None,
            num_heads: None,
            patch_size: 16,
            drop_path_rate: 0.3,
            layerscale: 1.0e-5,
            drop_path_uniform: true,
            pretrained_weights: String::new(),
            ffn_layer: FfnLayer::Mlp,
            block_chunks: 0,
            activation_checkpointing: false,
            qkv_bias: true,
            proj_bias: true,
            ffn_bias: true,
            num_register_tokens: 0,
            interpolate_antialias: false,
            interpolate_offset: 0.1,
            weights: String::new(),
        }
    }
}
