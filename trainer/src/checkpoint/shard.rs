//! One rank's part of a sharded checkpoint: its chunks, one `.safetensors` file per tensor
//! group, and a header (`shard-RRRRR.json`) that says which job, iteration, config and rank
//! wrote them and where every chunk sits in its whole tensor.
//!
//! Every rank writes its part into the checkpoint's temporary directory at the same time and
//! checksums its own files (the expensive part, so it runs in parallel); rank 0 then only
//! reads the small headers to seal the manifest. A whole-tensor chunk is stored in its own
//! shape under its own name, so a one-rank checkpoint's group files are byte for byte the
//! per-group files of the first format (`student.safetensors` ...).
use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::manifest::{FileEntry, Manifest};
use super::{CheckpointError, Chunk};

/// Identifies the layout of a shard header.
pub const SHARD_FORMAT: &str = "dinoflow-shard/v1";

/// File name of rank `rank`'s header.
pub fn header_file(rank: usize) -> String {
    format!("shard-{rank:05}.json")
}

/// File name of `group`'s chunks written by `rank`: rank 0's keeps the first format's
/// `<group>.safetensors` (in a world of one it is that file byte for byte; in a larger one
/// it holds rank 0's chunks, split tensors under `name@offset` keys), the others'
/// `<group>.rank-RRRRR.safetensors`.
pub fn group_file(group: &str, rank: usize) -> String {
    if rank == 0 {
        format!("{group}.safetensors")
    } else {
        format!("{group}.rank-{rank:05}.safetensors")
    }
}

/// Where one chunk of a tensor sits: key `key` of its group file holds elements
/// `[offset, offset + numel)` of the flattened tensor `name` (whole shape `shape`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChunkEntry {
    pub key: String,
    pub name: String,
    pub shape: Vec<i64>,
    pub offset: i64,
    pub numel: i64,
}

/// One group file of a shard: its checksum (computed by the writing rank) and its chunks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ShardFile {
    pub group: String,
    #[serde(flatten)]
    pub entry: FileEntry,
    pub chunks: Vec<ChunkEntry>,
}

/// `shard-RRRRR.json`: who wrote this rank's files, and what they hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ShardHeader {
    pub format: String,
    /// The job that wrote it (`Kind/namespace/name`), None outside a cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    pub iteration: u64,
    pub config_hash: String,
    pub world_size: usize,
    pub rank: usize,
    /// Group files by file name.
    pub files: BTreeMap<String, ShardFile>,
}

impl ShardHeader {
    pub fn read(path: &Path) -> Result<Self, CheckpointError> {
        let bytes = std::fs::read(path).map_err(|e| CheckpointError::io(path, e))?;
        let header: Self =
            serde_json::from_slice(&bytes).map_err(|source| CheckpointError::CorruptJson {
                path: path.to_path_buf(),
                what: "shard header is not valid JSON",
                source,
            })?;
        if header.format != SHARD_FORMAT {
            return Err(CheckpointError::Corrupt {
                path: path.to_path_buf(),
                reason: format!(
                    "unknown shard format {:?}, expected {SHARD_FORMAT:?}",
                    header.format
                ),
            });
        }
        Ok(header)
    }
}

/// What one rank contributes to a checkpoint.
#[derive(Debug, Default)]
pub struct ShardSnapshot {
    pub iteration: u64,
    pub config_hash: String,
    pub guarded: BTreeMap<String, String>,
    pub job: Option<String>,
    /// Chunks by tensor group (`student`, `teacher`, `optimizer`, `loss_state`, ...).
    pub chunks: BTreeMap<String, Vec<Chunk>>,
    /// JSON documents (data position, loss scaler...): replicated, written by rank 0 only.
    pub json: BTreeMap<String, serde_json::Value>,
}

/// Splits replicated tensors so that each of `world_size` ranks writes an equal slice of
/// every tensor: elements `[n·r/W, n·(r+1)/W)` of tensor `n` elements long go to rank `r`
/// (a slice may be empty and is then left out). With one rank every tensor is one chunk.
pub fn split_replicated(
    groups: BTreeMap<String, Vec<(String, Tensor)>>,
    rank: usize,
    world_size: usize,
) -> BTreeMap<String, Vec<Chunk>> {
    let (r, w) = (rank as i64, world_size.max(1) as i64);
    groups
        .into_iter()
        .map(|(group, tensors)| {
            let chunks = tensors
                .into_iter()
                .filter_map(|(name, t)| {
                    let n = t.numel() as i64;
                    let (lo, hi) = (n * r / w, n * (r + 1) / w);
                    (hi > lo).then(|| Chunk {
                        name,
                        shape: t.size(),
                        offset: lo,
                        data: t.reshape([-1]).narrow(0, lo, hi - lo).contiguous(),
                    })
                })
                .collect();
            (group, chunks)
        })
        .collect()
}

/// Writes `part`'s chunks as rank `rank` of `world_size` into `dir`, each group file fsynced
/// and checksummed, then the header; returns the header.
pub(super) fn write(
    dir: &Path,
    part: &ShardSnapshot,
    rank: usize,
    world_size: usize,
) -> Result<ShardHeader, CheckpointError> {
    let mut files = BTreeMap::new();
    for (group, chunks) in &part.chunks {
        if chunks.is_empty() {
            continue;
        }
        let name = group_file(group, rank);
        let path = dir.join(&name);
        let mut tensors = Vec::with_capacity(chunks.len());
        let mut entries = Vec::with_capacity(chunks.len());
        for c in chunks {
            let numel = c.data.numel() as i64;
            let whole = c.offset == 0 && numel == c.shape.iter().product::<i64>();
            // A whole tensor keeps its name and shape: the first format's layout.
            let (key, data) = if whole {
                (c.name.clone(), c.data.reshape(c.shape.as_slice()))
            } else {
                (format!("{}@{}", c.name, c.offset), c.data.reshape([-1]))
            };
            if entries.iter().any(|e: &ChunkEntry| e.key == key) {
                return Err(CheckpointError::Corrupt {
                    path: path.clone(),
                    reason: format!("two chunks of {group}/{} at offset {}", c.name, c.offset),
                });
            }
            entries.push(ChunkEntry {
                key: key.clone(),
                name: c.name.clone(),
                shape: c.shape.clone(),
                offset: c.offset,
                numel,
            });
            tensors.push((key, data));
        }
        super::tensor_file::write(&path, &tensors)?;
        files.insert(
            name,
            ShardFile {
                group: group.clone(),
                entry: super::manager::seal_file(&path)?,
                chunks: entries,
            },
        );
    }
    let header = ShardHeader {
        format: SHARD_FORMAT.into(),
        job: part.job.clone(),
        iteration: part.iteration,
        config_hash: part.config_hash.clone(),
        world_size,
        rank,
        files,
    };
    let bytes = serde_json::to_vec_pretty(&header).expect("shard headers serialise");
    super::manager::write_synced(&dir.join(header_file(rank)), &bytes)?;
    Ok(header)
}

/// Every rank `0..world_size` has exactly one header, listed and checksummed by the
/// manifest, whose run, iteration and layout are the manifest's, and whose files the
/// manifest lists.
pub(super) fn verify_all(path: &Path, m: &Manifest) -> Result<(), CheckpointError> {
    let corrupt = |reason: String| CheckpointError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    let ranks: Vec<usize> = m.shards.iter().map(|s| s.rank).collect();
    if ranks != (0..m.world_size).collect::<Vec<_>>() {
        return Err(corrupt(format!(
            "the manifest lists shards of ranks {ranks:?} for a world of {}",
            m.world_size
        )));
    }
    for s in &m.shards {
        if !m.files.contains_key(&s.header) {
            return Err(corrupt(format!(
                "shard header {} is not checksummed",
                s.header
            )));
        }
        let header = ShardHeader::read(&path.join(&s.header))?;
        let disagree =
            |what: &str, shard: String, manifest: String| CheckpointError::ShardsDisagree {
                path: path.to_path_buf(),
                detail: format!(
                    "{} (rank {}) has {what} {shard}, the manifest {manifest}",
                    s.header, s.rank
                ),
            };
        if header.job != m.job {
            return Err(CheckpointError::ShardsDisagree {
                path: path.to_path_buf(),
                detail: format!(
                    "{} (rank {}) was written by job {}, the manifest by job {}: a shard from another job",
                    s.header,
                    s.rank,
                    header.job.as_deref().unwrap_or("<none: outside a cluster>"),
                    m.job.as_deref().unwrap_or("<none: outside a cluster>")
                ),
            });
        }
        if header.iteration != m.iteration {
            return Err(disagree(
                "iteration",
                header.iteration.to_string(),
                m.iteration.to_string(),
            ));
        }
        if header.config_hash != m.config_hash {
            return Err(disagree(
                "config hash",
                header.config_hash,
                m.config_hash.clone(),
            ));
        }
        if (header.world_size, header.rank) != (m.world_size, s.rank) {
            return Err(disagree(
                "(world size, rank)",
                format!("{:?}", (header.world_size, header.rank)),
                format!("{:?}", (m.world_size, s.rank)),
            ));
        }
        for (file, entry) in &header.files {
            if m.files.get(file) != Some(&entry.entry) {
                return Err(disagree(
                    &format!("file {file} with sha256"),
                    entry.entry.sha256.clone(),
                    m.files
                        .get(file)
                        .map_or("does not list it".into(), |e| e.sha256.clone()),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicated_tensors_split_into_slices_that_tile_each_tensor() {
        let t = Tensor::arange(10, (tch::Kind::Float, tch::Device::Cpu)).view([2, 5]);
        let scalar = Tensor::from_slice(&[7i64]).view([]);
        let groups = || {
            BTreeMap::from([(
                "g".to_string(),
                vec![
                    ("t".to_string(), t.copy()),
                    ("s".to_string(), scalar.copy()),
                ],
            )])
        };
        let mut covered = vec![0; 10];
        let mut scalars = 0;
        for rank in 0..4 {
            for c in &split_replicated(groups(), rank, 4)["g"] {
                if c.name == "s" {
                    scalars += 1;
                    assert_eq!(c.shape, Vec::<i64>::new());
                    continue;
                }
                assert_eq!(c.shape, [2, 5]);
                let v = Vec::<f32>::try_from(&c.data).unwrap();
                for (i, x) in v.iter().enumerate() {
                    let at = c.offset as usize + i;
                    assert_eq!(*x, at as f32);
                    covered[at] += 1;
                }
            }
        }
        assert_eq!(covered, [1; 10], "every element exactly once");
        assert_eq!(scalars, 1, "a one-element tensor goes to one rank");
        let one = split_replicated(groups(), 0, 1);
        assert_eq!(one["g"].len(), 2);
        assert!(one["g"].iter().all(|c| c.offset == 0));
    }
}
