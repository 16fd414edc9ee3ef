//! Where to resume from, and whether a checkpoint may be resumed under the current config.
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::str::FromStr;

use super::{CheckpointError, Manifest};

/// `--resume auto|never|PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResumeMode {
    /// Newest checkpoint in the output directory that verifies, else a fresh start.
    Auto,
    /// Always start fresh (existing checkpoints are left alone and later overwritten by
    /// iteration number).
    Never,
    /// Exactly this checkpoint directory; failing to verify it is an error.
    Path(PathBuf),
}

impl FromStr for ResumeMode {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "auto" => Self::Auto,
            "never" => Self::Never,
            other => Self::Path(PathBuf::from(other)),
        })
    }
}

/// Compares the guarded config values stored in `manifest` with the current ones. Returns
/// the differences as warnings when `force` is set, an `Incompatible` error otherwise.
pub fn check_compatible(
    manifest: &Manifest,
    path: &std::path::Path,
    current: &BTreeMap<String, String>,
    force: bool,
) -> Result<Vec<String>, CheckpointError> {
    let mut diffs = Vec::new();
    let keys: std::collections::BTreeSet<&String> =
        manifest.guarded.keys().chain(current.keys()).collect();
    for key in keys {
        let old = manifest.guarded.get(key);
        let new = current.get(key);
        if old != new {
            diffs.push(format!(
                "{key}: checkpoint has {}, config has {}",
                old.map_or("<unset>", String::as_str),
                new.map_or("<unset>", String::as_str)
            ));
        }
    }
    if diffs.is_empty() || force {
        Ok(diffs)
    } else {
        Err(CheckpointError::Incompatible {
            path: path.to_path_buf(),
            diffs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest_with(guarded: &[(&str, &str)]) -> Manifest {
        Manifest {
            format: super::super::manifest::FORMAT.into(),
            iteration: 1,
            world_size: 1,
            config_hash: String::new(),
            guarded: guarded
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            created_unix: 0,
            files: BTreeMap::new(),
            job: None,
            shards: Vec::new(),
        }
    }

    #[test]
    fn resume_mode_parses_keywords_and_paths() {
        assert_eq!("auto".parse::<ResumeMode>().unwrap(), ResumeMode::Auto);
        assert_eq!("never".parse::<ResumeMode>().unwrap(), ResumeMode::Never);
        assert_eq!(
            "/x/ckpt-000000010".parse::<ResumeMode>().unwrap(),
            ResumeMode::Path("/x/ckpt-000000010".into())
        );
    }

    #[test]
    fn changed_batch_size_is_refused_without_force_and_named() {
        let m = manifest_with(&[("training.train.batchSizePerGpu", "64")]);
        let now: BTreeMap<String, String> = [(
            "training.train.batchSizePerGpu".to_string(),
            "32".to_string(),
        )]
        .into();
        let err = check_compatible(&m, "/c".as_ref(), &now, false).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("training.train.batchSizePerGpu: checkpoint has 64, config has 32"));
        assert!(msg.contains("--force"));
        let warnings = check_compatible(&m, "/c".as_ref(), &now, true).unwrap();
        assert_eq!(warnings.len(), 1);
    }

    #[test]
    fn identical_guarded_values_resume_silently() {
        let m = manifest_with(&[("training.model", "vit_small/16")]);
        let now: BTreeMap<String, String> =
            [("training.model".to_string(), "vit_small/16".to_string())].into();
        assert!(
            check_compatible(&m, "/c".as_ref(), &now, false)
                .unwrap()
                .is_empty()
        );
    }
}
