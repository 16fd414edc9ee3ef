//! The DINO projection head (also used as the iBOT head).

use tch::{Kind, Tensor, nn};

use super::layers::Linear;
use super::{ModelError, invalid};

/// `DINOHead` hyper-parameters (official `dino.head_*` / `ibot.head_*`).
#[derive(Debug, Clone, PartialEq)]
pub struct DinoHeadConfig {
    pub in_dim: i64,
    /// Number of prototypes (`head_n_prototypes`).
    pub out_dim: i64,
    pub hidden_dim: i64,
    pub bottleneck_dim: i64,
    pub nlayers: i64,
    pub mlp_bias: bool,
}

impl DinoHeadConfig {
    /// The official defaults: 65536 prototypes, hidden 2048, bottleneck 256, 3 layers.
    pub fn official(in_dim: i64) -> Self {
        Self {
            in_dim,
            out_dim: 65536,
            hidden_dim: 2048,
            bottleneck_dim: 256,
            nlayers: 3,
            mlp_bias: true,
        }
    }

    pub fn validate(&self, field_prefix: &'static str) -> Result<(), ModelError> {
        let fields = [
            ("in_dim", self.in_dim),
            ("head_n_prototypes", self.out_dim),
            ("head_hidden_dim", self.hidden_dim),
            ("head_bottleneck_dim", self.bottleneck_dim),
            ("head_nlayers", self.nlayers),
        ];
        for (name, v) in fields {
            if v <= 0 {
                return Err(invalid(
                    field_prefix,
                    format!("{name} must be > 0, got {v}"),
                ));
            }
        }
        Ok(())
    }
}

/// MLP (Linear-GELU-…-Linear to the bottleneck), L2 normalisation, then a bias-free,
/// weight-normalised prototype layer `weight = weight_g · weight_v / ‖weight_v‖_row`.
///
/// Keys: `mlp.0`, `mlp.2`, … (`mlp` itself when `nlayers == 1`), `last_layer.weight_g`,
/// `last_layer.weight_v`.
#[derive(Debug)]
pub struct DinoHead {
    pub config: DinoHeadConfig,
    pub mlp: Vec<Linear>,
    pub weight_g: Tensor,
    pub weight_v: Tensor,
}

impl DinoHead {
    /// Official init: MLP weights N(0, 0.02), biases 0; `weight_v` PyTorch's default Linear init
    /// (U(±1/√bottleneck)); `weight_g` 1.
    pub fn new(p: &nn::Path, config: &DinoHeadConfig) -> Result<Self, ModelError> {
        config.validate("head")?;
        let c = config;
        let mlp_path = p / "mlp";
        let mlp = if c.nlayers == 1 {
            vec![Linear::trunc_normal(
                &mlp_path,
                c.in_dim,
                c.bottleneck_dim,
                c.mlp_bias,
            )]
        } else {
            let mut layers = Vec::new();
            let mut dims = vec![c.in_dim];
            dims.extend(std::iter::repeat_n(c.hidden_dim, (c.nlayers - 1) as usize));
            dims.push(c.bottleneck_dim);
            for (i, pair) in dims.windows(2).enumerate() {
                // Sequential indices skip the GELU modules: 0, 2, 4, ...
                layers.push(Linear::trunc_normal(
                    &(&mlp_path / (2 * i)),
                    pair[0],
                    pair[1],
                    c.mlp_bias,
                ));
            }
            layers
        };
        let last = p / "last_layer";
        let bound = 1.0 / (c.bottleneck_dim as f64).sqrt();
        let weight_v = last.var(
            "weight_v",
            &[c.out_dim, c.bottleneck_dim],
            nn::Init::Uniform {
                lo: -bound,
                up: bound,
            },
        );
        let weight_g = last.var("weight_g", &[c.out_dim, 1], nn::Init::Const(1.0));
        Ok(Self {
            config: config.clone(),
            mlp,
            weight_g,
            weight_v,
        })
    }

    /// The bottleneck features before normalisation.
    pub fn mlp_forward(&self, x: &Tensor) -> Tensor {
        let mut y = x.shallow_clone();
        let last = self.mlp.len() - 1;
        for (i, layer) in self.mlp.iter().enumerate() {
            y = layer.forward(&y);
            if i < last {
                y = y.gelu("none");
            }
        }
        y
    }

    /// The effective prototype matrix `[out_dim, bottleneck]` (fp32).
    pub fn last_layer_weight(&self) -> Tensor {
        Tensor::internal_weight_norm(&self.weight_v, &self.weight_g, 0)
    }

    /// `F.normalize(x, p=2, dim=-1, eps)`; the official head uses eps 1e-6 in fp16, else 1e-12.
    pub fn l2_normalize(x: &Tensor) -> Tensor {
        let eps = if x.kind() == Kind::Half { 1e-6 } else { 1e-12 };
        let norm = x
            .norm_scalaropt_dim(2, [-1i64].as_slice(), true)
            .clamp_min(eps);
        x / norm
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let y = Self::l2_normalize(&self.mlp_forward(x));
        y.linear::<Tensor>(&self.last_layer_weight().to_kind(y.kind()), None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn small() -> DinoHeadConfig {
        DinoHeadConfig {
            in_dim: 8,
            out_dim: 12,
            hidden_dim: 6,
            bottleneck_dim: 4,
            nlayers: 3,
            mlp_bias: true,
        }
    }

    #[test]
    fn head_keys_follow_the_official_sequential_layout() {
        let vs = nn::VarStore::new(Device::Cpu);
        DinoHead::new(&(vs.root() / "dino_head"), &small()).unwrap();
        let mut keys: Vec<String> = vs.variables().into_keys().collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "dino_head.last_layer.weight_g",
                "dino_head.last_layer.weight_v",
                "dino_head.mlp.0.bias",
                "dino_head.mlp.0.weight",
                "dino_head.mlp.2.bias",
                "dino_head.mlp.2.weight",
                "dino_head.mlp.4.bias",
                "dino_head.mlp.4.weight",
            ]
        );
        let vs1 = nn::VarStore::new(Device::Cpu);
        DinoHead::new(
            &vs1.root(),
            &DinoHeadConfig {
                nlayers: 1,
                ..small()
            },
        )
        .unwrap();
        assert!(vs1.variables().contains_key("mlp.weight"));
    }

    #[test]
    fn prototypes_have_norm_weight_g_and_inputs_are_unit_normalised() {
        let vs = nn::VarStore::new(Device::Cpu);
        let head = DinoHead::new(&vs.root(), &small()).unwrap();
        let w = head.last_layer_weight();
        let norms = w.norm_scalaropt_dim(2, [1i64].as_slice(), false);
        assert!((norms - 1.0).abs().max().double_value(&[]) < 1e-6);
        let y = DinoHead::l2_normalize(&Tensor::from_slice(&[3.0f32, 4.0]).reshape([1, 2]));
        assert_eq!(
            Vec::<f32>::try_from(&y.flatten(0, -1)).unwrap(),
            vec![0.6, 0.8]
        );
        let out = head.forward(&Tensor::randn([5, 8], (Kind::Float, Device::Cpu)));
        assert_eq!(out.size(), vec![5, 12]);
    }

    #[test]
    fn a_zero_prototype_count_is_rejected() {
        let vs = nn::VarStore::new(Device::Cpu);
        let err = DinoHead::new(
            &vs.root(),
            &DinoHeadConfig {
                out_dim: 0,
                ..small()
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("head_n_prototypes"), "{err}");
    }
}
