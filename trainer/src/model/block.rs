//! One pre-norm transformer block, with LayerScale and the official stochastic depth.

use tch::{Kind, Tensor, nn};

use super::attention::Attention;
use super::ffn::{Ffn, FfnLayer};
use super::layers::{LayerNorm, LayerScale};

/// Settings shared by all blocks of a backbone.
#[derive(Debug, Clone)]
pub struct BlockConfig {
    pub dim: i64,
    pub num_heads: i64,
    pub mlp_hidden: i64,
    pub qkv_bias: bool,
    pub proj_bias: bool,
    pub ffn_bias: bool,
    pub ffn_layer: FfnLayer,
    /// LayerScale init; `None` means no LayerScale (no `ls1`/`ls2` parameters).
    pub layerscale: Option<f64>,
    pub norm_eps: f64,
}

/// `x = x + ls1(attn(norm1(x)))`, `x = x + ls2(ffn(norm2(x)))`.
///
/// A block owns one sub-path of the var store (`blocks.<i>`), so it is a unit for sharding.
#[derive(Debug)]
pub struct Block {
    pub norm1: LayerNorm,
    pub attn: Attention,
    pub ls1: Option<LayerScale>,
    pub norm2: LayerNorm,
    pub mlp: Ffn,
    pub ls2: Option<LayerScale>,
    /// Stochastic-depth rate of this block (used only in training).
    pub sample_drop_ratio: f64,
}

impl Block {
    pub fn new(p: &nn::Path, cfg: &BlockConfig, sample_drop_ratio: f64) -> Self {
        let ls = |name: &str| {
            cfg.layerscale
                .map(|v| LayerScale::new(&(p / name), cfg.dim, v))
        };
        Self {
            norm1: LayerNorm::new(&(p / "norm1"), cfg.dim, cfg.norm_eps),
            attn: Attention::new(
                &(p / "attn"),
                cfg.dim,
                cfg.num_heads,
                cfg.qkv_bias,
                cfg.proj_bias,
            ),
            ls1: ls("ls1"),
            norm2: LayerNorm::new(&(p / "norm2"), cfg.dim, cfg.norm_eps),
            mlp: Ffn::new(
                &(p / "mlp"),
                cfg.ffn_layer,
                cfg.dim,
                cfg.mlp_hidden,
                cfg.ffn_bias,
            ),
            ls2: ls("ls2"),
            sample_drop_ratio,
        }
    }

    fn attn_residual(&self, x: &Tensor) -> Tensor {
        let y = self.attn.forward(&self.norm1.forward(x));
        match &self.ls1 {
            Some(ls) => ls.forward(&y),
            None => y,
        }
    }

    fn ffn_residual(&self, x: &Tensor) -> Tensor {
        let y = self.mlp.forward(&self.norm2.forward(x));
        match &self.ls2 {
            Some(ls) => ls.forward(&y),
            None => y,
        }
    }

    /// `x`: `[B, N, D]`. `train` enables stochastic depth.
    pub fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        if train && self.sample_drop_ratio > 0.0 {
            let x = drop_add_residual(x, self.sample_drop_ratio, |s| self.attn_residual(s));
            drop_add_residual(&x, self.sample_drop_ratio, |s| self.ffn_residual(s))
        } else {
            let x = x + self.attn_residual(x);
            &x + self.ffn_residual(&x)
        }
    }
}

/// Official batch-subset stochastic depth (`drop_add_residual_stochastic_depth[_list]`): the
/// residual branch runs on a random subset of `max(⌊B·(1-p)⌋, 1)` samples only, and is added
/// back to those rows scaled by `B / subset`, so the expectation is unchanged. The official
/// training path (nested crop lists) uses this for every rate > 0.
pub fn drop_add_residual(x: &Tensor, ratio: f64, residual: impl Fn(&Tensor) -> Tensor) -> Tensor {
    let b = x.size()[0];
    let subset = ((b as f64 * (1.0 - ratio)) as i64).max(1);
    let brange = Tensor::randperm(b, (Kind::Int64, x.device())).narrow(0, 0, subset);
    let res = residual(&x.index_select(0, &brange));
    let scale = b as f64 / subset as f64;
    let flat = x.flatten(1, -1);
    let added = flat.index_add(0, &brange, &(res.flatten(1, -1).to_kind(x.kind()) * scale));
    added.view_as(x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn stochastic_depth_updates_only_a_rescaled_subset_of_the_batch() {
        tch::manual_seed(3);
        let x = Tensor::zeros([8, 2, 3], (Kind::Float, Device::Cpu));
        let out = drop_add_residual(&x, 0.4, |s| s.ones_like());
        // ⌊8 · 0.6⌋ = 4 rows get the residual, scaled by 8/4 = 2; the others are untouched.
        let per_row = out.sum_dim_intlist([1i64, 2].as_slice(), false, Kind::Double);
        let touched: Vec<f64> = Vec::<f64>::try_from(&per_row).unwrap();
        assert_eq!(
            touched.iter().filter(|v| **v == 12.0).count(),
            4,
            "{touched:?}"
        );
        assert_eq!(
            touched.iter().filter(|v| **v == 0.0).count(),
            4,
            "{touched:?}"
        );
    }

    #[test]
    fn stochastic_depth_keeps_at_least_one_sample() {
        let x = Tensor::zeros([2, 1, 1], (Kind::Float, Device::Cpu));
        let out = drop_add_residual(&x, 0.9, |s| s.ones_like());
        assert_eq!(out.sum(Kind::Float).double_value(&[]), 2.0);
    }
}
