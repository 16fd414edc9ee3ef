//! The checkpoint manager over one storage directory.
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use tch::Tensor;

use super::best::{self, BestCheckpoint};
use super::manifest::{self, FORMAT, FileEntry, MANIFEST_FILE, Manifest, ShardRef};
use super::shard::{self, ShardHeader, ShardSnapshot, split_replicated};
use super::{CheckpointError, CheckpointReader};
use crate::dist::{self, Collective, Single};

const PREFIX: &str = "ckpt-";
const TMP_PREFIX: &str = ".tmp-ckpt-";
const TRASH_PREFIX: &str = ".trash-ckpt-";

/// Everything a resume needs, replicated (the whole state of a world of one, or what
/// [`CheckpointManager::load`] assembles from any world): tensor groups (student, teacher,
/// optimizer, loss state...) and JSON documents (data position, RNG, loss scale...). The
/// manager does not interpret either.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub iteration: u64,
    pub world_size: usize,
    pub config_hash: String,
    pub guarded: BTreeMap<String, String>,
    pub tensors: BTreeMap<String, Vec<(String, Tensor)>>,
    pub json: BTreeMap<String, serde_json::Value>,
}

/// A checkpoint directory whose manifest and checksums verified.
#[derive(Debug, Clone)]
pub struct VerifiedCheckpoint {
    pub path: PathBuf,
    pub manifest: Manifest,
}

/// A checkpoint directory that was skipped, and why.
#[derive(Debug, Clone)]
pub struct Rejected {
    pub path: PathBuf,
    pub reason: String,
}

/// Result of scanning the storage directory.
#[derive(Debug, Default)]
pub struct Scan {
    pub latest: Option<VerifiedCheckpoint>,
    pub rejected: Vec<Rejected>,
}

#[derive(Debug, Clone)]
pub struct CheckpointManager {
    root: PathBuf,
    keep_last: usize,
}

impl CheckpointManager {
    /// Opens (creating it if needed) the storage directory. Temporary directories left by a
    /// writer that died mid-write are removed: only rank 0 opens it for writing, before the
    /// other ranks start (they write into the directory rank 0 prepares for each checkpoint).
    pub fn open(root: impl Into<PathBuf>, keep_last: usize) -> Result<Self, CheckpointError> {
        let root = root.into();
        fs::create_dir_all(&root).map_err(|e| CheckpointError::io(&root, e))?;
        let manager = Self {
            root,
            keep_last: keep_last.max(1),
        };
        for entry in manager.entries()? {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(TMP_PREFIX) || name.starts_with(TRASH_PREFIX) {
                tracing::warn!(path = %entry.path().display(), "removing an unfinished checkpoint left by an interrupted writer");
                fs::remove_dir_all(entry.path())
                    .map_err(|e| CheckpointError::io(&entry.path(), e))?;
            }
        }
        Ok(manager)
    }

    /// The best checkpoint recorded so far.
    pub fn best(&self) -> Result<Option<BestCheckpoint>, CheckpointError> {
        best::read(&self.root)
    }

    /// Records `candidate` as the best checkpoint when it beats the current one (rank 0, after
    /// the checkpoint is sealed); true when it did.
    pub fn offer_best(&self, candidate: &BestCheckpoint) -> Result<bool, CheckpointError> {
        if !candidate.beats(self.best()?.as_ref()) {
            return Ok(false);
        }
        best::write(&self.root, candidate)?;
        Ok(true)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn dir_for(&self, iteration: u64) -> PathBuf {
        self.root.join(format!("{PREFIX}{iteration:09}"))
    }

    /// Writes `snapshot` as `ckpt-<iteration>` from one process (a world of one): see
    /// [`Self::save_shard`].
    pub fn save(&self, snapshot: &Snapshot) -> Result<VerifiedCheckpoint, CheckpointError> {
        let part = ShardSnapshot {
            iteration: snapshot.iteration,
            config_hash: snapshot.config_hash.clone(),
            guarded: snapshot.guarded.clone(),
            job: None,
            chunks: split_replicated(clone_groups(&snapshot.tensors), 0, 1),
            json: snapshot.json.clone(),
        };
        let saved = self.save_shard(&part, &Single)?;
        Ok(saved.expect("rank 0 of a world of one seals the checkpoint"))
    }

    /// Writes this rank's `part` of `ckpt-<iteration>`; every rank of `collective` calls it
    /// with its own part, at the same time. Rank 0 makes the temporary directory; each rank
    /// writes its group files, each fsynced and checksummed, and its header; once every rank
    /// is done, rank 0 reads the headers, checks they agree, writes the manifest last, renames
    /// the directory into place and fsyncs the parent. Returns the sealed checkpoint on rank
    /// 0, None on the others (after rank 0 sealed it).
    ///
    /// On any rank's failure every rank returns an error, the temporary directory is removed
    /// at once (on a full disk it only holds space the next attempt needs) and the
    /// checkpoints written before are untouched.
    pub fn save_shard(
        &self,
        part: &ShardSnapshot,
        collective: &dyn Collective,
    ) -> Result<Option<VerifiedCheckpoint>, CheckpointError> {
        let (rank, world) = (collective.rank(), collective.world_size());
        let tmp = self.root.join(format!("{TMP_PREFIX}{:09}", part.iteration));
        let no_space = |e: CheckpointError| {
            if e.is_storage_full() {
                CheckpointError::NoSpace {
                    iteration: part.iteration,
                    path: self.root.clone(),
                    source: Box::new(e),
                }
            } else {
                e
            }
        };
        // Every step ends in a vote, so all ranks leave together and none waits forever.
        let agree = |result: Result<(), CheckpointError>, what: &str| {
            let failed = dist::any_rank(collective, result.is_err());
            if failed && rank == 0 {
                let _ = fs::remove_dir_all(&tmp);
            }
            match result {
                Err(e) => Err(no_space(e)),
                Ok(()) if failed => Err(CheckpointError::PeerFailed {
                    iteration: part.iteration,
                    detail: format!("another rank failed to {what} (see its log)"),
                }),
                Ok(()) => Ok(()),
            }
        };
        let prepared = if rank == 0 { prepare_dir(&tmp) } else { Ok(()) };
        agree(prepared, "prepare the temporary directory")?;
        let written = shard::write(&tmp, part, rank, world).and_then(|_| {
            if rank == 0 {
                for (doc, value) in &part.json {
                    let bytes =
                        serde_json::to_vec_pretty(value).expect("JSON values always serialise");
                    write_synced(&tmp.join(format!("{doc}.json")), &bytes)?;
                }
            }
            Ok(())
        });
        agree(written, "write its shard")?;
        let mut sealed = None;
        let result = if rank == 0 {
            self.seal(part, world, &tmp).map(|c| {
                sealed = Some(c);
            })
        } else {
            Ok(())
        };
        agree(result, "seal the manifest")?;
        Ok(sealed)
    }

    /// Rank 0, after every rank wrote its shard into `tmp`: the manifest over all of them,
    /// then the rename.
    fn seal(
        &self,
        part: &ShardSnapshot,
        world: usize,
        tmp: &Path,
    ) -> Result<VerifiedCheckpoint, CheckpointError> {
        let final_dir = self.dir_for(part.iteration);
        let mut files = BTreeMap::new();
        let mut shards = Vec::with_capacity(world);
        for rank in 0..world {
            let name = shard::header_file(rank);
            let path = tmp.join(&name);
            let header = ShardHeader::read(&path)?;
            let expected = (&part.job, part.iteration, &part.config_hash, world, rank);
            let got = (
                &header.job,
                header.iteration,
                &header.config_hash,
                header.world_size,
                header.rank,
            );
            if got != expected {
                return Err(CheckpointError::ShardsDisagree {
                    path: tmp.to_path_buf(),
                    detail: format!(
                        "{name} says (job, iteration, config hash, world size, rank) = {got:?}, rank 0 expects {expected:?}"
                    ),
                });
            }
            for (file, entry) in header.files {
                // The writer checksummed its file; its size is checked here, its content
                // by every reader's verify.
                let p = tmp.join(&file);
                let bytes = fs::metadata(&p)
                    .map_err(|e| CheckpointError::io(&p, e))?
                    .len();
                if bytes != entry.entry.bytes {
                    return Err(CheckpointError::Corrupt {
                        path: p,
                        reason: format!(
                            "size {bytes} bytes, its shard header says {}",
                            entry.entry.bytes
                        ),
                    });
                }
                files.insert(file, entry.entry);
            }
            files.insert(name.clone(), seal_file(&path)?);
            shards.push(ShardRef { rank, header: name });
        }
        for doc in part.json.keys() {
            let name = format!("{doc}.json");
            files.insert(name.clone(), seal_file(&tmp.join(&name))?);
        }
        let manifest = Manifest {
            format: FORMAT.to_string(),
            iteration: part.iteration,
            world_size: world,
            config_hash: part.config_hash.clone(),
            guarded: part.guarded.clone(),
            created_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            files,
            job: part.job.clone(),
            shards,
        };
        let bytes = serde_json::to_vec_pretty(&manifest).expect("manifest serialises");
        write_synced(&tmp.join(MANIFEST_FILE), &bytes)?;
        sync_dir(tmp)?;

        // A directory of the same iteration can exist after resuming from an older checkpoint
        // (the newer one was corrupt, or --resume never). Move it aside first: rename(2) does
        // not replace a non-empty directory.
        if final_dir.exists() {
            let trash = self
                .root
                .join(format!("{TRASH_PREFIX}{:09}", part.iteration));
            fs::rename(&final_dir, &trash).map_err(|e| CheckpointError::io(&final_dir, e))?;
            fs::remove_dir_all(&trash).map_err(|e| CheckpointError::io(&trash, e))?;
        }
        fs::rename(tmp, &final_dir).map_err(|e| CheckpointError::io(&final_dir, e))?;
        sync_dir(&self.root)?;
        self.prune(part.iteration)?;
        Ok(VerifiedCheckpoint {
            path: final_dir,
            manifest,
        })
    }

    /// Scans every `ckpt-*` directory, newest first, and returns the first that verifies.
    /// Each skipped one is logged with its path and the reason.
    pub fn scan(&self) -> Result<Scan, CheckpointError> {
        let mut scan = Scan::default();
        for (_, path) in self.listed()?.into_iter().rev() {
            match verify(&path) {
                Ok(checkpoint) => {
                    scan.latest = Some(checkpoint);
                    break;
                }
                Err(e) if e.is_bad_input() => return Err(e),
                Err(e) => {
                    tracing::warn!(path = %path.display(), reason = %e, "skipping a checkpoint that does not verify");
                    scan.rejected.push(Rejected {
                        path,
                        reason: e.to_string(),
                    });
                }
            }
        }
        Ok(scan)
    }

    /// The newest verified checkpoint under `root`, for readers (`eval`, `export`) that may
    /// run beside a training job: unlike [`Self::open`], nothing is created or cleaned up,
    /// so a checkpoint being written is left alone. A missing `root` holds none.
    pub fn newest_verified_in(root: &Path) -> Result<Option<VerifiedCheckpoint>, CheckpointError> {
        if !root.is_dir() {
            return Ok(None);
        }
        let reader = Self {
            root: root.to_path_buf(),
            keep_last: 1,
        };
        reader.latest_verified()
    }

    /// The newest checkpoint whose manifest verifies, if any.
    pub fn latest_verified(&self) -> Result<Option<VerifiedCheckpoint>, CheckpointError> {
        Ok(self.scan()?.latest)
    }

    /// Checkpoint directories by iteration, oldest first.
    fn listed(&self) -> Result<Vec<(u64, PathBuf)>, CheckpointError> {
        let mut found: Vec<(u64, PathBuf)> = self
            .entries()?
            .into_iter()
            .filter_map(|entry| {
                let name = entry.file_name().to_string_lossy().into_owned();
                let iteration = name.strip_prefix(PREFIX)?.parse::<u64>().ok()?;
                Some((iteration, entry.path()))
            })
            .collect();
        found.sort();
        Ok(found)
    }

    fn entries(&self) -> Result<Vec<fs::DirEntry>, CheckpointError> {
        let read = fs::read_dir(&self.root).map_err(|e| CheckpointError::io(&self.root, e))?;
        read.collect::<Result<Vec<_>, _>>()
            .map_err(|e| CheckpointError::io(&self.root, e))
    }

    /// Keeps the `keep_last` newest checkpoints up to and including `newest`; newer
    /// directories (left from an earlier attempt) are not this prune's business.
    /// The best checkpoint (`best.json`) is kept on top of them, however old.
    fn prune(&self, newest: u64) -> Result<(), CheckpointError> {
        let best = best::read(&self.root)?.map(|b| b.iteration);
        let older: Vec<PathBuf> = self
            .listed()?
            .into_iter()
            .filter(|(it, _)| *it <= newest && Some(*it) != best)
            .map(|(_, p)| p)
            .collect();
        let excess = older.len().saturating_sub(self.keep_last);
        for path in &older[..excess] {
            fs::remove_dir_all(path).map_err(|e| CheckpointError::io(path, e))?;
        }
        Ok(())
    }

    /// Loads a verified checkpoint's tensors (whole, whatever the world size that wrote
    /// them) and JSON documents.
    pub fn load(checkpoint: &VerifiedCheckpoint) -> Result<Snapshot, CheckpointError> {
        let m = &checkpoint.manifest;
        let reader = CheckpointReader::open(checkpoint)?;
        Ok(Snapshot {
            iteration: m.iteration,
            world_size: m.world_size,
            config_hash: m.config_hash.clone(),
            guarded: m.guarded.clone(),
            tensors: reader.groups()?,
            json: reader.all_json()?,
        })
    }
}

/// Verifies one checkpoint directory (used for `--resume PATH` as well as scans).
pub fn verify(path: &Path) -> Result<VerifiedCheckpoint, CheckpointError> {
    if !path.is_dir() {
        return Err(CheckpointError::NotFound {
            path: path.to_path_buf(),
        });
    }
    if !path.join(MANIFEST_FILE).exists() {
        return Err(CheckpointError::Corrupt {
            path: path.to_path_buf(),
            reason: "no manifest.json (the write never finished)".into(),
        });
    }
    let manifest = Manifest::read(path)?;
    manifest.verify(path)?;
    if !manifest.is_v1() {
        shard::verify_all(path, &manifest)?;
    }
    Ok(VerifiedCheckpoint {
        path: path.to_path_buf(),
        manifest,
    })
}

/// Rank 0: an empty temporary directory for the checkpoint (a stale one of the same
/// iteration, left by a killed attempt, is removed first).
fn prepare_dir(tmp: &Path) -> Result<(), CheckpointError> {
    if tmp.exists() {
        fs::remove_dir_all(tmp).map_err(|e| CheckpointError::io(tmp, e))?;
    }
    fs::create_dir(tmp).map_err(|e| CheckpointError::io(tmp, e))?;
    sync_dir(tmp)
}

fn clone_groups(
    groups: &BTreeMap<String, Vec<(String, Tensor)>>,
) -> BTreeMap<String, Vec<(String, Tensor)>> {
    groups
        .iter()
        .map(|(g, ts)| {
            let ts = ts
                .iter()
                .map(|(n, t)| (n.clone(), t.shallow_clone()))
                .collect();
            (g.clone(), ts)
        })
        .collect()
}

pub(super) fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    let mut file = File::create(path).map_err(|e| CheckpointError::io(path, e))?;
    file.write_all(bytes)
        .map_err(|e| CheckpointError::io(path, e))?;
    file.sync_all().map_err(|e| CheckpointError::io(path, e))
}

/// fsyncs a written file and records its size and checksum as read back from disk.
pub(super) fn seal_file(path: &Path) -> Result<FileEntry, CheckpointError> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| CheckpointError::io(path, e))?;
    let (bytes, sha256) = manifest::hash_file(path).map_err(|e| CheckpointError::io(path, e))?;
    Ok(FileEntry { bytes, sha256 })
}

fn sync_dir(path: &Path) -> Result<(), CheckpointError> {
    File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(|e| CheckpointError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    fn snapshot(iteration: u64) -> Snapshot {
        let w = Tensor::arange(6, (Kind::Float, tch::Device::Cpu)).view([2, 3]) * iteration as f64;
        Snapshot {
            iteration,
            world_size: 1,
            config_hash: "abc".into(),
            guarded: [("training.model".to_string(), "vit_small".to_string())].into(),
            tensors: [(
                "student".to_string(),
                vec![("blocks.0.attn.qkv.weight".to_string(), w)],
            )]
            .into(),
            json: [(
                "rng".to_string(),
                serde_json::json!({"seed": 7, "iteration": iteration}),
            )]
            .into(),
        }
    }

    #[test]
    fn a_failed_save_leaves_no_temporary_directory_and_keeps_the_previous_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let mgr = CheckpointManager::open(dir.path(), 3).unwrap();
        mgr.save(&snapshot(3)).unwrap();
        let mut bad = snapshot(6);
        // A document name with a missing sub-directory makes the write fail half-way.
        bad.json.insert("missing/dir".into(), serde_json::json!({}));
        assert!(mgr.save(&bad).is_err());
        let names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["ckpt-000000003"]);
        let latest = mgr.latest_verified().unwrap().unwrap();
        assert_eq!(latest.manifest.iteration, 3);
    }

    #[test]
    fn a_full_disk_is_recognised_by_the_io_error_kind() {
        let full = || std::io::Error::from(std::io::ErrorKind::StorageFull);
        assert!(CheckpointError::io(Path::new("/c"), full()).is_storage_full());
        let quota = std::io::Error::from(std::io::ErrorKind::QuotaExceeded);
        assert!(CheckpointError::io(Path::new("/c/student.safetensors"), quota).is_storage_full());
        // Only the kind decides: a message that mentions it does not.
        let text = std::io::Error::other(format!("write: {:?}", full()));
        assert!(!CheckpointError::io(Path::new("/c"), text).is_storage_full());
        let other = CheckpointError::io(Path::new("/c"), std::io::Error::other("EIO"));
        assert!(!other.is_storage_full());
    }

    #[test]
    fn saved_checkpoint_loads_back_bitwise() {
        let dir = tempfile::tempdir().unwrap();
        let mgr = CheckpointManager::open(dir.path(), 3).unwrap();
        mgr.save(&snapshot(5)).unwrap();
        let latest = mgr.latest_verified().unwrap().unwrap();
        assert_eq!(latest.path, dir.path().join("ckpt-000000005"));
        let loaded = CheckpointManager::load(&latest).unwrap();
        assert_eq!(loaded.iteration, 5);
        let (name, t) = &loaded.tensors["student"][0];
        assert_eq!(name, "blocks.0.attn.qkv.weight");
        assert!(t.equal(&snapshot(5).tensors["student"][0].1));
        assert_eq!(loaded.json["rng"]["iteration"], 5);
        assert_eq!(loaded.guarded["training.model"], "vit_small");
    }

    #[test]
    fn a_writer_killed_mid_write_leaves_the_previous_checkpoint_usable() {
        let dir = tempfile::tempdir().unwrap();
        let mgr = CheckpointManager::open(dir.path(), 3).unwrap();
        mgr.save(&snapshot(10)).unwrap();
        // What a kill -9 during save(20) leaves: a temp dir with a partial file, no manifest.
        let tmp = dir.path().join(".tmp-ckpt-000000020");
        fs::create_dir(&tmp).unwrap();
        fs::write(tmp.join("student.safetensors"), b"\x10\x00\x00").unwrap();
        let reopened = CheckpointManager::open(dir.path(), 3).unwrap();
        assert!(!tmp.exists(), "stale temp dir is cleaned on open");
        let latest = reopened.latest_verified().unwrap().unwrap();
        assert_eq!(latest.manifest.iteration, 10);
    }

    #[test]
    fn a_directory_without_manifest_is_skipped_and_reported() {
        let dir = tempfile::tempdir().unwrap();
        let mgr = CheckpointManager::open(dir.path(), 3).unwrap();
        mgr.save(&snapshot(10)).unwrap();
        let torn = dir.path().join("ckpt-000000020");
        fs::create_dir(&torn).unwrap();
        fs::write(torn.join("student.safetensors"), b"partial").unwrap();
        let scan = mgr.scan().unwrap();
        assert_eq!(scan.latest.unwrap().manifest.iteration, 10);
        assert_eq!(scan.rejected.len(), 1);
        assert_eq!(scan.rejected[0].path, torn);
        assert!(scan.rejected[0].reason.contains("no manifest.json"));
    }

    #[test]
    fn a_corrupted_file_makes_its_checkpoint_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let mgr = CheckpointManager::open(dir.path(), 3).unwrap();
        mgr.save(&snapshot(10)).unwrap();
        let newest = mgr.save(&snapshot(20)).unwrap();
        // Flip one byte in the tensor payload: the size is unchanged, the checksum is not.
        let file = newest.path.join("student.safetensors");
        let mut bytes = fs::read(&file).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        fs::write(&file, bytes).unwrap();
        let scan = mgr.scan().unwrap();
        assert_eq!(scan.latest.unwrap().manifest.iteration, 10);
        assert!(
            scan.rejected[0].reason.contains("sha256"),
            "{}",
            scan.rejected[0].reason
        );
    }

    #[test]
    fn a_truncated_file_makes_its_checkpoint_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let mgr = CheckpointManager::open(dir.path(), 3).unwrap();
        mgr.save(&snapshot(10)).unwrap();
        let newest = mgr.save(&snapshot(20)).unwrap();
        let file = newest.path.join("rng.json");
        fs::write(&file, b"{").unwrap();
        let scan = mgr.scan().unwrap();
        assert_eq!(scan.latest.unwrap().manifest.iteration, 10);
        assert!(
            scan.rejected[0].reason.contains("size"),
            "{}",
            scan.rejected[0].reason
        );
    }

    #[test]
    fn only_the_latest_k_checkpoints_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mgr = CheckpointManager::open(dir.path(), 2).unwrap();
        for it in [1, 2, 3, 4] {
            mgr.save(&snapshot(it)).unwrap();
        }
        let mut names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["ckpt-000000003", "ckpt-000000004"]);
    }

    #[test]
    fn the_best_checkpoint_is_kept_past_keep_last_until_beaten() {
        let dir = tempfile::tempdir().unwrap();
        let mgr = CheckpointManager::open(dir.path(), 2).unwrap();
        let best = |iteration, value| BestCheckpoint {
            iteration,
            metric: "knn_top1_k20".into(),
            value,
        };
        let names = || {
            let mut n: Vec<String> = fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("ckpt-"))
                .collect();
            n.sort();
            n
        };
        mgr.save(&snapshot(1)).unwrap();
        assert!(mgr.offer_best(&best(1, 60.0)).unwrap());
        for it in [2, 3, 4] {
            mgr.save(&snapshot(it)).unwrap();
            assert!(!mgr.offer_best(&best(it, 50.0)).unwrap());
        }
        assert_eq!(
            names(),
            ["ckpt-000000001", "ckpt-000000003", "ckpt-000000004"]
        );
        mgr.save(&snapshot(5)).unwrap();
        assert!(mgr.offer_best(&best(5, 61.0)).unwrap());
        assert_eq!(mgr.best().unwrap().unwrap().iteration, 5);
        // 1 is no longer the best: pruned at the next save like any other (the best, 5, is
        // kept on top of the two newest others).
        mgr.save(&snapshot(6)).unwrap();
        assert_eq!(
            names(),
            ["ckpt-000000004", "ckpt-000000005", "ckpt-000000006"]
        );
    }

    #[test]
    fn saving_an_iteration_again_replaces_the_old_directory() {
        let dir = tempfile::tempdir().unwrap();
        let mgr = CheckpointManager::open(dir.path(), 3).unwrap();
        mgr.save(&snapshot(7)).unwrap();
        let mut again = snapshot(7);
        again.config_hash = "def".into();
        mgr.save(&again).unwrap();
        let latest = mgr.latest_verified().unwrap().unwrap();
        assert_eq!(latest.manifest.config_hash, "def");
    }

    #[test]
    fn an_empty_storage_directory_has_no_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let mgr = CheckpointManager::open(dir.path().join("new"), 3).unwrap();
        assert!(mgr.latest_verified().unwrap().is_none());
    }
}
