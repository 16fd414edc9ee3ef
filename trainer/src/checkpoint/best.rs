//! The best checkpoint by `training.checkpoint.bestMetric`, recorded as `best.json` beside the
//! checkpoints (so a resumed run keeps comparing against it and keeps protecting it).

use std::fs;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::CheckpointError;

const FILE: &str = "best.json";

/// A checkpoint and the metric value that made it the best.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BestCheckpoint {
    pub iteration: u64,
    pub metric: String,
    pub value: f64,
}

impl BestCheckpoint {
    /// Whether `self` beats `current` (higher is better; another metric's record, left by a
    /// run with another `bestMetric`, is replaced).
    pub fn beats(&self, current: Option<&BestCheckpoint>) -> bool {
        match current {
            None => self.value.is_finite(),
            Some(c) if c.metric != self.metric => self.value.is_finite(),
            Some(c) => self.value > c.value,
        }
    }
}

/// The record in `root`, if any.
pub fn read(root: &Path) -> Result<Option<BestCheckpoint>, CheckpointError> {
    let path = root.join(FILE);
    match fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| CheckpointError::io(&path, std::io::Error::other(e))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(CheckpointError::io(&path, e)),
    }
}

/// Replaces the record in `root` atomically (write, fsync, rename).
pub fn write(root: &Path, best: &BestCheckpoint) -> Result<(), CheckpointError> {
    let path = root.join(FILE);
    let tmp = root.join(format!("{FILE}.tmp"));
    let io = |e| CheckpointError::io(&tmp, e);
    let bytes = serde_json::to_vec(best).map_err(|e| io(std::io::Error::other(e)))?;
    {
        use std::io::Write;
        let mut f = fs::File::create(&tmp).map_err(io)?;
        f.write_all(&bytes).map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    fs::rename(&tmp, &path).map_err(|e| CheckpointError::io(&path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(iteration: u64, metric: &str, value: f64) -> BestCheckpoint {
        BestCheckpoint {
            iteration,
            metric: metric.into(),
            value,
        }
    }

    #[test]
    fn higher_wins_and_a_record_of_another_metric_is_replaced() {
        let cur = b(10, "knn_top1_k20", 50.0);
        assert!(b(20, "knn_top1_k20", 50.5).beats(Some(&cur)));
        assert!(!b(20, "knn_top1_k20", 50.0).beats(Some(&cur)));
        assert!(b(20, "linear_top1", 1.0).beats(Some(&cur)));
        assert!(b(20, "knn_top1_k20", 0.0).beats(None));
        assert!(!b(20, "knn_top1_k20", f64::NAN).beats(None));
    }

    #[test]
    fn the_record_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path()).unwrap(), None);
        write(dir.path(), &b(10, "knn_top1_k20", 50.0)).unwrap();
        write(dir.path(), &b(20, "knn_top1_k20", 60.0)).unwrap();
        assert_eq!(read(dir.path()).unwrap(), Some(b(20, "knn_top1_k20", 60.0)));
    }
}
