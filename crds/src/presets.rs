//! Official training recipes as one-line presets, and the merge rule that applies them.
//!
//! Merge rule (applied on the YAML value before typed deserialisation):
//! 1. start from the preset's values (the official `train/<name>.yaml`, translated to our keys);
//! 2. overlay the user's `training` block: mappings merge key by key, recursively; any other
//!    value the user gives (number, string, bool, list, null) replaces the preset's value
//!    wholesale, lists included;
//! 3. keys neither sets take the official defaults (`ssl_default_config.yaml`) during typed
//!    deserialisation.

use serde_json::{Map, Value};

use crate::training::Preset;

/// Official `dinov2/configs/train/vitl14.yaml`, in Dinoflow's keys.
const VITL14: &str = r#"
dino: {headNPrototypes: 131072, headBottleneckDim: 384}
ibot: {separateHead: true, headNPrototypes: 131072}
train: {batchSizePerGpu: 32}
data: {kind: imagenet22k}
loss: {centering: sinkhorn_knopp}
model: {arch: vit_large, patchSize: 14, dropPathRate: 0.4, ffnLayer: swiglufused, blockChunks: 4}
teacher: {momentumTeacher: 0.994}
optim: {epochs: 500, weightDecayEnd: 0.2, baseLr: 2.0e-4, warmupEpochs: 80, layerwiseDecay: 1.0}
crops: {localCropsSize: 98}
"#;

/// Official `dinov2/configs/train/vitg14.yaml`, in Dinoflow's keys.
const VITG14: &str = r#"
dino: {headNPrototypes: 131072, headBottleneckDim: 384}
ibot: {separateHead: true, headNPrototypes: 131072}
train: {batchSizePerGpu: 12}
data: {kind: imagenet22k}
loss: {centering: sinkhorn_knopp}
model: {arch: vit_giant2, patchSize: 14, dropPathRate: 0.4, ffnLayer: swiglufused, blockChunks: 4}
teacher: {momentumTeacher: 0.994}
optim: {epochs: 500, weightDecayEnd: 0.2, baseLr: 2.0e-4, warmupEpochs: 80, layerwiseDecay: 1.0}
crops: {localCropsSize: 98}
"#;

/// Every preset, for tests and schema generation.
pub const ALL: [Preset; 2] = [Preset::Vitl14, Preset::Vitg14];

/// The values a preset sets, as a `training`-shaped mapping.
pub fn values(preset: Preset) -> Value {
    let text = match preset {
        Preset::Vitl14 => VITL14,
        Preset::Vitg14 => VITG14,
    };
    // The texts are constants of this file; a unit test parses every one of them.
    serde_yaml_ng::from_str(text).expect("preset YAML is valid")
}

/// The preset's YAML name (`vitl14`).
pub fn name(preset: Preset) -> &'static str {
    match preset {
        Preset::Vitl14 => "vitl14",
        Preset::Vitg14 => "vitg14",
    }
}

/// Overlays `overlay` onto `base` following the module's merge rule.
pub fn merge(base: &mut Value, overlay: Value) {
    match (base, overlay) {
        (Value::Object(base), Value::Object(overlay)) => {
            for (key, value) in overlay {
                match base.get_mut(&key) {
                    Some(slot) => merge(slot, value),
                    None => {
                        base.insert(key, value);
                    }
                }
            }
        }
        (slot, value) => *slot = value,
    }
}

/// Why a preset could not be applied.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PresetError {
    /// `preset` holds a name that is not a preset.
    #[error("preset: unknown preset {0}; use one of: vitl14, vitg14")]
    Unknown(String),
}

/// Applies the `preset` named inside a `training` value, if any, under the user's fields.
/// Values that are not mappings are returned unchanged (typed deserialisation reports them).
pub fn apply(training: Value) -> Result<Value, PresetError> {
    let Value::Object(map) = &training else {
        return Ok(training);
    };
    let preset = match map.get("preset") {
        None | Some(Value::Null) => return Ok(training),
        Some(Value::String(s)) => match s.as_str() {
            "vitl14" => Preset::Vitl14,
            "vitg14" => Preset::Vitg14,
            _ => return Err(PresetError::Unknown(format!("{s:?}"))),
        },
        // Let typed deserialisation report the wrong type with its path.
        Some(_) => return Ok(training),
    };
    let mut merged = values(preset);
    merge(&mut merged, training);
    Ok(merged)
}

/// An empty mapping, the `training` value of "all defaults".
pub fn empty() -> Value {
    Value::Object(Map::new())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::training::{Arch, Centering, DatasetKind, FfnLayer, TrainingConfig};
    use serde_json::json;

    fn resolve(v: Value) -> TrainingConfig {
        serde_json::from_value(apply(v).unwrap()).unwrap()
    }

    #[test]
    fn vitl14_preset_sets_every_value_of_the_official_recipe() {
        let c = resolve(json!({"preset": "vitl14"}));
        assert_eq!(c.dino.head_n_prototypes, 131072);
        assert_eq!(c.dino.head_bottleneck_dim, 384);
        assert!(c.ibot.separate_head);
        assert_eq!(c.ibot.head_n_prototypes, 131072);
        assert_eq!(c.train.batch_size_per_gpu, 32);
        assert_eq!(c.data.kind, DatasetKind::Imagenet22k);
        assert_eq!(c.loss.centering, Centering::SinkhornKnopp);
        assert_eq!(c.model.arch, Arch::VitLarge);
        assert_eq!(c.model.patch_size, 14);
        assert_eq!(c.model.drop_path_rate, 0.4);
        assert_eq!(c.model.ffn_layer, FfnLayer::Swiglufused);
        assert_eq!(c.model.block_chunks, 4);
        assert_eq!(c.teacher.momentum_teacher, 0.994);
        assert_eq!(c.optim.epochs, 500);
        assert_eq!(c.optim.weight_decay_end, 0.2);
        assert_eq!(c.optim.base_lr, 2.0e-4);
        assert_eq!(c.optim.warmup_epochs, 80);
        assert_eq!(c.optim.layerwise_decay, 1.0);
        assert_eq!(c.crops.local_crops_size, 98);
        // Keys the recipe leaves alone keep the official defaults.
        assert_eq!(c.crops.global_crops_size, 224);
        assert_eq!(c.optim.weight_decay, 0.04);
        assert_eq!(c.dino.head_hidden_dim, 2048);
    }

    #[test]
    fn vitg14_preset_differs_from_vitl14_only_in_arch_and_batch() {
        let l = resolve(json!({"preset": "vitl14"}));
        let mut g = resolve(json!({"preset": "vitg14"}));
        assert_eq!(g.model.arch, Arch::VitGiant2);
        assert_eq!(g.train.batch_size_per_gpu, 12);
        g.model.arch = l.model.arch;
        g.train.batch_size_per_gpu = l.train.batch_size_per_gpu;
        g.preset = l.preset;
        assert_eq!(g, l);
    }

    #[test]
    fn user_fields_override_the_preset_and_siblings_keep_preset_values() {
        let c = resolve(json!({"preset": "vitl14", "optim": {"epochs": 100}}));
        assert_eq!(c.optim.epochs, 100);
        assert_eq!(c.optim.base_lr, 2.0e-4, "sibling from the preset");
        assert_eq!(c.optim.min_lr, 1.0e-6, "sibling from the defaults");
    }

    #[test]
    fn lists_given_by_the_user_replace_preset_lists_wholesale() {
        let mut base = json!({"a": [1, 2, 3], "m": {"x": 1, "y": 2}});
        merge(&mut base, json!({"a": [9], "m": {"y": 5}}));
        assert_eq!(base, json!({"a": [9], "m": {"x": 1, "y": 5}}));
    }

    #[test]
    fn unknown_preset_is_an_error_that_lists_the_known_ones() {
        let err = apply(json!({"preset": "vitb14"})).unwrap_err();
        assert!(err.to_string().contains("vitl14, vitg14"), "{err}");
    }

    #[test]
    fn every_preset_text_parses() {
        for p in ALL {
            assert!(values(p).is_object(), "{}", name(p));
        }
    }
}
