//! Parity of the backbone and the heads with the reference implementation
//! (`backbone_forward` and `heads` fixtures). The model is built from each fixture's JSON.

use serde_json::Value;
use tch::{Device, nn};

use super::{DinoHead, DinoHeadConfig, DinoVisionTransformer, FfnLayer, VitConfig};
use crate::parity_fixture::{Fixture, assert_close};
use crate::weights;

/// A backbone config from a fixture: keys looked up in `arch`, then in the official-style
/// `student` section, then the official defaults.
pub(crate) fn vit_config_from_fixture(
    arch: &Value,
    student: Option<&Value>,
    img_size: i64,
) -> VitConfig {
    let get = |k: &str| arch.get(k).or_else(|| student.and_then(|s| s.get(k)));
    let int = |k: &str, d: i64| get(k).and_then(Value::as_i64).unwrap_or(d);
    let float = |k: &str, d: f64| get(k).and_then(Value::as_f64).unwrap_or(d);
    let flag = |k: &str, d: bool| get(k).and_then(Value::as_bool).unwrap_or(d);
    let base = VitConfig::vit_small(14);
    let layerscale = get("layerscale_init")
        .or_else(|| get("layerscale"))
        .and_then(Value::as_f64);
    VitConfig {
        img_size: int("img_size", img_size),
        patch_size: int("patch_size", base.patch_size),
        embed_dim: int("embed_dim", base.embed_dim),
        depth: int("depth", base.depth),
        num_heads: int("num_heads", base.num_heads),
        mlp_ratio: float("mlp_ratio", base.mlp_ratio),
        qkv_bias: flag("qkv_bias", true),
        proj_bias: flag("proj_bias", true),
        ffn_bias: flag("ffn_bias", true),
        drop_path_rate: float("drop_path_rate", 0.0),
        drop_path_uniform: flag("drop_path_uniform", true),
        layerscale: layerscale.filter(|v| *v > 0.0),
        ffn_layer: get("ffn_layer")
            .and_then(Value::as_str)
            .map_or(FfnLayer::Mlp, |s| s.parse().unwrap()),
        num_register_tokens: int("num_register_tokens", 0),
        interpolate_antialias: flag("interpolate_antialias", false),
        interpolate_offset: float("interpolate_offset", 0.1),
        ..base
    }
}

#[test]
fn parity_backbone_forward_matches_the_reference_for_every_input() {
    let fx = Fixture::load("backbone_forward");
    let tol = fx.f64_at("/tolerance/rel");
    let cfg = vit_config_from_fixture(&fx.json["config"]["arch"], None, 224);
    let vs = nn::VarStore::new(Device::Cpu);
    let vit = DinoVisionTransformer::new(&vs.root(), &cfg).unwrap();
    weights::load_state_dict(&vs, &fx.state_dict("weights.")).unwrap();

    tch::no_grad(|| {
        // Final-norm outputs for every input listed in the fixture.
        let outputs = fx.keys_with_prefix("out.");
        assert!(!outputs.is_empty());
        for key in &outputs {
            let mut parts = key.splitn(3, '.');
            let (_, input, field) = (parts.next(), parts.next().unwrap(), parts.next().unwrap());
            let (images, masks) = match input.strip_suffix("_masked") {
                Some(base) => (
                    fx.t(&format!("in.{base}")),
                    Some(fx.t(&format!("in.{base}_mask"))),
                ),
                None => (fx.t(&format!("in.{input}")), None),
            };
            let out = vit.forward_features(images, masks, false).unwrap();
            let ours = match field {
                "x_norm_clstoken" => out.x_norm_clstoken,
                "x_norm_regtokens" => out.x_norm_regtokens,
                "x_norm_patchtokens" => out.x_norm_patchtokens,
                other => panic!("unknown output field {other}"),
            };
            assert_close(key, &ours, fx.t(key), tol);
        }

        // Interpolated positional embeddings.
        for key in fx.keys_with_prefix("debug.pos_embed.") {
            let input = fx.t(&format!("in.{}", &key["debug.pos_embed.".len()..]));
            let size = input.size();
            let ours = vit.interpolate_pos_encoding(size[2], size[3]).unwrap();
            assert_close(&key, &ours, fx.t(&key), tol);
        }

        // Tokens entering block 0 and after each block, first global image.
        let first = fx.t("in.global").narrow(0, 0, 1);
        let mut tokens = vit.prepare_tokens_with_masks(&first, None).unwrap();
        assert_close(
            "debug.global0.tokens",
            &tokens,
            fx.t("debug.global0.tokens"),
            tol,
        );
        for (j, block) in vit.blocks.iter().enumerate() {
            tokens = block.forward(&tokens, false);
            assert_close(
                &format!("block {j}"),
                &tokens,
                fx.t(&format!("debug.global0.block{j}")),
                tol,
            );
        }

        // get_intermediate_layers(in.global, n, norm=True).
        let wanted: Vec<usize> = fx.json["expect"]["intermediate_blocks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        let n = wanted.len();
        assert_eq!(
            wanted,
            ((cfg.depth as usize - n)..cfg.depth as usize).collect::<Vec<_>>()
        );
        let layers = vit
            .get_intermediate_layers(fx.t("in.global"), n, true)
            .unwrap();
        for (i, layer) in layers.iter().enumerate() {
            let p = format!("intermediate.{i}.patchtokens");
            assert_close(&p, &layer.patch_tokens, fx.t(&p), tol);
            let c = format!("intermediate.{i}.clstoken");
            assert_close(&c, &layer.class_token, fx.t(&c), tol);
        }
    });
}

#[test]
fn parity_heads_match_the_reference() {
    let fx = Fixture::load("heads");
    let tol = fx.f64_at("/tolerance/rel");
    let c = &fx.json["config"];
    let int = |k: &str| c[k].as_i64().unwrap();
    let cfg = DinoHeadConfig {
        in_dim: int("in_dim"),
        out_dim: int("out_dim"),
        hidden_dim: int("hidden_dim"),
        bottleneck_dim: int("bottleneck_dim"),
        nlayers: int("nlayers"),
        mlp_bias: c["mlp_bias"].as_bool().unwrap_or(true),
    };
    let vs = nn::VarStore::new(Device::Cpu);
    let head = DinoHead::new(&vs.root(), &cfg).unwrap();
    weights::load_state_dict(&vs, &fx.state_dict("weights.")).unwrap();
    tch::no_grad(|| {
        let x = fx.t("in.x");
        let mlp = head.mlp_forward(x);
        assert_close("debug.mlp_out", &mlp, fx.t("debug.mlp_out"), tol);
        let normed = DinoHead::l2_normalize(&mlp);
        assert_close(
            "debug.mlp_out_normalized",
            &normed,
            fx.t("debug.mlp_out_normalized"),
            tol,
        );
        assert_close(
            "debug.last_layer_weight",
            &head.last_layer_weight(),
            fx.t("debug.last_layer_weight"),
            tol,
        );
        assert_close("out.y", &head.forward(x), fx.t("out.y"), tol);
    });
}
