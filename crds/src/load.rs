//! Loading the trainer configuration from YAML: a bare `training:` block, a bare
//! `TrainingConfig`, or a whole `PretrainJob`/`DistillJob` manifest. The preset is merged first
//! (see [`crate::presets`]), then defaults fill in, then every rule of
//! [`crate::training::rules`] runs: the trainer refuses what the API server refuses.
//!
//! Errors name the YAML path (`spec.training.optim.baseLr: must be > 0, got -1; ...`); all of
//! them are permanent failures ([`ConfigError::exit_code`]).

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use crate::cluster::ClusterSpec;
use crate::distill::{DistillJobSpec, DistillationConfig, TeacherSource};
use crate::exit_codes;
use crate::presets::{self, PresetError};
use crate::pretrain::PretrainJobSpec;
use crate::training::TrainingConfig;

/// The API group/version our manifests carry.
pub const API_VERSION: &str = "dinoflow.dev/v1alpha1";

/// What kind of document the config came from.
#[derive(Debug, Clone, PartialEq)]
pub enum ConfigSource {
    /// A bare `training:` block or a bare `TrainingConfig`.
    Training,
    /// A `PretrainJob` manifest.
    PretrainJob {
        /// `metadata.name`, if given.
        name: Option<String>,
    },
    /// A `DistillJob` manifest.
    DistillJob {
        /// `metadata.name`, if given.
        name: Option<String>,
    },
}

/// A fully resolved configuration: preset applied, defaults filled in, every rule passed.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedConfig {
    /// Where it came from.
    pub source: ConfigSource,
    /// The training configuration.
    pub training: TrainingConfig,
    /// `spec.cluster` of a manifest.
    pub cluster: Option<ClusterSpec>,
    /// `spec.teacher` of a DistillJob.
    pub teacher: Option<TeacherSource>,
    /// `spec.distillation` of a DistillJob.
    pub distillation: Option<DistillationConfig>,
}

/// One failed rule, at a YAML path.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldError {
    /// YAML path (`spec.training.optim.baseLr`).
    pub path: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Not YAML.
    #[error("config is not valid YAML: {0}")]
    Yaml(String),
    /// A value has the wrong type, an unknown field, or an unknown enum value.
    #[error("{0}")]
    Field(FieldError),
    /// One or more rules failed (all are listed).
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<FieldError>),
}

impl ConfigError {
    /// Every config error is permanent: retrying cannot fix the file.
    pub fn exit_code(&self) -> i32 {
        exit_codes::PERMANENT_FAILURE
    }

    /// The field errors (one for `Field`, all for `Invalid`).
    pub fn field_errors(&self) -> Vec<FieldError> {
        match self {
            ConfigError::Field(e) => vec![e.clone()],
            ConfigError::Invalid(all) => all.clone(),
            _ => Vec::new(),
        }
    }

    fn at(path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Field(FieldError {
            path: path.into(),
            message: message.into(),
        })
    }
}

/// Loads and resolves a config file.
pub fn load_training_config(path: impl AsRef<Path>) -> Result<ResolvedConfig, ConfigError> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    load_training_config_str(&text)
}

/// Loads and resolves a config from YAML text.
pub fn load_training_config_str(text: &str) -> Result<ResolvedConfig, ConfigError> {
    let doc: Value = serde_yaml_ng::from_str(text).map_err(|e| ConfigError::Yaml(e.to_string()))?;
    let Value::Object(mut top) = doc else {
        return Err(ConfigError::at(
            ".",
            "expected a mapping: a `training:` block, a TrainingConfig, or a PretrainJob/DistillJob manifest",
        ));
    };
    if let Some(kind) = top.get("kind").cloned() {
        return load_manifest(top, kind);
    }
    if top.len() == 1
        && let Some(training) = top.remove("training")
    {
        let training = resolve_training(training, "training")?;
        return Ok(ResolvedConfig {
            source: ConfigSource::Training,
            training,
            cluster: None,
            teacher: None,
            distillation: None,
        });
    }
    let training = resolve_training(Value::Object(top), "training")?;
    Ok(ResolvedConfig {
        source: ConfigSource::Training,
        training,
        cluster: None,
        teacher: None,
        distillation: None,
    })
}

fn load_manifest(
    mut top: serde_json::Map<String, Value>,
    kind: Value,
) -> Result<ResolvedConfig, ConfigError> {
    let kind = kind.as_str().unwrap_or_default().to_string();
    if kind != "PretrainJob" && kind != "DistillJob" {
        return Err(ConfigError::at(
            "kind",
            format!("expected PretrainJob or DistillJob, got {kind:?}"),
        ));
    }
    match top.get("apiVersion").and_then(Value::as_str) {
        Some(API_VERSION) => {}
        other => {
            return Err(ConfigError::at(
                "apiVersion",
                format!("expected {API_VERSION}, got {other:?}"),
            ));
        }
    }
    let name = top
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .map(str::to_string);
    let Some(Value::Object(mut spec)) = top.remove("spec") else {
        return Err(ConfigError::at(
            "spec",
            "required; a job needs spec.training",
        ));
    };
    let Some(training) = spec.remove("training") else {
        return Err(ConfigError::at(
            "spec.training",
            "required; give at least training.data.path",
        ));
    };
    let training = resolve_training(training, "spec.training")?;
    // The rest of the spec is checked with the real spec types; `training` is already typed, so
    // a placeholder stands in for it.
    spec.insert("training".into(), Value::Object(Default::default()));
    let spec = Value::Object(spec);
    if kind == "PretrainJob" {
        let parsed: PretrainJobSpec = typed(spec, "spec")?;
        Ok(ResolvedConfig {
            source: ConfigSource::PretrainJob { name },
            training,
            cluster: Some(parsed.cluster),
            teacher: None,
            distillation: None,
        })
    } else {
        let parsed: DistillJobSpec = typed(spec, "spec")?;
        let errors: Vec<FieldError> = parsed
            .teacher
            .violations()
            .into_iter()
            .map(|v| FieldError {
                path: format!("spec.{}", v.field),
                message: v.message,
            })
            .collect();
        if !errors.is_empty() {
            return Err(ConfigError::Invalid(errors));
        }
        Ok(ResolvedConfig {
            source: ConfigSource::DistillJob { name },
            training,
            cluster: Some(parsed.cluster),
            teacher: Some(parsed.teacher),
            distillation: Some(parsed.distillation),
        })
    }
}

/// Deserialises with serde_path_to_error, reporting the failing path under `prefix`.
fn typed<T: serde::de::DeserializeOwned>(value: Value, prefix: &str) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let full = if path == "." {
            prefix.to_string()
        } else {
            format!("{prefix}.{path}")
        };
        ConfigError::at(full, e.into_inner().to_string())
    })
}

/// Merges the preset, deserialises (defaults fill in), then checks every rule.
pub fn resolve_training(value: Value, prefix: &str) -> Result<TrainingConfig, ConfigError> {
    let cfg = parse_training(value, prefix)?;
    let errors: Vec<FieldError> = cfg
        .violations()
        .into_iter()
        .map(|v| FieldError {
            path: format!("{prefix}.{}", v.field),
            message: v.message,
        })
        .collect();
    if errors.is_empty() {
        Ok(cfg)
    } else {
        Err(ConfigError::Invalid(errors))
    }
}

/// Merges the preset and deserialises, without the rule checks.
fn parse_training(value: Value, prefix: &str) -> Result<TrainingConfig, ConfigError> {
    let value = if value.is_null() {
        presets::empty()
    } else {
        value
    };
    let merged = presets::apply(value).map_err(|e| match e {
        PresetError::Unknown(name) => ConfigError::at(
            format!("{prefix}.preset"),
            format!("unknown preset {name}; use one of: vitl14, vitg14"),
        ),
    })?;
    typed(merged, prefix)
}

/// `deserialize_with` of the job specs' `training` field: applies the preset before typed
/// deserialisation, so a job read from the API server carries its resolved config. Rules are
/// not checked here (the API server already did).
pub fn deserialize_training<'de, D: Deserializer<'de>>(d: D) -> Result<TrainingConfig, D::Error> {
    let value = Value::deserialize(d)?;
    parse_training(value, "training").map_err(serde::de::Error::custom)
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Rendered<'a> {
    training: &'a TrainingConfig,
    #[serde(skip_serializing_if = "Option::is_none")]
    teacher: Option<&'a TeacherSource>,
    #[serde(skip_serializing_if = "Option::is_none")]
    distillation: Option<&'a DistillationConfig>,
}

/// The resolved config as YAML (every field explicit), for `dinoflow-trainer validate`. The
/// output loads back to the same config.
pub fn render_yaml(cfg: &ResolvedConfig) -> String {
    let doc = Rendered {
        training: &cfg.training,
        teacher: cfg.teacher.as_ref(),
        distillation: cfg.distillation.as_ref(),
    };
    serde_yaml_ng::to_string(&doc).expect("configs serialise to YAML")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::training::{Arch, Preset};
    use std::path::PathBuf;

    fn repo(rel: &str) -> PathBuf {
        PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/..")).join(rel)
    }

    fn err_text(yaml: &str) -> String {
        load_training_config_str(yaml).unwrap_err().to_string()
    }

    #[test]
    fn a_bare_training_block_resolves_with_defaults() {
        let r = load_training_config_str("training:\n  data: {path: /d}\n").unwrap();
        assert_eq!(r.source, ConfigSource::Training);
        assert_eq!(r.training.optim.base_lr, 0.004);
        assert_eq!(r.training.data.path, "/d");
    }

    #[test]
    fn a_bare_training_config_resolves_like_the_block() {
        let bare = load_training_config_str("data: {path: /d}\noptim: {epochs: 70}\n").unwrap();
        let block =
            load_training_config_str("training:\n  data: {path: /d}\n  optim: {epochs: 70}\n")
                .unwrap();
        assert_eq!(bare, block);
    }

    #[test]
    fn a_manifest_resolves_preset_then_user_fields() {
        let r = load_training_config_str(
            "apiVersion: dinoflow.dev/v1alpha1\nkind: PretrainJob\nmetadata: {name: x}\nspec:\n  training:\n    preset: vitl14\n    optim: {epochs: 200}\n    data: {path: /d}\n  cluster: {nodes: 2, gpusPerNode: 8}\n",
        )
        .unwrap();
        assert_eq!(
            r.source,
            ConfigSource::PretrainJob {
                name: Some("x".into())
            }
        );
        assert_eq!(r.training.preset, Some(Preset::Vitl14));
        assert_eq!(r.training.optim.epochs, 200);
        assert_eq!(r.training.optim.warmup_epochs, 80);
        assert_eq!(r.training.model.patch_size, 14);
        assert_eq!(r.cluster.unwrap().nodes, 2);
    }

    #[test]
    fn bad_value_error_names_the_yaml_path_the_value_and_the_fix() {
        let e = err_text("training:\n  optim: {baseLr: -1}\n  data: {path: /d}\n");
        assert!(
            e.contains("training.optim.baseLr: must be > 0, got -1;"),
            "{e}"
        );
        let e = err_text(
            "apiVersion: dinoflow.dev/v1alpha1\nkind: PretrainJob\nspec:\n  training:\n    optim: {baseLr: -1}\n    data: {path: /d}\n",
        );
        assert!(
            e.contains("spec.training.optim.baseLr: must be > 0, got -1;"),
            "{e}"
        );
    }

    #[test]
    fn unknown_field_error_names_its_full_path() {
        let e = err_text("training:\n  optim: {baseLR: 0.1}\n  data: {path: /d}\n");
        assert!(e.contains("training.optim.baseLR"), "{e}");
        assert!(e.contains("unknown field"), "{e}");
    }

    #[test]
    fn wrong_type_error_names_its_path() {
        let e = err_text("training:\n  crops: {localCropsNumber: many}\n  data: {path: /d}\n");
        assert!(
            e.starts_with("training.crops.localCropsNumber: invalid type"),
            "{e}"
        );
        let e = err_text("training:\n  curriculum: {phases: [{startEpoch: x}]}\n");
        assert!(
            e.starts_with("training.curriculum.phases[0].startEpoch:"),
            "{e}"
        );
    }

    #[test]
    fn every_violation_is_reported_not_only_the_first() {
        let err = load_training_config_str("training:\n  optim: {baseLr: 0, warmupEpochs: 500}\n")
            .unwrap_err();
        let paths: Vec<String> = err.field_errors().into_iter().map(|e| e.path).collect();
        for p in [
            "training.optim.baseLr",
            "training.optim.warmupEpochs",
            "training.data.path",
        ] {
            assert!(paths.iter().any(|x| x == p), "{p} missing from {paths:?}");
        }
        assert_eq!(err.exit_code(), 78);
    }

    #[test]
    fn a_manifest_of_another_kind_or_version_is_refused() {
        assert!(err_text("apiVersion: v1\nkind: ConfigMap\n").starts_with("kind:"));
        assert!(
            err_text("apiVersion: dinoflow.dev/v2\nkind: PretrainJob\nspec: {training: {}}\n")
                .starts_with("apiVersion:")
        );
    }

    #[test]
    fn rendered_yaml_loads_back_to_the_same_config() {
        for name in [
            "tiny-cpu-fashion-mnist",
            "vitl14-12x8",
            "distill-vitg14-to-vits14",
        ] {
            let r = load_training_config(repo(&format!("manifests/examples/{name}.yaml"))).unwrap();
            // The `training` block of the rendering loads back on its own (teacher and
            // distillation are printed for information only).
            let rendered: Value = serde_yaml_ng::from_str(&render_yaml(&r)).unwrap();
            let block =
                serde_yaml_ng::to_string(&serde_json::json!({"training": rendered["training"]}))
                    .unwrap();
            let again = load_training_config_str(&block).unwrap();
            assert_eq!(again.training, r.training, "{name}");
        }
    }

    #[test]
    fn examples_load_with_the_intended_settings() {
        let tiny = load_training_config(repo("manifests/examples/tiny-cpu-fashion-mnist.yaml"))
            .unwrap()
            .training;
        assert_eq!(tiny.model.arch, Arch::Custom);
        assert_eq!(
            tiny.data.path,
            "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"
        );
        let big = load_training_config(repo("manifests/examples/vitl14-12x8.yaml")).unwrap();
        assert_eq!(
            big.cluster.as_ref().map(|c| (c.nodes, c.gpus_per_node)),
            Some((12, 8))
        );
        assert_eq!(big.training.optim.epochs, 500);
        let distill =
            load_training_config(repo("manifests/examples/distill-vitg14-to-vits14.yaml")).unwrap();
        assert_eq!(distill.training.model.arch, Arch::VitSmall);
        assert!(distill.teacher.unwrap().checkpoint.is_some());
    }

    /// Each `tests/data/invalid/*.yaml` (except the operator's `cluster-*` cases) must be
    /// refused by the trainer too, with a message holding the file's `# expect:` text.
    #[test]
    fn every_invalid_manifest_is_refused_with_the_expected_message() {
        let dir = repo("tests/data/invalid");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            if !name.ends_with(".yaml") || name.starts_with("cluster-") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let expect = text
                .lines()
                .next()
                .and_then(|l| l.strip_prefix("# expect: "))
                .unwrap_or_else(|| panic!("{name}: first line must be `# expect: ...`"));
            match load_training_config_str(&text) {
                Ok(_) => panic!("{name}: accepted, expected an error containing {expect:?}"),
                Err(e) => {
                    let msg = e.to_string();
                    assert!(msg.contains(expect), "{name}: {msg:?} lacks {expect:?}");
                }
            }
            seen += 1;
        }
        assert!(seen >= 22, "only {seen} invalid cases");
    }
}
