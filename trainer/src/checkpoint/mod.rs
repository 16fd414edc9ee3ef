//! Checkpoints: one directory per iteration (`ckpt-000001234`), written into a temporary
//! directory first, sealed by a manifest with checksums written last, and made visible by an
//! atomic rename. A reader only trusts a directory whose manifest verifies.
mod manager;
pub mod manifest;
mod resume;

use std::path::{Path, PathBuf};

pub use manager::{CheckpointManager, Rejected, Scan, Snapshot, VerifiedCheckpoint, verify};
pub use manifest::Manifest;
pub use resume::{ResumeMode, check_compatible};

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: corrupt checkpoint: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("{path}: {source}")]
    Tensor {
        path: PathBuf,
        #[source]
        source: tch::TchError,
    },
    #[error("{path}: no verified checkpoint there")]
    NotFound { path: PathBuf },
    #[error(
        "refusing to resume from {path}: the config changed in ways that would silently change the run: {}. Pass --force to resume anyway, or --resume never to start fresh",
        .diffs.join("; ")
    )]
    Incompatible { path: PathBuf, diffs: Vec<String> },
}

impl CheckpointError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}
