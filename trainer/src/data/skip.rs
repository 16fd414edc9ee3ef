//! Bookkeeping of images that could not be decoded.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::{DataError, Dataset, Sample};

/// Remembers unreadable images: each is logged once (with its path) and counted once.
///
/// The counter is an `Arc<AtomicU64>` so that the metrics module can export it as
/// `dinoflow_trainer_skipped_images` without knowing about the loader.
#[derive(Debug, Default)]
pub struct SkippedImages {
    bad: Mutex<HashSet<usize>>,
    count: Arc<AtomicU64>,
}

impl SkippedImages {
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of distinct images skipped so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// The shared counter, for metrics.
    pub fn counter(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.count)
    }

    pub fn is_bad(&self, index: usize) -> bool {
        self.bad
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&index)
    }

    /// Records `index` as unreadable; logs and counts only the first time.
    pub fn record(&self, index: usize, err: &DataError) {
        let first = self
            .bad
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(index);
        if first {
            self.count.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(index, error = %err, "skipping unreadable image");
        }
    }

    /// Reads `index`, or, if it is unreadable, the next readable image after it (wrapping
    /// around). Deterministic, so a resumed run substitutes exactly the same images. Returns the
    /// index actually used.
    pub fn get_or_next(
        &self,
        dataset: &dyn Dataset,
        index: usize,
    ) -> Result<(usize, Sample), DataError> {
        let len = dataset.len();
        for step in 0..len {
            let i = (index + step) % len;
            if self.is_bad(i) {
                continue;
            }
            match dataset.get(i) {
                Ok(sample) => return Ok((i, sample)),
                Err(err @ DataError::Corrupt { .. }) => self.record(i, &err),
                Err(err) => return Err(err),
            }
        }
        Err(DataError::NothingReadable {
            path: dataset.describe(),
            skipped: self.count(),
        })
    }
}
