//! Maps `dinoflow_api::TrainingConfig` onto the trainer modules' own parameter structs, and
//! derives the run's identity (config hash, guarded fields) for checkpoints.
use std::collections::BTreeMap;

use dinoflow_api::TrainingConfig;

use crate::checkpoint::manifest::hash_bytes;
use crate::eval::{EvalConfig, KnnConfig, LinearConfig};

/// sha256 of the canonical JSON of the resolved config (serde_json orders map keys, so equal
/// configs hash equal whatever the YAML's key order).
pub fn config_hash(training: &TrainingConfig) -> String {
    let value = serde_json::to_value(training).expect("configs serialise to JSON");
    hash_bytes(value.to_string().as_bytes())
}

/// The config values whose change would silently change a resumed run: the architecture
/// (backbone and heads), the batch size and the dataset. Keyed by YAML path.
pub fn guarded_fields(training: &TrainingConfig) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    out.insert("training.model".into(), json(&training.model));
    out.insert("training.dino".into(), json(&training.dino));
    out.insert("training.ibot".into(), json(&training.ibot));
    out.insert("training.train.batchSizePerGpu".into(), training.train.batch_size_per_gpu.to_string());
    out.insert("training.data.kind".into(), json(&training.data.kind));
    out.insert("training.data.path".into(), training.data.path.clone());
    out
}

fn json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("config sections serialise to JSON")
}

/// The evaluation hooks' settings, or None when both k-NN and the linear probe are off.
pub fn eval_config(training: &TrainingConfig, num_classes: i64) -> Option<EvalConfig> {
    let e = &training.evaluation;
    if !e.knn.enabled && !e.linear_probe.enabled {
        return None;
    }
    Some(EvalConfig {
        num_classes,
        knn: KnnConfig {
            ks: if e.knn.enabled { e.knn.k.iter().map(|&k| k as usize).collect() } else { Vec::new() },
            temperature: e.knn.temperature,
            ..KnnConfig::default()
        },
        linear: e.linear_probe.enabled.then(|| LinearConfig {
            learning_rates: e.linear_probe.learning_rates.clone(),
            epochs: e.linear_probe.epochs as usize,
            batch_size: i64::from(e.linear_probe.batch_size),
            seed: training.train.seed as i64,
            ..LinearConfig::default()
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_configs_hash_equal_and_a_changed_lr_changes_the_hash() {
        let a = TrainingConfig::default();
        let mut b = TrainingConfig::default();
        assert_eq!(config_hash(&a), config_hash(&b));
        b.optim.base_lr *= 2.0;
        assert_ne!(config_hash(&a), config_hash(&b));
        // The learning rate is not guarded: changing it on resume is a deliberate choice.
        assert_eq!(guarded_fields(&a), guarded_fields(&b));
    }

    #[test]
    fn batch_size_and_dataset_are_guarded() {
        let a = TrainingConfig::default();
        let mut b = TrainingConfig::default();
        b.train.batch_size_per_gpu += 1;
        b.data.path = "/other".into();
        let (ga, gb) = (guarded_fields(&a), guarded_fields(&b));
        assert_ne!(ga["training.train.batchSizePerGpu"], gb["training.train.batchSizePerGpu"]);
        assert_ne!(ga["training.data.path"], gb["training.data.path"]);
    }

    #[test]
    fn official_knn_settings_map_through() {
        let cfg = eval_config(&TrainingConfig::default(), 10).unwrap();
        assert_eq!(cfg.knn.ks, [10, 20, 100, 200]);
        assert_eq!(cfg.knn.temperature, 0.07);
    }
}
