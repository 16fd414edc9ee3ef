//! Feed-forward networks of a transformer block: the GELU MLP and the fused SwiGLU.

use std::str::FromStr;

use tch::{Tensor, nn};

use super::layers::Linear;
use super::{ModelError, invalid};

/// Which FFN a block uses (official `student.ffn_layer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FfnLayer {
    /// `fc1 → GELU (erf) → fc2`.
    #[default]
    Mlp,
    /// The official `SwiGLUFFNFused`: `w3(silu(x1) · x2)` with `[x1 | x2] = w12(x)`.
    /// The config names `swiglu` and `swiglufused` both select it, as in the official code
    /// when xFormers is absent.
    SwiGluFused,
    /// No FFN (`identity`): the block's second residual branch is `ls2(norm2(x))`.
    Identity,
}

impl FromStr for FfnLayer {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "mlp" => Ok(Self::Mlp),
            "swiglu" | "swiglufused" => Ok(Self::SwiGluFused),
            "identity" => Ok(Self::Identity),
            other => Err(invalid(
                "ffn_layer",
                format!(
                    "unknown FFN '{other}', expected one of mlp, swiglu, swiglufused, identity"
                ),
            )),
        }
    }
}

/// Hidden width of the fused SwiGLU: two thirds of `mlp_ratio · dim`, rounded up to a multiple
/// of 8 (official `SwiGLUFFNFused`).
pub fn swiglu_hidden_dim(hidden_features: i64) -> i64 {
    (hidden_features * 2 / 3 + 7) / 8 * 8
}

/// A block's FFN with its parameters.
#[derive(Debug)]
pub enum Ffn {
    Mlp { fc1: Linear, fc2: Linear },
    SwiGlu { w12: Linear, w3: Linear },
    Identity,
}

impl Ffn {
    /// `hidden_features` is `int(dim · mlp_ratio)`.
    pub fn new(p: &nn::Path, kind: FfnLayer, dim: i64, hidden_features: i64, bias: bool) -> Self {
        match kind {
            FfnLayer::Mlp => Self::Mlp {
                fc1: Linear::trunc_normal(&(p / "fc1"), dim, hidden_features, bias),
                fc2: Linear::trunc_normal(&(p / "fc2"), hidden_features, dim, bias),
            },
            FfnLayer::SwiGluFused => {
                let hidden = swiglu_hidden_dim(hidden_features);
                Self::SwiGlu {
                    w12: Linear::trunc_normal(&(p / "w12"), dim, 2 * hidden, bias),
                    w3: Linear::trunc_normal(&(p / "w3"), hidden, dim, bias),
                }
            }
            FfnLayer::Identity => Self::Identity,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        match self {
            Self::Mlp { fc1, fc2 } => fc2.forward(&fc1.forward(x).gelu("none")),
            Self::SwiGlu { w12, w3 } => {
                let x12 = w12.forward(x);
                // Gate rows come first in w12, value rows second.
                let halves = x12.chunk(2, -1);
                w3.forward(&(halves[0].silu() * &halves[1]))
            }
            Self::Identity => x.shallow_clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn swiglu_hidden_width_matches_the_official_rounding() {
        // ViT-g/14: dim 1536, mlp_ratio 4 -> 6144 -> 4096.
        assert_eq!(swiglu_hidden_dim(6144), 4096);
        // ViT-S: 1536 -> 1024; ViT-L: 4096 -> 2736 (2730 rounded up to a multiple of 8).
        assert_eq!(swiglu_hidden_dim(1536), 1024);
        assert_eq!(swiglu_hidden_dim(4096), 2736);
    }

    #[test]
    fn swiglu_and_swiglufused_both_select_the_fused_variant_and_unknown_names_fail() {
        assert_eq!("swiglu".parse::<FfnLayer>().unwrap(), FfnLayer::SwiGluFused);
        assert_eq!(
            "swiglufused".parse::<FfnLayer>().unwrap(),
            FfnLayer::SwiGluFused
        );
        let err = "gelu".parse::<FfnLayer>().unwrap_err().to_string();
        assert!(
            err.contains("ffn_layer") && err.contains("swiglufused"),
            "{err}"
        );
    }

    #[test]
    fn swiglu_output_is_w3_of_silu_gate_times_value() {
        let vs = nn::VarStore::new(Device::Cpu);
        let ffn = Ffn::new(&vs.root(), FfnLayer::SwiGluFused, 16, 64, true);
        let x = Tensor::randn([3, 16], (Kind::Float, Device::Cpu));
        let Ffn::SwiGlu { w12, w3 } = &ffn else {
            panic!("expected SwiGLU")
        };
        let hidden = swiglu_hidden_dim(64);
        assert_eq!(w12.weight.size(), vec![2 * hidden, 16]);
        let gate = x.linear(
            &w12.weight.narrow(0, 0, hidden),
            Some(&w12.bias.as_ref().unwrap().narrow(0, 0, hidden)),
        );
        let value = x.linear(
            &w12.weight.narrow(0, hidden, hidden),
            Some(&w12.bias.as_ref().unwrap().narrow(0, hidden, hidden)),
        );
        let expected = (gate.silu() * value).linear(&w3.weight, w3.bias.as_ref());
        let diff = (ffn.forward(&x) - expected).abs().max().double_value(&[]);
        assert!(diff < 1e-6, "diff {diff}");
    }
}
