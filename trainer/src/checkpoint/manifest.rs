//! The manifest: the last file written into a checkpoint directory. It lists every other file
//! with its size and sha256, so a reader can tell a complete checkpoint from a torn one.
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::CheckpointError;

/// Identifies the on-disk layout written now: every rank writes its own shard (chunks of
/// tensors, see `shard`), the manifest lists the shards. Bumped when it changes incompatibly.
pub const FORMAT: &str = "dinoflow-checkpoint/v2";
/// The first layout (rank 0 alone wrote one file per tensor group); still read, as one chunk
/// per tensor.
pub const FORMAT_V1: &str = "dinoflow-checkpoint/v1";
/// File name of the manifest inside a checkpoint directory.
pub const MANIFEST_FILE: &str = "manifest.json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FileEntry {
    pub bytes: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub format: String,
    pub iteration: u64,
    pub world_size: usize,
    /// sha256 of the canonical JSON of the resolved training config.
    pub config_hash: String,
    /// Config values that must not change silently across a resume (architecture, batch
    /// size, dataset), keyed by their YAML path.
    pub guarded: BTreeMap<String, String>,
    pub created_unix: u64,
    pub files: BTreeMap<String, FileEntry>,
    /// The job that wrote it (`Kind/namespace/name`); None outside a cluster and in v1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    /// Which rank wrote which header (v2: one per rank, `0..world_size`; empty in v1).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shards: Vec<ShardRef>,
}

/// Rank `rank`'s shard header, a file of the checkpoint directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ShardRef {
    pub rank: usize,
    pub header: String,
}

impl Manifest {
    pub fn read(dir: &Path) -> Result<Self, CheckpointError> {
        let path = dir.join(MANIFEST_FILE);
        let text = std::fs::read(&path).map_err(|e| CheckpointError::io(&path, e))?;
        let manifest: Manifest =
            serde_json::from_slice(&text).map_err(|source| CheckpointError::CorruptJson {
                path: path.clone(),
                what: "manifest is not valid JSON",
                source,
            })?;
        if manifest.format != FORMAT && manifest.format != FORMAT_V1 {
            return Err(CheckpointError::Corrupt {
                path,
                reason: format!(
                    "unknown format {:?}, expected {FORMAT:?} or {FORMAT_V1:?}",
                    manifest.format
                ),
            });
        }
        Ok(manifest)
    }

    /// The first layout: whole tensors in per-group files, no shard headers.
    pub fn is_v1(&self) -> bool {
        self.format == FORMAT_V1
    }

    /// Checks every listed file against its size and checksum.
    pub fn verify(&self, dir: &Path) -> Result<(), CheckpointError> {
        for (name, entry) in &self.files {
            let path = dir.join(name);
            let (bytes, sha) = hash_file(&path).map_err(|source| CheckpointError::Unreadable {
                path: path.clone(),
                source,
            })?;
            if bytes != entry.bytes {
                return Err(CheckpointError::Corrupt {
                    path,
                    reason: format!("size {bytes} bytes, manifest says {}", entry.bytes),
                });
            }
            if sha != entry.sha256 {
                return Err(CheckpointError::Corrupt {
                    path,
                    reason: "sha256 does not match the manifest".to_string(),
                });
            }
        }
        Ok(())
    }
}

/// Streams a file through sha256; returns (size, hex digest).
pub fn hash_file(path: &Path) -> io::Result<(u64, String)> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    Ok((total, hex::encode(hasher.finalize())))
}

/// sha256 of a byte string, hex encoded.
pub fn hash_bytes(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}
