//! The DINOv2 vision transformer (`DinoVisionTransformer`).
//! (Over 500 lines: one module mirrors the official `DinoVisionTransformer` and its key layout.)

use std::str::FromStr;

use tch::{Kind, Tensor, nn};

use super::block::{Block, BlockConfig};
use super::ffn::FfnLayer;
use super::layers::{LayerNorm, TRUNC_NORMAL_STD};
use super::patch_embed::PatchEmbed;
use super::{ModelError, invalid};

/// Named sizes of the official factories (`vit_small`, `vit_base`, `vit_large`, `vit_giant2`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VitArch {
    Small,
    Base,
    Large,
    Giant2,
}

impl VitArch {
    /// `(embed_dim, depth, num_heads)`; all official sizes use `mlp_ratio` 4.
    pub fn dims(self) -> (i64, i64, i64) {
        match self {
            Self::Small => (384, 12, 6),
            Self::Base => (768, 12, 12),
            Self::Large => (1024, 24, 16),
            Self::Giant2 => (1536, 40, 24),
        }
    }
}

impl FromStr for VitArch {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "vit_small" => Ok(Self::Small),
            "vit_base" => Ok(Self::Base),
            "vit_large" => Ok(Self::Large),
            "vit_giant2" => Ok(Self::Giant2),
            other => Err(invalid(
                "arch",
                format!(
                    "unknown arch '{other}', expected vit_small, vit_base, vit_large or vit_giant2"
                ),
            )),
        }
    }
}

/// Backbone hyper-parameters; the names are the official `student.*` config keys.
#[derive(Debug, Clone, PartialEq)]
pub struct VitConfig {
    /// Base resolution of `pos_embed` (official: `crops.global_crops_size`).
    pub img_size: i64,
    pub patch_size: i64,
    pub in_chans: i64,
    pub embed_dim: i64,
    pub depth: i64,
    pub num_heads: i64,
    pub mlp_ratio: f64,
    pub qkv_bias: bool,
    pub proj_bias: bool,
    pub ffn_bias: bool,
    pub drop_path_rate: f64,
    pub drop_path_uniform: bool,
    /// LayerScale init value; `None` disables LayerScale.
    pub layerscale: Option<f64>,
    pub ffn_layer: FfnLayer,
    pub num_register_tokens: i64,
    pub interpolate_antialias: bool,
    pub interpolate_offset: f64,
}

impl Default for VitConfig {
    /// The official `ssl_default_config.yaml` student (`vit_large`, patch 16, 224 crops).
    fn default() -> Self {
        Self::for_arch(VitArch::Large, 16)
    }
}

impl VitConfig {
    /// One of the official sizes with the official training defaults for everything else.
    pub fn for_arch(arch: VitArch, patch_size: i64) -> Self {
        let (embed_dim, depth, num_heads) = arch.dims();
        Self {
            img_size: 224,
            patch_size,
            in_chans: 3,
            embed_dim,
            depth,
            num_heads,
            mlp_ratio: 4.0,
            qkv_bias: true,
            proj_bias: true,
            ffn_bias: true,
            drop_path_rate: 0.3,
            drop_path_uniform: true,
            layerscale: Some(1e-5),
            ffn_layer: FfnLayer::Mlp,
            num_register_tokens: 0,
            interpolate_antialias: false,
            interpolate_offset: 0.1,
        }
    }

    pub fn vit_small(patch_size: i64) -> Self {
        Self::for_arch(VitArch::Small, patch_size)
    }
    pub fn vit_base(patch_size: i64) -> Self {
        Self::for_arch(VitArch::Base, patch_size)
    }
    pub fn vit_large(patch_size: i64) -> Self {
        Self::for_arch(VitArch::Large, patch_size)
    }
    pub fn vit_giant2(patch_size: i64) -> Self {
        Self::for_arch(VitArch::Giant2, patch_size)
    }

    /// Side of the base patch grid (`img_size / patch_size`).
    pub fn base_grid(&self) -> i64 {
        self.img_size / self.patch_size
    }

    /// `int(embed_dim · mlp_ratio)`, the FFN width before SwiGLU's rounding.
    pub fn mlp_hidden(&self) -> i64 {
        (self.embed_dim as f64 * self.mlp_ratio) as i64
    }

    /// Per-block stochastic-depth rates: uniform, or the official float32
    /// `torch.linspace(0, rate, depth)`.
    pub fn drop_path_rates(&self) -> Vec<f64> {
        if self.drop_path_uniform {
            return vec![self.drop_path_rate; self.depth as usize];
        }
        let rates = Tensor::linspace(
            0.0,
            self.drop_path_rate,
            self.depth,
            (Kind::Float, tch::Device::Cpu),
        );
        // A CPU tensor read once at construction, never in a step.
        crate::host_sync::f64s(&rates)
    }

    pub fn validate(&self) -> Result<(), ModelError> {
        let positive = [
            ("img_size", self.img_size),
            ("patch_size", self.patch_size),
            ("in_chans", self.in_chans),
            ("embed_dim", self.embed_dim),
            ("depth", self.depth),
            ("num_heads", self.num_heads),
        ];
        for (field, v) in positive {
            if v <= 0 {
                return Err(invalid(field, format!("must be > 0, got {v}")));
            }
        }
        if self.embed_dim % self.num_heads != 0 {
            return Err(invalid(
                "num_heads",
                format!(
                    "embed_dim {} must be divisible by num_heads {}",
                    self.embed_dim, self.num_heads
                ),
            ));
        }
        if self.img_size < self.patch_size {
            return Err(invalid(
                "img_size",
                format!(
                    "must be at least patch_size {}, got {}",
                    self.patch_size, self.img_size
                ),
            ));
        }
        if self.mlp_ratio.is_nan() || self.mlp_ratio <= 0.0 || self.mlp_hidden() < 1 {
            return Err(invalid(
                "mlp_ratio",
                format!("must be > 0, got {}", self.mlp_ratio),
            ));
        }
        if !(0.0..1.0).contains(&self.drop_path_rate) {
            return Err(invalid(
                "drop_path_rate",
                format!("must be in [0, 1), got {}", self.drop_path_rate),
            ));
        }
        if let Some(ls) = self.layerscale
            && !ls.is_finite()
        {
            return Err(invalid("layerscale", format!("must be finite, got {ls}")));
        }
        if self.num_register_tokens < 0 {
            return Err(invalid(
                "num_register_tokens",
                format!("must be >= 0, got {}", self.num_register_tokens),
            ));
        }
        if self.interpolate_offset.is_nan() || self.interpolate_offset < 0.0 {
            return Err(invalid(
                "interpolate_offset",
                format!("must be >= 0, got {}", self.interpolate_offset),
            ));
        }
        Ok(())
    }
}

/// Final-norm outputs of a backbone forward, split as the official `forward_features` dict.
#[derive(Debug)]
pub struct BackboneOutput {
    /// `[B, D]`.
    pub x_norm_clstoken: Tensor,
    /// `[B, R, D]`.
    pub x_norm_regtokens: Tensor,
    /// `[B, N, D]`.
    pub x_norm_patchtokens: Tensor,
    /// `[B, 1+R+N, D]`, before the final norm.
    pub x_prenorm: Tensor,
}

/// One entry of [`DinoVisionTransformer::get_intermediate_layers`].
#[derive(Debug)]
pub struct IntermediateLayer {
    /// `[B, N, D]` patch tokens (registers and CLS removed).
    pub patch_tokens: Tensor,
    /// `[B, D]` CLS token of the same layer.
    pub class_token: Tensor,
}

/// The DINOv2 ViT: patch embedding, CLS token, optional registers, learned positional
/// embedding (interpolated to the input), pre-norm blocks and a final LayerNorm.
#[derive(Debug)]
pub struct DinoVisionTransformer {
    pub config: VitConfig,
    pub cls_token: Tensor,
    pub pos_embed: Tensor,
    pub register_tokens: Option<Tensor>,
    pub mask_token: Tensor,
    pub patch_embed: PatchEmbed,
    pub blocks: Vec<Block>,
    pub norm: LayerNorm,
}

impl DinoVisionTransformer {
    /// Creates the parameters under `p` with the official initialisation. Each block lives
    /// under its own sub-path `blocks.<i>`.
    pub fn new(p: &nn::Path, config: &VitConfig) -> Result<Self, ModelError> {
        config.validate()?;
        let d = config.embed_dim;
        let grid = config.base_grid();
        let cls_token = p.var(
            "cls_token",
            &[1, 1, d],
            nn::Init::Randn {
                mean: 0.0,
                stdev: 1e-6,
            },
        );
        let pos_embed = p.var(
            "pos_embed",
            &[1, 1 + grid * grid, d],
            nn::Init::Randn {
                mean: 0.0,
                stdev: TRUNC_NORMAL_STD,
            },
        );
        let register_tokens = (config.num_register_tokens > 0).then(|| {
            p.var(
                "register_tokens",
                &[1, config.num_register_tokens, d],
                nn::Init::Randn {
                    mean: 0.0,
                    stdev: 1e-6,
                },
            )
        });
        let mask_token = p.var("mask_token", &[1, d], nn::Init::Const(0.0));
        let patch_embed =
            PatchEmbed::new(&(p / "patch_embed"), config.in_chans, d, config.patch_size);
        let block_cfg = BlockConfig {
            dim: d,
            num_heads: config.num_heads,
            mlp_hidden: config.mlp_hidden(),
            qkv_bias: config.qkv_bias,
            proj_bias: config.proj_bias,
            ffn_bias: config.ffn_bias,
            ffn_layer: config.ffn_layer,
            layerscale: config.layerscale,
            norm_eps: 1e-6,
        };
        let blocks_path = p / "blocks";
        let blocks = config
            .drop_path_rates()
            .into_iter()
            .enumerate()
            .map(|(i, rate)| Block::new(&(&blocks_path / i), &block_cfg, rate))
            .collect();
        let norm = LayerNorm::new(&(p / "norm"), d, 1e-6);
        Ok(Self {
            config: config.clone(),
            cls_token,
            pos_embed,
            register_tokens,
            mask_token,
            patch_embed,
            blocks,
            norm,
        })
    }

    pub fn embed_dim(&self) -> i64 {
        self.config.embed_dim
    }

    pub fn num_register_tokens(&self) -> i64 {
        self.config.num_register_tokens
    }

    /// Positional embedding `[1, 1+h0·w0, D]` (fp32) for an input of `h × w` pixels.
    ///
    /// The patch part is resized bicubically (align_corners false) from the base grid. With
    /// `interpolate_offset == 0` the target size is passed; otherwise the scale factor
    /// `(h0 + offset) / grid` is, which moves the sampling positions (official behaviour).
    pub fn interpolate_pos_encoding(&self, h: i64, w: i64) -> Result<Tensor, ModelError> {
        interpolate_pos_embed(&self.pos_embed, &self.config, h, w)
    }

    fn check_input(
        &self,
        x: &Tensor,
        masks: Option<&Tensor>,
    ) -> Result<(i64, i64, i64), ModelError> {
        let cfg = &self.config;
        let size = x.size();
        let [b, c, h, w] = size[..] else {
            return Err(ModelError::BadInput(format!(
                "images must be [B, C, H, W], got {size:?}"
            )));
        };
        if c != cfg.in_chans {
            return Err(ModelError::BadInput(format!(
                "expected {} channels, got {c}",
                cfg.in_chans
            )));
        }
        let p = cfg.patch_size;
        if h < p || w < p || h % p != 0 || w % p != 0 {
            return Err(ModelError::BadInput(format!(
                "image size {h}x{w} must be a positive multiple of the patch size {p}"
            )));
        }
        if !matches!(
            x.kind(),
            Kind::Float | Kind::BFloat16 | Kind::Half | Kind::Double
        ) {
            return Err(ModelError::BadInput(format!(
                "images must be floating point, got {:?}",
                x.kind()
            )));
        }
        if let Some(m) = masks {
            let n = (h / p) * (w / p);
            if m.size() != [b, n] || m.kind() != Kind::Bool {
                return Err(ModelError::BadInput(format!(
                    "masks must be bool [{b}, {n}], got {:?} {:?}",
                    m.kind(),
                    m.size()
                )));
            }
        }
        Ok((b, h, w))
    }

    /// Tokens entering block 0: patch embeddings (masked ones replaced by `mask_token`), CLS
    /// prepended, positional embedding added, then the registers inserted after CLS.
    pub fn prepare_tokens_with_masks(
        &self,
        x: &Tensor,
        masks: Option<&Tensor>,
    ) -> Result<Tensor, ModelError> {
        let (b, h, w) = self.check_input(x, masks)?;
        let kind = x.kind();
        let mut tokens = self.patch_embed.forward(x);
        if let Some(m) = masks {
            let mask_token = self.mask_token.to_kind(kind).unsqueeze(0);
            tokens = mask_token.where_self(&m.unsqueeze(-1), &tokens);
        }
        let cls = self.cls_token.to_kind(kind).expand([b, -1, -1], false);
        let tokens = Tensor::cat(&[cls, tokens], 1);
        let tokens = tokens + self.interpolate_pos_encoding(h, w)?.to_kind(kind);
        Ok(match &self.register_tokens {
            Some(reg) => {
                let n = tokens.size()[1];
                let reg = reg.to_kind(kind).expand([b, -1, -1], false);
                Tensor::cat(
                    &[tokens.narrow(1, 0, 1), reg, tokens.narrow(1, 1, n - 1)],
                    1,
                )
            }
            None => tokens,
        })
    }

    /// The official `forward_features`. `train` turns on stochastic depth.
    pub fn forward_features(
        &self,
        x: &Tensor,
        masks: Option<&Tensor>,
        train: bool,
    ) -> Result<BackboneOutput, ModelError> {
        let mut t = self.prepare_tokens_with_masks(x, masks)?;
        for block in &self.blocks {
            t = block.forward(&t, train);
        }
        let normed = self.norm.forward(&t);
        let r = self.config.num_register_tokens;
        let total = normed.size()[1];
        Ok(BackboneOutput {
            x_norm_clstoken: normed.select(1, 0),
            x_norm_regtokens: normed.narrow(1, 1, r),
            x_norm_patchtokens: normed.narrow(1, 1 + r, total - 1 - r),
            x_prenorm: t,
        })
    }

    /// Outputs of the last `n` blocks (eval mode), optionally through the final norm
    /// (official `get_intermediate_layers(x, n, norm=...)` with the class token kept aside).
    pub fn get_intermediate_layers(
        &self,
        x: &Tensor,
        n: usize,
        norm: bool,
    ) -> Result<Vec<IntermediateLayer>, ModelError> {
        let depth = self.blocks.len();
        if n == 0 || n > depth {
            return Err(ModelError::BadInput(format!(
                "n must be in 1..={depth}, got {n}"
            )));
        }
        let wanted: Vec<usize> = (depth - n..depth).collect();
        self.get_intermediate_layers_at(x, &wanted, norm)
    }

    /// Like [`Self::get_intermediate_layers`] for explicit block indices.
    pub fn get_intermediate_layers_at(
        &self,
        x: &Tensor,
        blocks: &[usize],
        norm: bool,
    ) -> Result<Vec<IntermediateLayer>, ModelError> {
        if let Some(bad) = blocks.iter().find(|i| **i >= self.blocks.len()) {
            return Err(ModelError::BadInput(format!(
                "block index {bad} >= depth {}",
                self.blocks.len()
            )));
        }
        let mut t = self.prepare_tokens_with_masks(x, None)?;
        let skip = 1 + self.config.num_register_tokens;
        let mut out = Vec::with_capacity(blocks.len());
        for (i, block) in self.blocks.iter().enumerate() {
            t = block.forward(&t, false);
            if blocks.contains(&i) {
                let y = if norm {
                    self.norm.forward(&t)
                } else {
                    t.shallow_clone()
                };
                let total = y.size()[1];
                out.push(IntermediateLayer {
                    patch_tokens: y.narrow(1, skip, total - skip),
                    class_token: y.select(1, 0),
                });
            }
        }
        Ok(out)
    }
}

/// The positional embedding `pos` (`[1, 1+m², D]`, any square grid `m`) for an input of
/// `h × w` pixels with `config`'s patch size and interpolation settings: what the model's
/// forward uses, and how pretrained weights of another resolution are resized on load.
pub fn interpolate_pos_embed(
    pos: &Tensor,
    cfg: &VitConfig,
    h: i64,
    w: i64,
) -> Result<Tensor, ModelError> {
    let (h0, w0) = (h / cfg.patch_size, w / cfg.patch_size);
    let n = pos.size()[1] - 1;
    let pos = pos.to_kind(Kind::Float);
    // Same skip condition as the official code (square input with the base patch count).
    if h0 * w0 == n && h == w {
        return Ok(pos);
    }
    let m = (n as f64).sqrt().round() as i64;
    if m * m != n {
        return Err(ModelError::BadInput(format!(
            "positional embedding of {n} patches is not a square grid"
        )));
    }
    let d = cfg.embed_dim;
    let class_pos = pos.narrow(1, 0, 1);
    let grid = pos
        .narrow(1, 1, n)
        .reshape([1, m, m, d])
        .permute([0, 3, 1, 2]);
    let (size, scale_h, scale_w) = if cfg.interpolate_offset != 0.0 {
        let sh = (h0 as f64 + cfg.interpolate_offset) / m as f64;
        let sw = (w0 as f64 + cfg.interpolate_offset) / m as f64;
        // F.interpolate's output size for a scale factor: floor(input · scale) in double.
        (
            [
                (m as f64 * sh).floor() as i64,
                (m as f64 * sw).floor() as i64,
            ],
            Some(sh),
            Some(sw),
        )
    } else {
        ([h0, w0], None, None)
    };
    if size != [h0, w0] {
        return Err(ModelError::BadInput(format!(
            "positional-embedding interpolation to a {h0}x{w0} grid gave {}x{}",
            size[0], size[1]
        )));
    }
    let resized = if cfg.interpolate_antialias {
        grid.internal_upsample_bicubic2d_aa(size, false, scale_h, scale_w)
    } else {
        grid.upsample_bicubic2d(size, false, scale_h, scale_w)
    };
    let patch_pos = resized.permute([0, 2, 3, 1]).reshape([1, h0 * w0, d]);
    Ok(Tensor::cat(&[class_pos, patch_pos], 1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn tiny() -> VitConfig {
        VitConfig {
            img_size: 56,
            embed_dim: 32,
            depth: 2,
            num_heads: 2,
            num_register_tokens: 2,
            ..VitConfig::vit_small(14)
        }
    }

    #[test]
    fn official_sizes_have_the_official_dimensions() {
        assert_eq!(VitConfig::vit_small(14).embed_dim, 384);
        let g = VitConfig::vit_giant2(14);
        assert_eq!((g.embed_dim, g.depth, g.num_heads), (1536, 40, 24));
        assert_eq!("vit_large".parse::<VitArch>().unwrap(), VitArch::Large);
        assert!(
            "vit_huge"
                .parse::<VitArch>()
                .unwrap_err()
                .to_string()
                .contains("arch")
        );
    }

    #[test]
    fn default_config_is_the_official_training_default() {
        let c = VitConfig::default();
        assert_eq!(
            (c.embed_dim, c.patch_size, c.drop_path_rate),
            (1024, 16, 0.3)
        );
        assert_eq!(c.layerscale, Some(1e-5));
        assert!(c.drop_path_uniform && !c.interpolate_antialias);
        assert_eq!(c.interpolate_offset, 0.1);
    }

    #[test]
    fn drop_path_rates_are_uniform_or_linearly_increasing() {
        let mut c = tiny();
        c.depth = 3;
        c.drop_path_rate = 0.2;
        assert_eq!(c.drop_path_rates(), vec![0.2, 0.2, 0.2]);
        c.drop_path_uniform = false;
        let r = c.drop_path_rates();
        assert_eq!(r.len(), 3);
        assert!(
            r[0] == 0.0 && (r[1] - 0.1).abs() < 1e-7 && (r[2] - 0.2).abs() < 1e-7,
            "{r:?}"
        );
    }

    #[test]
    fn invalid_head_count_is_rejected_with_the_field_name() {
        let c = VitConfig {
            num_heads: 5,
            ..tiny()
        };
        let err = c.validate().unwrap_err().to_string();
        assert!(err.starts_with("num_heads"), "{err}");
    }

    #[test]
    fn parameters_use_the_official_key_names() {
        let vs = nn::VarStore::new(Device::Cpu);
        let _m = DinoVisionTransformer::new(&vs.root(), &tiny()).unwrap();
        let vars = vs.variables();
        for key in [
            "cls_token",
            "pos_embed",
            "register_tokens",
            "mask_token",
            "patch_embed.proj.weight",
            "blocks.1.attn.qkv.bias",
            "blocks.0.ls2.gamma",
            "blocks.0.mlp.fc2.weight",
            "norm.bias",
        ] {
            assert!(vars.contains_key(key), "missing {key}");
        }
        assert_eq!(vars["pos_embed"].size(), vec![1, 17, 32]);
    }

    #[test]
    fn forward_splits_cls_registers_and_patches_for_non_square_inputs() {
        let vs = nn::VarStore::new(Device::Cpu);
        let m = DinoVisionTransformer::new(&vs.root(), &tiny()).unwrap();
        let x = Tensor::randn([2, 3, 42, 70], (Kind::Float, Device::Cpu));
        let out = m.forward_features(&x, None, false).unwrap();
        assert_eq!(out.x_norm_clstoken.size(), vec![2, 32]);
        assert_eq!(out.x_norm_regtokens.size(), vec![2, 2, 32]);
        assert_eq!(out.x_norm_patchtokens.size(), vec![2, 15, 32]);
        let layers = m.get_intermediate_layers(&x, 2, true).unwrap();
        let diff = (&layers[1].patch_tokens - &out.x_norm_patchtokens)
            .abs()
            .max()
            .double_value(&[]);
        assert_eq!(diff, 0.0);
    }

    #[test]
    fn inputs_that_are_not_patch_multiples_are_an_error_not_a_panic() {
        let vs = nn::VarStore::new(Device::Cpu);
        let m = DinoVisionTransformer::new(&vs.root(), &tiny()).unwrap();
        let x = Tensor::zeros([1, 3, 50, 56], (Kind::Float, Device::Cpu));
        let err = m.forward_features(&x, None, false).unwrap_err().to_string();
        assert!(err.contains("multiple of the patch size"), "{err}");
    }

    #[test]
    fn masked_patches_get_the_mask_token_before_the_positional_embedding() {
        let vs = nn::VarStore::new(Device::Cpu);
        let m = DinoVisionTransformer::new(&vs.root(), &tiny()).unwrap();
        tch::no_grad(|| {
            let _ = m.mask_token.shallow_clone().fill_(0.5);
        });
        let x = Tensor::randn([1, 3, 56, 56], (Kind::Float, Device::Cpu));
        let masks = Tensor::from_slice(&[true; 16]).reshape([1, 16]);
        let t = m.prepare_tokens_with_masks(&x, Some(&masks)).unwrap();
        // All patch tokens equal mask_token + their positional embedding.
        let pos = m.interpolate_pos_encoding(56, 56).unwrap().narrow(1, 1, 16);
        let expected = pos + 0.5;
        let diff = (t.narrow(1, 3, 16) - expected)
            .abs()
            .max()
            .double_value(&[]);
        assert!(diff < 1e-6, "{diff}");
    }

    #[test]
    fn stochastic_depth_only_acts_in_training() {
        let vs = nn::VarStore::new(Device::Cpu);
        let c = VitConfig {
            drop_path_rate: 0.5,
            ..tiny()
        };
        let m = DinoVisionTransformer::new(&vs.root(), &c).unwrap();
        let x = Tensor::randn([4, 3, 56, 56], (Kind::Float, Device::Cpu));
        let a = m.forward_features(&x, None, false).unwrap().x_prenorm;
        let b = m.forward_features(&x, None, false).unwrap().x_prenorm;
        assert_eq!((&a - &b).abs().max().double_value(&[]), 0.0);
        let t = m.forward_features(&x, None, true).unwrap().x_prenorm;
        assert!((&a - &t).abs().max().double_value(&[]) > 0.0);
    }
}
