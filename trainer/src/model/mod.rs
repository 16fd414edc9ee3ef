//! The DINOv2 networks: the vision transformer backbone and the DINO/iBOT projection heads.
//!
//! Parameters live in a tch `VarStore` under the official `state_dict` key names
//! (`blocks.0.attn.qkv.weight`, `dino_head.last_layer.weight_v`, ...), so official weights,
//! the parity fixtures and our checkpoints map one to one.
//!
//! Precision: parameters are the fp32 master weights; every layer casts them to the dtype of its
//! input, so running a forward in bf16/fp16 only needs the input cast (gradients flow back to the
//! fp32 masters through the casts).

pub mod attention;
pub mod block;
pub mod ffn;
pub mod head;
pub mod layers;
pub mod patch_embed;
pub mod vit;

pub use block::Block;
pub use ffn::FfnLayer;
pub use head::{DinoHead, DinoHeadConfig};
pub use vit::{BackboneOutput, DinoVisionTransformer, VitConfig};

/// Errors from building or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A model configuration value is unusable.
    #[error("{field}: {message}")]
    InvalidConfig {
        /// Config field, in the official snake_case name.
        field: &'static str,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// An input tensor does not fit the model.
    #[error("bad input: {0}")]
    BadInput(String),
    /// libtorch reported an error.
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

pub(crate) fn invalid(field: &'static str, message: impl Into<String>) -> ModelError {
    ModelError::InvalidConfig {
        field,
        message: message.into(),
    }
}

#[cfg(test)]
pub(crate) mod parity_tests;
