//! Per-parameter learning-rate / weight-decay multipliers (reference
//! `get_params_groups_with_decay`, `get_vit_lr_decay_rate`, `fuse_params_groups`).
//!
//! Rules, applied per student submodule (`backbone`, `dino_head`, `ibot_head`) to the name
//! *inside* the submodule:
//! * layer id: 0 for `pos_embed`, `patch_embed`, `mask_token`, `cls_token`, `register_tokens`;
//!   `i + 1` for transformer block `i`; `depth + 1` otherwise (final norm; every head
//!   parameter, heads having no blocks). `lr_mult = layerwise_decay ^ (depth + 1 − layer id)`.
//! * `patch_embed.*` additionally gets `× patch_embed_lr_mult`.
//! * `wd_mult = 0` for names ending in `.bias` or containing `norm` or `gamma` (LayerScale),
//!   else 1. Tokens and `pos_embed` keep weight decay, as in the reference.
//! * `is_last_layer` when the name contains `last_layer` (prototype layer, frozen at first).
//!
//! Block names may be flat (`blocks.<i>.…`) or chunked for sharding (`blocks.<chunk>.<i>.…`,
//! the reference `BlockChunk` layout); the layout is recognised from the name.

use std::collections::HashMap;

/// Multiplier settings (official `optim.layerwise_decay`, `optim.patch_embed_lr_mult`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ParamGroupConfig {
    /// Layer-wise lr decay (0.9).
    pub layerwise_decay: f64,
    /// Extra lr multiplier of the patch embedding (0.2).
    pub patch_embed_lr_mult: f64,
}

impl Default for ParamGroupConfig {
    fn default() -> Self {
        Self {
            layerwise_decay: 0.9,
            patch_embed_lr_mult: 0.2,
        }
    }
}

/// What the optimizer needs to know about one parameter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ParamMultipliers {
    /// Multiplier of the scheduled learning rate.
    pub lr_mult: f64,
    /// Multiplier of the scheduled weight decay (0 or 1).
    pub wd_mult: f64,
    /// Whether the parameter follows the last-layer lr schedule.
    pub is_last_layer: bool,
}

/// A parameter name the rules cannot place.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ParamGroupError {
    /// `blocks.` not followed by a block index.
    #[error(
        "parameter {name:?}: expected `blocks.<index>.` or `blocks.<chunk>.<index>.` in the name"
    )]
    BadBlockName { name: String },
    /// A block index not below the backbone depth.
    #[error("parameter {name:?}: block index {index} is not below the backbone depth {depth}")]
    BlockOutOfRange {
        name: String,
        index: usize,
        depth: usize,
    },
    /// A full student key without a submodule prefix.
    #[error(
        "parameter {name:?}: expected a student key `<submodule>.<name>` (e.g. backbone.cls_token)"
    )]
    NoSubmodule { name: String },
}

const EMBEDDING_NAMES: [&str; 5] = [
    "pos_embed",
    "patch_embed",
    "mask_token",
    "cls_token",
    "register_tokens",
];

/// Multipliers of parameter `name` inside a submodule with `n_blocks` transformer blocks
/// (the backbone depth; 0 for heads).
pub fn param_multipliers(
    name: &str,
    n_blocks: usize,
    cfg: &ParamGroupConfig,
) -> Result<ParamMultipliers, ParamGroupError> {
    let mut layer_id = n_blocks + 1;
    // The reference treats a submodule as a backbone when it has blocks.
    if n_blocks > 0 {
        if EMBEDDING_NAMES.iter().any(|e| name.contains(e)) {
            layer_id = 0;
        } else if let Some(index) = block_index(name)? {
            if index >= n_blocks {
                return Err(ParamGroupError::BlockOutOfRange {
                    name: name.to_string(),
                    index,
                    depth: n_blocks,
                });
            }
            layer_id = index + 1;
        }
    }
    let mut lr_mult = cfg.layerwise_decay.powf((n_blocks + 1 - layer_id) as f64);
    if name.contains("patch_embed") {
        lr_mult *= cfg.patch_embed_lr_mult;
    }
    let no_decay = name.ends_with(".bias") || name.contains("norm") || name.contains("gamma");
    Ok(ParamMultipliers {
        lr_mult,
        wd_mult: if no_decay { 0.0 } else { 1.0 },
        is_last_layer: name.contains("last_layer"),
    })
}

/// Block index of a `blocks.<i>.…` or `blocks.<chunk>.<i>.…` name; `None` when the name is
/// not inside a block (the reference also skips `residual.` names).
fn block_index(name: &str) -> Result<Option<usize>, ParamGroupError> {
    let Some(pos) = name.find("blocks.") else {
        return Ok(None);
    };
    if name.contains("residual.") {
        return Ok(None);
    }
    let mut parts = name[pos..].split('.').skip(1);
    let bad = || ParamGroupError::BadBlockName {
        name: name.to_string(),
    };
    let first: usize = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
    // Chunked layout: a second integer follows the chunk index.
    Ok(Some(
        parts.next().and_then(|p| p.parse().ok()).unwrap_or(first),
    ))
}

/// Multipliers of a full student key (`backbone.blocks.0.attn.qkv.weight`,
/// `dino_head.last_layer.weight_v`, ...): the first segment names the submodule; only
/// `backbone` has blocks (`backbone_depth` of them).
pub fn student_param_multipliers(
    key: &str,
    backbone_depth: usize,
    cfg: &ParamGroupConfig,
) -> Result<ParamMultipliers, ParamGroupError> {
    let (submodule, name) = key
        .split_once('.')
        .ok_or_else(|| ParamGroupError::NoSubmodule {
            name: key.to_string(),
        })?;
    let n_blocks = if submodule == "backbone" {
        backbone_depth
    } else {
        0
    };
    param_multipliers(name, n_blocks, cfg)
}

/// One optimizer group of the reference's fused layout: parameters of one submodule sharing
/// their multipliers.
#[derive(Debug, Clone, PartialEq)]
pub struct FusedGroup {
    /// Student submodule (first segment of the keys).
    pub submodule: String,
    /// Shared multipliers.
    pub multipliers: ParamMultipliers,
    /// Full student keys, in the given order.
    pub params: Vec<String>,
}

/// Reference `fuse_params_groups` applied per submodule: groups in order of first appearance,
/// keyed by `(lr_mult, wd_mult, is_last_layer)`. `params` are full student keys, grouped by
/// submodule as `named_parameters` yields them.
pub fn fuse_param_groups(params: &[(String, ParamMultipliers)]) -> Vec<FusedGroup> {
    let mut groups: Vec<FusedGroup> = Vec::new();
    let mut index: HashMap<(String, u64, u64, bool), usize> = HashMap::new();
    for (key, m) in params {
        let submodule = key.split_once('.').map_or(key.as_str(), |(s, _)| s);
        // Bit patterns: the reference keys on str(float), which is exact as well.
        let id = (
            submodule.to_string(),
            m.lr_mult.to_bits(),
            m.wd_mult.to_bits(),
            m.is_last_layer,
        );
        let slot = *index.entry(id).or_insert_with(|| {
            groups.push(FusedGroup {
                submodule: submodule.to_string(),
                multipliers: *m,
                params: Vec::new(),
            });
            groups.len() - 1
        });
        groups[slot].params.push(key.clone());
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(key: &str) -> ParamMultipliers {
        student_param_multipliers(key, 12, &ParamGroupConfig::default()).unwrap()
    }

    #[test]
    fn embeddings_get_the_deepest_decay_and_patch_embed_its_extra_factor() {
        let cls = m("backbone.cls_token");
        assert_eq!(cls.lr_mult, 0.9f64.powf(13.0));
        assert_eq!(cls.wd_mult, 1.0);
        let pe = m("backbone.patch_embed.proj.weight");
        assert_eq!(pe.lr_mult, 0.9f64.powf(13.0) * 0.2);
        assert_eq!(m("backbone.patch_embed.proj.bias").wd_mult, 0.0);
        assert_eq!(m("backbone.register_tokens").lr_mult, cls.lr_mult);
    }

    #[test]
    fn blocks_decay_with_depth_and_flat_and_chunked_names_agree() {
        assert_eq!(m("backbone.blocks.11.mlp.fc1.weight").lr_mult, 0.9);
        assert_eq!(
            m("backbone.blocks.0.attn.qkv.weight").lr_mult,
            0.9f64.powf(12.0)
        );
        assert_eq!(
            m("backbone.blocks.2.7.attn.qkv.weight"),
            m("backbone.blocks.7.attn.qkv.weight")
        );
        assert_eq!(m("backbone.norm.weight").lr_mult, 1.0);
    }

    #[test]
    fn biases_norms_and_layerscale_have_no_weight_decay() {
        assert_eq!(m("backbone.blocks.3.ls1.gamma").wd_mult, 0.0);
        assert_eq!(m("backbone.blocks.3.norm1.weight").wd_mult, 0.0);
        assert_eq!(m("backbone.blocks.3.attn.proj.bias").wd_mult, 0.0);
        assert_eq!(m("backbone.blocks.3.attn.proj.weight").wd_mult, 1.0);
        assert_eq!(m("backbone.mask_token").wd_mult, 1.0);
    }

    #[test]
    fn head_parameters_are_undecayed_and_prototypes_are_last_layer() {
        let w = m("dino_head.mlp.0.weight");
        assert_eq!((w.lr_mult, w.wd_mult, w.is_last_layer), (1.0, 1.0, false));
        let g = m("ibot_head.last_layer.weight_g");
        assert_eq!((g.lr_mult, g.wd_mult, g.is_last_layer), (1.0, 1.0, true));
    }

    #[test]
    fn malformed_names_are_errors_naming_the_parameter() {
        let cfg = ParamGroupConfig::default();
        let err = student_param_multipliers("backbone.blocks.x.weight", 12, &cfg).unwrap_err();
        assert!(err.to_string().contains("backbone") || err.to_string().contains("blocks.x"));
        assert!(matches!(
            student_param_multipliers("backbone.blocks.12.norm1.weight", 12, &cfg),
            Err(ParamGroupError::BlockOutOfRange { index: 12, .. })
        ));
        assert!(student_param_multipliers("cls_token", 12, &cfg).is_err());
    }

    #[test]
    fn fused_groups_keep_first_appearance_order_per_submodule() {
        let keys = [
            "backbone.cls_token",
            "backbone.blocks.0.norm1.weight",
            "backbone.blocks.0.attn.qkv.weight",
            "backbone.blocks.0.norm1.bias",
            "backbone.norm.weight",
            "dino_head.mlp.0.bias",
            "ibot_head.mlp.0.bias",
        ];
        let params: Vec<_> = keys
            .iter()
            .map(|k| {
                (
                    k.to_string(),
                    student_param_multipliers(k, 1, &Default::default()).unwrap(),
                )
            })
            .collect();
        let groups = fuse_param_groups(&params);
        let sizes: Vec<_> = groups
            .iter()
            .map(|g| (g.submodule.as_str(), g.params.len()))
            .collect();
        // norm.weight (lr 1, wd 0) is a backbone group, distinct from the identical head groups.
        assert_eq!(
            sizes,
            vec![
                ("backbone", 1),
                ("backbone", 2),
                ("backbone", 1),
                ("backbone", 1),
                ("dino_head", 1),
                ("ibot_head", 1)
            ]
        );
    }
}
