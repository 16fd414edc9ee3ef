//! Patch embedding: a strided convolution turning `[B, 3, H, W]` into `[B, N, D]` tokens.

use tch::{Tensor, nn};

/// The official `PatchEmbed` (`proj` = `Conv2d(in_chans, D, patch, stride=patch)`, no norm).
#[derive(Debug)]
pub struct PatchEmbed {
    pub weight: Tensor,
    pub bias: Tensor,
    pub patch_size: i64,
}

impl PatchEmbed {
    /// The official code leaves this conv at PyTorch's default init (Kaiming-uniform with
    /// `a = √5`, i.e. U(±1/√fan_in) for the weight and the bias).
    pub fn new(p: &nn::Path, in_chans: i64, embed_dim: i64, patch_size: i64) -> Self {
        let p = p / "proj";
        let bound = 1.0 / ((in_chans * patch_size * patch_size) as f64).sqrt();
        let init = nn::Init::Uniform {
            lo: -bound,
            up: bound,
        };
        let weight = p.var(
            "weight",
            &[embed_dim, in_chans, patch_size, patch_size],
            init,
        );
        let bias = p.var("bias", &[embed_dim], init);
        Self {
            weight,
            bias,
            patch_size,
        }
    }

    /// `[B, C, H, W]` → `[B, (H/p)·(W/p), D]`, patches in row-major grid order.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let w = self.weight.to_kind(x.kind());
        let b = self.bias.to_kind(x.kind());
        let s = [self.patch_size, self.patch_size];
        x.conv2d(&w, Some(&b), s, [0, 0], [1, 1], 1)
            .flatten(2, 3)
            .transpose(1, 2)
    }
}
