//! Multi-head self-attention of a ViT block.

use tch::{Tensor, nn};

use super::layers::Linear;

/// Self-attention with a fused `qkv` projection (`[q | k | v]` output channels, each split into
/// heads of `head_dim` consecutive channels) and an output projection `proj`.
#[derive(Debug)]
pub struct Attention {
    pub qkv: Linear,
    pub proj: Linear,
    num_heads: i64,
}

impl Attention {
    pub fn new(p: &nn::Path, dim: i64, num_heads: i64, qkv_bias: bool, proj_bias: bool) -> Self {
        Self {
            qkv: Linear::trunc_normal(&(p / "qkv"), dim, 3 * dim, qkv_bias),
            proj: Linear::trunc_normal(&(p / "proj"), dim, dim, proj_bias),
            num_heads,
        }
    }

    /// `x`: `[B, N, C]`. Exact softmax attention with scale `head_dim^-0.5`, no mask.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let size = x.size();
        let (b, n, c) = (size[0], size[1], size[2]);
        let head_dim = c / self.num_heads;
        let qkv = self
            .qkv
            .forward(x)
            .reshape([b, n, 3, self.num_heads, head_dim])
            .permute([2, 0, 3, 1, 4]);
        let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
        let out = Tensor::scaled_dot_product_attention::<Tensor>(
            &q,
            &k,
            &v,
            None,
            0.0,
            false,
            None::<f64>,
            false,
        );
        self.proj.forward(&out.transpose(1, 2).reshape([b, n, c]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn attention_equals_the_explicit_softmax_formula() {
        let vs = nn::VarStore::new(Device::Cpu);
        let attn = Attention::new(&vs.root(), 8, 2, true, true);
        let x = Tensor::randn([2, 5, 8], (Kind::Float, Device::Cpu));
        let qkv = attn
            .qkv
            .forward(&x)
            .reshape([2, 5, 3, 2, 4])
            .permute([2, 0, 3, 1, 4]);
        let q = qkv.get(0) * 0.5; // 4^-0.5
        let weights = q
            .matmul(&qkv.get(1).transpose(-2, -1))
            .softmax(-1, Kind::Float);
        let expected = attn.proj.forward(
            &weights
                .matmul(&qkv.get(2))
                .transpose(1, 2)
                .reshape([2, 5, 8]),
        );
        let diff = (attn.forward(&x) - expected).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "diff {diff}");
    }
}
