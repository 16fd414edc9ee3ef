//! The trainer's half of divergence rollback (`cluster.runPolicy.divergenceRollbackLimit`).
//!
//! A rank whose loss goes non-finite records, before it exits 79, where the data stood: the
//! iteration and the global sample position after that iteration's batch. When the operator
//! restarts the gang from the last verified checkpoint with rollback on
//! (`DINOFLOW_DIVERGENCE_ROLLBACK=true`), the restore moves the data position forward past
//! every recorded window the checkpoint precedes: the iterations from the checkpoint through
//! the diverged one train on the data that came after it. The skip is a function of the
//! records and the checkpoint alone, so every rank and every later resume from the same
//! checkpoint skips the same samples; checkpoints written after it carry the moved position.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Where the data stood when the loss went non-finite.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Divergence {
    /// The 0-based iteration whose loss was non-finite.
    pub iteration: u64,
    /// Global samples (all ranks) consumed through that iteration's batch.
    pub samples_end: u64,
}

/// A skip the restore applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Skip {
    pub from_sample: u64,
    pub to_sample: u64,
    /// The diverged iteration whose window ends the skip.
    pub diverged_at: u64,
}

const PREFIX: &str = "divergence-rank";

fn record_path(dir: &Path, rank: usize) -> PathBuf {
    dir.join(format!("{PREFIX}{rank}.json"))
}

/// Appends `d` to this rank's records in `dir`, atomically (write, fsync, rename): a rank
/// killed mid-write leaves the previous records intact.
pub fn record(dir: &Path, rank: usize, d: Divergence) -> io::Result<()> {
    let path = record_path(dir, rank);
    let mut all = read_file(&path)?;
    if !all.contains(&d) {
        all.push(d);
    }
    let tmp = path.with_extension("json.tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        serde_json::to_writer(&mut f, &all)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &path)
}

/// Every rank's records in `dir` (none when the directory has none).
pub fn load(dir: &Path) -> io::Result<Vec<Divergence>> {
    let mut all = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(all),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with(PREFIX) && name.ends_with(".json") {
            all.extend(read_file(&path)?);
        }
    }
    Ok(all)
}

fn read_file(path: &Path) -> io::Result<Vec<Divergence>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            )
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// The skip for a restore at `iteration` with `samples` consumed: up to the end of the farthest
/// recorded window that began at or after this checkpoint. None when no divergence happened
/// after it (windows already skipped lie behind `samples`).
pub fn skip_for(records: &[Divergence], iteration: u64, samples: u64) -> Option<Skip> {
    records
        .iter()
        .filter(|d| d.iteration >= iteration && d.samples_end > samples)
        .max_by_key(|d| d.samples_end)
        .map(|d| Skip {
            from_sample: samples,
            to_sample: d.samples_end,
            diverged_at: d.iteration,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(iteration: u64, samples_end: u64) -> Divergence {
        Divergence {
            iteration,
            samples_end,
        }
    }

    #[test]
    fn a_restore_before_the_divergence_skips_its_window_and_only_that() {
        // 8 global samples per iteration; diverged at iteration 13, checkpoint at 10.
        let records = [d(13, 14 * 8)];
        let skip = skip_for(&records, 10, 80).unwrap();
        assert_eq!(
            (skip.from_sample, skip.to_sample, skip.diverged_at),
            (80, 112, 13)
        );
        // A checkpoint written after the skip is past the window: nothing more to skip.
        assert_eq!(skip_for(&records, 12, 112 + 2 * 8), None);
        // No record, no skip.
        assert_eq!(skip_for(&[], 10, 80), None);
    }

    #[test]
    fn a_second_divergence_before_a_new_checkpoint_extends_the_skip() {
        // First window skipped to 112; diverged again at 15 after the skip (samples 152).
        let records = [d(13, 112), d(15, 152)];
        let skip = skip_for(&records, 10, 80).unwrap();
        assert_eq!((skip.to_sample, skip.diverged_at), (152, 15));
        // From a checkpoint at 14 (written after the first skip, samples 144): only the second.
        let skip = skip_for(&records, 14, 144).unwrap();
        assert_eq!(skip.to_sample, 152);
    }

    #[test]
    fn records_survive_rewrites_and_every_rank_is_read() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load(dir.path()).unwrap().is_empty());
        record(dir.path(), 0, d(13, 112)).unwrap();
        record(dir.path(), 0, d(13, 112)).unwrap();
        record(dir.path(), 1, d(13, 112)).unwrap();
        record(dir.path(), 0, d(15, 152)).unwrap();
        let mut all = load(dir.path()).unwrap();
        all.sort_by_key(|d| (d.iteration, d.samples_end));
        assert_eq!(all, [d(13, 112), d(13, 112), d(15, 152)]);
        std::fs::write(dir.path().join("divergence-rank2.json"), b"{").unwrap();
        let err = load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("divergence-rank2.json"), "{err}");
        assert!(load(&dir.path().join("missing")).unwrap().is_empty());
    }
}
