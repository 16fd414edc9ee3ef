//! Small parameterised layers shared by the backbone and the heads.

use tch::{Tensor, nn};

/// Standard deviation of the official `trunc_normal_` init of linear weights.
///
/// The official call truncates at ±2 in absolute value, i.e. at ±100 standard deviations, so a
/// plain normal draw is the same distribution in practice.
pub const TRUNC_NORMAL_STD: f64 = 0.02;

/// `y = x Wᵀ + b`, weight `[out, in]` as in PyTorch.
#[derive(Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    /// Linear layer with the official ViT init: weight ~ N(0, 0.02), bias 0.
    pub fn trunc_normal(p: &nn::Path, in_dim: i64, out_dim: i64, bias: bool) -> Self {
        let weight = p.var(
            "weight",
            &[out_dim, in_dim],
            nn::Init::Randn {
                mean: 0.0,
                stdev: TRUNC_NORMAL_STD,
            },
        );
        let bias = bias.then(|| p.var("bias", &[out_dim], nn::Init::Const(0.0)));
        Self { weight, bias }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let w = self.weight.to_kind(x.kind());
        let b = self.bias.as_ref().map(|b| b.to_kind(x.kind()));
        x.linear(&w, b.as_ref())
    }
}

/// LayerNorm over the last dimension with affine parameters (init 1 / 0).
#[derive(Debug)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
    dim: i64,
}

impl LayerNorm {
    pub fn new(p: &nn::Path, dim: i64, eps: f64) -> Self {
        let weight = p.var("weight", &[dim], nn::Init::Const(1.0));
        let bias = p.var("bias", &[dim], nn::Init::Const(0.0));
        Self {
            weight,
            bias,
            eps,
            dim,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let w = self.weight.to_kind(x.kind());
        let b = self.bias.to_kind(x.kind());
        x.layer_norm([self.dim], Some(&w), Some(&b), self.eps, false)
    }
}

/// LayerScale: a learned per-channel factor `gamma`, initialised to a small constant.
#[derive(Debug)]
pub struct LayerScale {
    pub gamma: Tensor,
}

impl LayerScale {
    pub fn new(p: &nn::Path, dim: i64, init_values: f64) -> Self {
        Self {
            gamma: p.var("gamma", &[dim], nn::Init::Const(init_values)),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x * self.gamma.to_kind(x.kind())
    }
}
