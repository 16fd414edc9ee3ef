//! Checkpoints: one directory per iteration (`ckpt-000001234`), written into a temporary
//! directory first, sealed by a manifest with checksums written last, and made visible by an
//! atomic rename. A reader only trusts a directory whose manifest verifies.
//!
//! Every rank writes its own shard (chunks of the tensors it holds, `shard`) at the same
//! time; after all ranks are done, rank 0 seals the manifest over every shard. A reader
//! ([`CheckpointReader`]) serves any range of any tensor from whichever shards cover it, so
//! a run resumes under another world size or sharding (`reader`).
mod best;
pub mod chunk;
mod manager;
pub mod manifest;
mod reader;
mod resume;
pub mod shard;
mod tensor_file;

use std::path::{Path, PathBuf};

pub use best::BestCheckpoint;
pub use chunk::{Chunk, ChunkSource};
pub use manager::{CheckpointManager, Rejected, Scan, Snapshot, VerifiedCheckpoint, verify};
pub use manifest::Manifest;
pub use reader::CheckpointReader;
pub use resume::{ResumeMode, check_compatible};
pub use shard::{ShardSnapshot, split_replicated};

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
    #[error("{path}: corrupt checkpoint: {what}: {source}")]
    CorruptJson {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    /// A file the manifest lists cannot be read: missing or refused (the checkpoint is
    /// incomplete, a restart meets the same), or an I/O error a restart may not meet again
    /// ([`Self::is_unreadable_for_now`]).
    #[error("{path}: cannot read a file the checkpoint's manifest lists: {source}")]
    Unreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Tensor {
        path: PathBuf,
        #[source]
        source: tch::TchError,
    },
    #[error("{path}: {source}")]
    Serialize {
        path: PathBuf,
        #[source]
        source: safetensors::SafeTensorError,
    },
    #[error("{path}: tensor {name} has kind {kind:?}, which a checkpoint cannot hold")]
    Unsupported {
        path: PathBuf,
        name: String,
        kind: tch::Kind,
    },
    /// Retryable (the operator resumes from the last verified checkpoint), but a restart
    /// only helps once there is room.
    #[error(
        "{path}: No space left on device for the checkpoint of iteration {iteration} ({source}). Free space on that volume or point training.output.dir (--output-dir) at a larger one; the checkpoints written before are kept and a restart resumes from the newest"
    )]
    NoSpace {
        iteration: u64,
        path: PathBuf,
        #[source]
        source: Box<CheckpointError>,
    },
    #[error("{path}: no verified checkpoint there")]
    NotFound { path: PathBuf },
    /// The files verify but do not belong together: bad input, never skipped silently (a
    /// fallback to an older checkpoint would later overwrite this one).
    #[error(
        "{path}: the shards of this checkpoint disagree: {detail}. The directory mixes files of different runs or iterations (copied or restored by hand): restore it as one whole from where it was written, or resume from another checkpoint with --resume PATH; nothing was overwritten"
    )]
    ShardsDisagree { path: PathBuf, detail: String },
    #[error(
        "{path}: tensor {name}: {detail}. The checkpoint does not hold the state this model needs: resume it with the model config it was written with, or start fresh with --resume never"
    )]
    NotCovered {
        path: PathBuf,
        name: String,
        detail: String,
    },
    /// Another rank failed its part of a sharded write (its own error is in its log).
    #[error(
        "checkpoint of iteration {iteration}: {detail}; the checkpoints written before are kept"
    )]
    PeerFailed { iteration: u64, detail: String },
    #[error(
        "refusing to resume from {path}: the config changed in ways that would silently change the run: {}. Pass --force to resume anyway, or --resume never to start fresh",
        .diffs.join("; ")
    )]
    Incompatible { path: PathBuf, diffs: Vec<String> },
}

impl CheckpointError {
    /// ENOSPC (or a quota) somewhere in a write, by the I/O error's kind (tensor files are
    /// written through `std::fs` for that, see `tensor_file`).
    pub fn is_storage_full(&self) -> bool {
        match self {
            Self::Io { source, .. } => {
                matches!(
                    source.kind(),
                    std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
                )
            }
            Self::NoSpace { .. } => true,
            _ => false,
        }
    }

    /// A listed file that could not be read for a reason other than its absence or its
    /// permissions (EIO, a stale NFS handle, a timeout): no evidence that the checkpoint is
    /// corrupt, so a restart is worth it.
    pub fn is_unreadable_for_now(&self) -> bool {
        match self {
            Self::Unreadable { source, .. } => !matches!(
                source.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied
            ),
            _ => false,
        }
    }

    /// A checkpoint that verifies but is not one consistent whole, or does not hold the
    /// state asked of it: refused (exit 78), never skipped for an older one.
    pub fn is_bad_input(&self) -> bool {
        matches!(self, Self::ShardsDisagree { .. } | Self::NotCovered { .. })
    }

    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

#[cfg(test)]
mod tests;
