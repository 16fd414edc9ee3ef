//! `dinoflow-trainer export` and `eval`: the trained backbone outside the training loop.
//!
//! Both start from a [`BackboneSource`]: the final backbone of a verified checkpoint (the EMA
//! teacher of pretraining, the model DINOv2 releases and evaluates; the student EMA of
//! distillation), or a weights file (an official `.pth`, an official
//! `teacher_checkpoint.pth`, or an earlier export). `export` writes it as safetensors under the
//! official hub key names (`cls_token`, `blocks.0.attn.qkv.weight`, ...), so
//! `model.load_state_dict(safetensors.torch.load_file(path))` works on the official
//! `vit_small`/`vit_base`/... of the same architecture; `eval` runs the k-NN and linear-probe
//! hooks on it.

use std::path::{Path, PathBuf};

use dinoflow_api::{ConfigError, TrainingConfig};
use tch::{Device, Kind, Tensor, nn};

use crate::checkpoint::{self, CheckpointError, CheckpointManager, VerifiedCheckpoint};
use crate::cli::BackboneArgs;
use crate::config::{self, MappingError};
use crate::model::{DinoVisionTransformer, ModelError};
use crate::weights::{self, StateDict, WeightsError};

/// Why a backbone could not be found, loaded or written. Every case is one a retry cannot fix.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("--checkpoint: {0}")]
    Checkpoint(#[source] CheckpointError),
    /// Scanning or loading the checkpoints of the output directory.
    #[error(transparent)]
    Checkpoints(CheckpointError),
    #[error(
        "no verified checkpoint under {}: train first, or pass --checkpoint DIR or --weights FILE",
        .root.display()
    )]
    NoCheckpoint { root: PathBuf },
    #[error(
        "checkpoint {} holds none of the tensor groups {:?}; it was not written by dinoflow-trainer train or distill",
        .path.display(),
        FINAL_MODEL_GROUPS
    )]
    NoFinalModel { path: PathBuf },
    #[error("--weights: {0}")]
    Weights(#[source] WeightsError),
    #[error("training.model: {0}")]
    Architecture(#[source] MappingError),
    #[error("training.model: {0}")]
    Model(#[source] ModelError),
    #[error(
        "the weights do not fit training.model: {0}. Use the --config of the job that produced them"
    )]
    Mismatch(#[source] WeightsError),
    /// The training precision (it sets the evaluation's compute kind).
    #[error(transparent)]
    Precision(MappingError),
    #[error("--out {}: the export is safetensors; name the file *.safetensors", .0.display())]
    NotSafetensors(PathBuf),
    #[error("--out {}: cannot write: {source}. Choose a writable location", .path.display())]
    Unwritable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--out {}: cannot write: {source}. Choose a writable location", .path.display())]
    WriteFailed {
        path: PathBuf,
        #[source]
        source: WeightsError,
    },
    #[error("--out {}: read-back failed: {source}", .path.display())]
    ReadBack {
        path: PathBuf,
        #[source]
        source: WeightsError,
    },
    #[error("--out {}: read-back differs: {key}", .path.display())]
    ReadBackDiffers { path: PathBuf, key: String },
}

/// Checkpoint tensor groups (`Trainable::state`) holding the final model, by preference: a
/// pretraining run's EMA teacher, a distillation run's student EMA, else its student
/// (`spec.distillation.studentEma: false`).
const FINAL_MODEL_GROUPS: [&str; 3] = ["teacher", crate::distill::model::STUDENT_EMA, "student"];
/// Prefix of the backbone's variables inside the teacher network.
const BACKBONE_PREFIX: &str = "backbone.";

/// Where the backbone comes from.
#[derive(Debug)]
pub enum BackboneSource {
    Checkpoint(VerifiedCheckpoint),
    Weights(PathBuf),
}

impl BackboneSource {
    /// `--weights`, else `--checkpoint` (verified), else the newest verified checkpoint under
    /// `<output dir>/checkpoints`.
    pub fn resolve(args: &BackboneArgs, training: &TrainingConfig) -> Result<Self, ExportError> {
        if let Some(path) = &args.weights {
            return Ok(Self::Weights(path.clone()));
        }
        if let Some(path) = &args.checkpoint {
            return checkpoint::verify(path)
                .map(Self::Checkpoint)
                .map_err(ExportError::Checkpoint);
        }
        let root = output_dir(args, training).join("checkpoints");
        let latest =
            CheckpointManager::newest_verified_in(&root).map_err(ExportError::Checkpoints)?;
        latest
            .map(Self::Checkpoint)
            .ok_or(ExportError::NoCheckpoint { root })
    }

    /// A short name for logs and reports: the checkpoint directory or the weights file.
    pub fn describe(&self) -> String {
        match self {
            Self::Checkpoint(c) => c.path.display().to_string(),
            Self::Weights(p) => p.display().to_string(),
        }
    }

    /// The training iteration of a checkpoint; None for a weights file.
    pub fn iteration(&self) -> Option<u64> {
        match self {
            Self::Checkpoint(c) => Some(c.manifest.iteration),
            Self::Weights(_) => None,
        }
    }

    /// The backbone's tensors under the official hub key names.
    pub fn state_dict(&self) -> Result<StateDict, ExportError> {
        match self {
            Self::Checkpoint(c) => {
                let mut snapshot = CheckpointManager::load(c).map_err(ExportError::Checkpoints)?;
                let group = FINAL_MODEL_GROUPS
                    .iter()
                    .find_map(|g| snapshot.tensors.remove(*g))
                    .ok_or_else(|| ExportError::NoFinalModel {
                        path: c.path.clone(),
                    })?;
                Ok(group
                    .into_iter()
                    .filter_map(|(k, t)| k.strip_prefix(BACKBONE_PREFIX).map(|k| (k.into(), t)))
                    .collect())
            }
            Self::Weights(path) => weights::read_state_dict(path)
                .map(|sd| weights::backbone_state_dict(&sd))
                .map_err(ExportError::Weights),
        }
    }
}

/// `training.output.dir`, or `--output-dir` when given (as `train` resolves it).
pub fn output_dir(args: &BackboneArgs, training: &TrainingConfig) -> PathBuf {
    args.output_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(&training.output.dir))
}

/// A backbone of `training.model` (no stochastic depth: it is only evaluated) holding `sd`.
/// Strict: a state dict of another architecture fails, listing every differing key.
pub fn load_backbone(
    training: &TrainingConfig,
    sd: &StateDict,
    device: Device,
) -> Result<(nn::VarStore, DinoVisionTransformer), ExportError> {
    let vit = config::vit_config(training).map_err(ExportError::Architecture)?;
    let vit = crate::model::VitConfig {
        drop_path_rate: 0.0,
        ..vit
    };
    let mut vs = nn::VarStore::new(device);
    let backbone = DinoVisionTransformer::new(&vs.root(), &vit).map_err(ExportError::Model)?;
    weights::load_state_dict(&vs, sd).map_err(ExportError::Mismatch)?;
    vs.freeze();
    Ok((vs, backbone))
}

/// Writes `sd` to `out` as safetensors atomically: a temporary file in the same directory is
/// written, read back and compared bitwise, then renamed, so `out` is either absent, the old
/// file, or a complete verified export.
pub fn write_verified(sd: &StateDict, out: &Path) -> Result<(), ExportError> {
    let dir = out.parent().filter(|p| !p.as_os_str().is_empty());
    let dir = dir.unwrap_or(Path::new("."));
    let path = || out.to_path_buf();
    let unwritable = |source| ExportError::Unwritable {
        path: path(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(unwritable)?;
    // Same directory (the rename stays atomic), same extension (the reader picks the format).
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(
        ".tmp-{}-{}",
        std::process::id(),
        name.unwrap_or_default()
    ));
    let result = (|| {
        weights::write_safetensors(sd, &tmp).map_err(|source| ExportError::WriteFailed {
            path: path(),
            source,
        })?;
        let back = weights::read_state_dict(&tmp).map_err(|source| ExportError::ReadBack {
            path: path(),
            source,
        })?;
        if let Some(key) = first_difference(sd, &back) {
            return Err(ExportError::ReadBackDiffers { path: path(), key });
        }
        std::fs::rename(&tmp, out).map_err(unwritable)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The first key whose tensor is missing from `b` or differs from `a`'s bitwise.
fn first_difference(a: &StateDict, b: &StateDict) -> Option<String> {
    if a.len() != b.len() {
        return Some(format!("{} tensors written, {} read", a.len(), b.len()));
    }
    a.iter()
        .find(|(k, t)| {
            b.get(*k)
                .is_none_or(|u| u.kind() != t.kind() || !u.equal(&t.to_device(u.device())))
        })
        .map(|(k, _)| k.clone())
}

/// `dinoflow-trainer export`: the backbone as fp32 safetensors with the official key names.
/// Returns the number of tensors written.
pub fn export(args: &BackboneArgs, out: &Path) -> Result<usize, ExportError> {
    if out.extension().is_none_or(|e| e != "safetensors") {
        return Err(ExportError::NotSafetensors(out.to_path_buf()));
    }
    let training = dinoflow_api::load_training_config(&args.config)?.training;
    let source = BackboneSource::resolve(args, &training)?;
    let sd = source.state_dict()?;
    // Loading proves the tensors make up a whole backbone of the configured architecture.
    let (vs, _) = load_backbone(&training, &sd, Device::Cpu)?;
    let sd = weights::export_state_dict(&vs, "");
    write_verified(&sd, out)?;
    tracing::info!(
        source = %source.describe(),
        out = %out.display(),
        tensors = sd.len(),
        parameters = sd.values().map(Tensor::numel).sum::<usize>(),
        "exported the final backbone"
    );
    Ok(sd.len())
}

/// `Kind` the evaluation runs in: the training precision's compute kind.
pub fn compute_kind(training: &TrainingConfig) -> Result<Kind, ExportError> {
    config::meta_arch_config(training)
        .map(|c| c.precision.compute_kind())
        .map_err(ExportError::Precision)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sd(values: &[(&str, &[f32])]) -> StateDict {
        values
            .iter()
            .map(|(k, v)| (k.to_string(), Tensor::from_slice(v)))
            .collect()
    }

    #[test]
    fn a_verified_write_round_trips_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("sub/backbone.safetensors");
        let a = sd(&[("cls_token", &[1.0, 2.0]), ("norm.bias", &[0.5])]);
        write_verified(&a, &out).unwrap();
        let back = weights::read_state_dict(&out).unwrap();
        assert_eq!(first_difference(&a, &back), None);
        let left: Vec<_> = std::fs::read_dir(out.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("backbone.safetensors")]);
    }

    #[test]
    fn differences_name_the_first_differing_tensor() {
        let a = sd(&[("a", &[1.0]), ("b", &[2.0])]);
        assert_eq!(
            first_difference(&a, &sd(&[("a", &[1.0]), ("b", &[2.5])])),
            Some("b".into())
        );
        assert!(first_difference(&a, &sd(&[("a", &[1.0])])).is_some());
        assert_eq!(
            first_difference(&a, &sd(&[("a", &[1.0]), ("b", &[2.0])])),
            None
        );
    }

    #[test]
    fn an_unwritable_destination_is_an_error_naming_out_with_its_io_cause() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a-file");
        std::fs::write(&file, b"x").unwrap();
        let err = write_verified(&sd(&[("a", &[1.0])]), &file.join("b.safetensors")).unwrap_err();
        assert!(matches!(err, ExportError::Unwritable { .. }), "{err}");
        assert!(err.to_string().contains("--out"), "{err}");
    }
}
