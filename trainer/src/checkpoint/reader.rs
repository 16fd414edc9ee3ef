//! Reads a verified checkpoint of any layout and world size as ranges of named tensors
//! (`group/name`), assembled from whichever saved chunks overlap the range, the way
//! torch.distributed.checkpoint reshards: the reader's layout never has to match the
//! writer's. A first-format (v1) checkpoint reads as one whole chunk per tensor.
//!
//! Only headers are read when opening; `read` then fetches exactly the bytes of the
//! overlapping chunks from their files.
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use tch::{Kind, Tensor};

use super::shard::ShardHeader;
use super::{CheckpointError, ChunkSource, VerifiedCheckpoint};

/// One saved chunk: elements `[offset, offset + numel)` of its tensor, stored at byte
/// `start` of `file` as `kind`.
#[derive(Debug, Clone)]
struct Piece {
    file: PathBuf,
    start: u64,
    offset: i64,
    numel: i64,
    kind: Kind,
}

#[derive(Debug, Clone)]
struct Saved {
    shape: Vec<i64>,
    kind: Kind,
    /// Sorted by offset.
    pieces: Vec<Piece>,
}

/// A [`ChunkSource`] over one verified checkpoint, plus its JSON documents.
#[derive(Debug)]
pub struct CheckpointReader {
    path: PathBuf,
    tensors: BTreeMap<String, Saved>,
    json: BTreeMap<String, PathBuf>,
}

/// A tensor entry of a safetensors header.
struct FileTensor {
    kind: Kind,
    shape: Vec<i64>,
    /// Absolute byte offset of the data in the file.
    start: u64,
    bytes: u64,
}

/// Parses the header of a `.safetensors` file (8-byte little-endian length, then JSON).
fn safetensors_index(path: &Path) -> Result<BTreeMap<String, FileTensor>, CheckpointError> {
    let corrupt = |reason: String| CheckpointError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    let mut file = File::open(path).map_err(|e| CheckpointError::io(path, e))?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len)
        .map_err(|e| CheckpointError::io(path, e))?;
    let len = u64::from_le_bytes(len);
    if len > 100 << 20 {
        return Err(corrupt(format!("safetensors header of {len} bytes")));
    }
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header)
        .map_err(|e| CheckpointError::io(path, e))?;
    let raw: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|source| CheckpointError::CorruptJson {
            path: path.to_path_buf(),
            what: "safetensors header is not valid JSON",
            source,
        })?;
    let mut out = BTreeMap::new();
    for (key, v) in raw {
        if key == "__metadata__" {
            continue;
        }
        let dtype = v["dtype"].as_str().unwrap_or_default();
        let kind = kind_of(dtype)
            .ok_or_else(|| corrupt(format!("tensor {key}: unsupported dtype {dtype:?}")))?;
        let shape: Vec<i64> = serde_json::from_value(v["shape"].clone())
            .map_err(|_| corrupt(format!("tensor {key}: bad shape")))?;
        let offsets: [u64; 2] = serde_json::from_value(v["data_offsets"].clone())
            .map_err(|_| corrupt(format!("tensor {key}: bad data_offsets")))?;
        out.insert(
            key,
            FileTensor {
                kind,
                shape,
                start: 8 + len + offsets[0],
                bytes: offsets[1].saturating_sub(offsets[0]),
            },
        );
    }
    Ok(out)
}

fn kind_of(dtype: &str) -> Option<Kind> {
    Some(match dtype {
        "F32" => Kind::Float,
        "F64" => Kind::Double,
        "F16" => Kind::Half,
        "BF16" => Kind::BFloat16,
        "I64" => Kind::Int64,
        "I32" => Kind::Int,
        "I16" => Kind::Int16,
        "I8" => Kind::Int8,
        "U8" => Kind::Uint8,
        "BOOL" => Kind::Bool,
        _ => return None,
    })
}

impl CheckpointReader {
    /// Indexes every chunk of `checkpoint` (headers only).
    pub fn open(checkpoint: &VerifiedCheckpoint) -> Result<Self, CheckpointError> {
        let dir = &checkpoint.path;
        let m = &checkpoint.manifest;
        let mut reader = Self {
            path: dir.clone(),
            tensors: BTreeMap::new(),
            json: BTreeMap::new(),
        };
        let headers: Vec<&str> = m.shards.iter().map(|s| s.header.as_str()).collect();
        for name in m.files.keys() {
            if let Some(doc) = name.strip_suffix(".json")
                && !headers.contains(&name.as_str())
            {
                reader.json.insert(doc.to_string(), dir.join(name));
            }
        }
        if m.is_v1() {
            for name in m.files.keys() {
                let Some(group) = name.strip_suffix(".safetensors") else {
                    continue;
                };
                let path = dir.join(name);
                for (key, t) in safetensors_index(&path)? {
                    let numel = t.shape.iter().product();
                    reader.add(
                        format!("{group}/{key}"),
                        t.shape,
                        Piece {
                            file: path.clone(),
                            start: t.start,
                            offset: 0,
                            numel,
                            kind: t.kind,
                        },
                    )?;
                }
            }
        } else {
            for shard in &m.shards {
                let header = ShardHeader::read(&dir.join(&shard.header))?;
                for (file, entry) in &header.files {
                    let path = dir.join(file);
                    let index = safetensors_index(&path)?;
                    for c in &entry.chunks {
                        let t = index.get(&c.key).ok_or_else(|| CheckpointError::Corrupt {
                            path: path.clone(),
                            reason: format!(
                                "{} lists chunk {} that the file does not hold",
                                shard.header, c.key
                            ),
                        })?;
                        let elt = t.kind.elt_size_in_bytes() as u64;
                        if t.bytes != c.numel as u64 * elt {
                            return Err(CheckpointError::Corrupt {
                                path: path.clone(),
                                reason: format!(
                                    "chunk {} holds {} bytes, its header says {} elements",
                                    c.key, t.bytes, c.numel
                                ),
                            });
                        }
                        reader.add(
                            format!("{}/{}", entry.group, c.name),
                            c.shape.clone(),
                            Piece {
                                file: path.clone(),
                                start: t.start,
                                offset: c.offset,
                                numel: c.numel,
                                kind: t.kind,
                            },
                        )?;
                    }
                }
            }
        }
        for saved in reader.tensors.values_mut() {
            saved.pieces.sort_by_key(|p| p.offset);
        }
        Ok(reader)
    }

    fn add(&mut self, name: String, shape: Vec<i64>, piece: Piece) -> Result<(), CheckpointError> {
        let total: i64 = shape.iter().product();
        if piece.offset < 0 || piece.offset + piece.numel > total {
            return Err(CheckpointError::Corrupt {
                path: piece.file.clone(),
                reason: format!(
                    "chunk of {name} at [{}, {}) lies outside its {total} elements",
                    piece.offset,
                    piece.offset + piece.numel
                ),
            });
        }
        let saved = self.tensors.entry(name.clone()).or_insert_with(|| Saved {
            shape: shape.clone(),
            kind: piece.kind,
            pieces: Vec::new(),
        });
        if saved.shape != shape || saved.kind != piece.kind {
            return Err(CheckpointError::ShardsDisagree {
                path: self.path.clone(),
                detail: format!(
                    "tensor {name} is saved as {:?} {:?} in one shard and {:?} {:?} in {}",
                    saved.kind,
                    saved.shape,
                    piece.kind,
                    shape,
                    piece.file.display()
                ),
            });
        }
        saved.pieces.push(piece);
        Ok(())
    }

    /// The checkpoint directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every saved tensor name (`group/name`), sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Whole tensor `name` in its saved shape.
    pub fn tensor(&self, name: &str) -> Result<Tensor, CheckpointError> {
        let shape = self.shape(name).ok_or_else(|| self.missing(name))?;
        let n = shape.iter().product();
        Ok(self.read(name, 0, n)?.reshape(shape.as_slice()))
    }

    /// Every tensor of `group`, whole, by name.
    pub fn group(&self, group: &str) -> Result<Vec<(String, Tensor)>, CheckpointError> {
        let prefix = format!("{group}/");
        self.tensors
            .keys()
            .filter_map(|full| Some((full, full.strip_prefix(&prefix)?)))
            .map(|(full, name)| Ok((name.to_string(), self.tensor(full)?)))
            .collect()
    }

    /// Every tensor, whole, by group: what the replicated state's `load_state` takes.
    pub fn groups(&self) -> Result<BTreeMap<String, Vec<(String, Tensor)>>, CheckpointError> {
        let mut out: BTreeMap<String, Vec<(String, Tensor)>> = BTreeMap::new();
        for full in self.tensors.keys() {
            let (group, name) = full.split_once('/').unwrap_or(("", full));
            out.entry(group.to_string())
                .or_default()
                .push((name.to_string(), self.tensor(full)?));
        }
        Ok(out)
    }

    /// The JSON document `name` (`data_position`, `model_state`...), if the checkpoint has it.
    pub fn json(&self, name: &str) -> Result<Option<serde_json::Value>, CheckpointError> {
        let Some(path) = self.json.get(name) else {
            return Ok(None);
        };
        let bytes = std::fs::read(path).map_err(|e| CheckpointError::io(path, e))?;
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| CheckpointError::CorruptJson {
                path: path.clone(),
                what: "not valid JSON",
                source,
            })
    }

    /// Every JSON document by name.
    pub fn all_json(&self) -> Result<BTreeMap<String, serde_json::Value>, CheckpointError> {
        let mut out = BTreeMap::new();
        for name in self.json.keys() {
            if let Some(v) = self.json(name)? {
                out.insert(name.clone(), v);
            }
        }
        Ok(out)
    }

    fn missing(&self, name: &str) -> CheckpointError {
        CheckpointError::NotCovered {
            path: self.path.clone(),
            name: name.to_string(),
            detail: "no shard holds any of it".into(),
        }
    }
}

impl ChunkSource for CheckpointReader {
    fn read(&self, name: &str, offset: i64, len: i64) -> Result<Tensor, CheckpointError> {
        let saved = self.tensors.get(name).ok_or_else(|| self.missing(name))?;
        let total: i64 = saved.shape.iter().product();
        let uncovered = |at: i64| CheckpointError::NotCovered {
            path: self.path.clone(),
            name: name.to_string(),
            detail: format!(
                "elements [{offset}, {}) were asked for, but from element {at} on no saved chunk \
                 covers them (the tensor has {total} elements)",
                offset + len
            ),
        };
        if offset < 0 || len < 0 || offset + len > total {
            return Err(uncovered(offset.max(0).min(total)));
        }
        let elt = saved.kind.elt_size_in_bytes() as i64;
        let mut bytes = Vec::with_capacity((len * elt) as usize);
        let mut at = offset;
        let end = offset + len;
        while at < end {
            // The piece covering `at` that reaches furthest (pieces may overlap).
            let piece = saved
                .pieces
                .iter()
                .filter(|p| p.offset <= at && at < p.offset + p.numel)
                .max_by_key(|p| p.offset + p.numel)
                .ok_or_else(|| uncovered(at))?;
            let upto = end.min(piece.offset + piece.numel);
            let mut file =
                File::open(&piece.file).map_err(|e| CheckpointError::io(&piece.file, e))?;
            let from = piece.start + ((at - piece.offset) * elt) as u64;
            file.seek(SeekFrom::Start(from))
                .map_err(|e| CheckpointError::io(&piece.file, e))?;
            let old = bytes.len();
            bytes.resize(old + ((upto - at) * elt) as usize, 0);
            file.read_exact(&mut bytes[old..])
                .map_err(|e| CheckpointError::io(&piece.file, e))?;
            at = upto;
        }
        Ok(Tensor::from_data_size(&bytes, &[len], saved.kind))
    }

    fn shape(&self, name: &str) -> Option<Vec<i64>> {
        self.tensors.get(name).map(|s| s.shape.clone())
    }
}
