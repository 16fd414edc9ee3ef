//! The parallel, deterministic, resumable training loader.
//!
//! Worker threads each claim a whole iteration, decode and augment its images, and park the
//! finished batch in a reorder buffer; the consumer takes batches strictly in iteration order.
//! Workers never run more than `prefetch` batches ahead of the consumer (the bounded prefetch
//! queue). A batch depends only on (seed, rank, iteration) and the loader's sampler segment —
//! see `sampler` — so a loader started at iteration k produces exactly the batches k, k+1, …
//! of a loader started at 0, and one started with another batch or world size at the global
//! sample position where another stopped continues its data order.

use std::collections::BTreeMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tch::Tensor;

use super::augment::{MultiCrop, MultiCropConfig};
use super::sampler::{Segment, ShardedInfiniteSampler, sample_rng};
use super::{DataError, Dataset, SkippedImages};

#[derive(Debug, Clone)]
pub struct LoaderConfig {
    /// Images per batch on this rank.
    pub batch_size: usize,
    pub num_workers: usize,
    /// Finished batches that may wait for the consumer.
    pub prefetch: usize,
    pub seed: u64,
    pub rank: usize,
    pub world_size: usize,
    /// First iteration to produce (the resume position).
    pub start_iteration: u64,
    /// Global samples (all ranks) consumed before `start_iteration`: where the data order
    /// continues after a change of batch or world size. None: the run never changed them,
    /// `start_iteration · batch_size · world_size`.
    pub start_sample: Option<u64>,
    /// First iteration not to produce (the start of the next curriculum phase, which needs
    /// another loader); None: endless. Workers stop there instead of decoding batches of
    /// the wrong shape.
    pub end_iteration: Option<u64>,
    pub shuffle: bool,
    pub crops: MultiCropConfig,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        Self {
            batch_size: 64,
            num_workers: 10,
            prefetch: 4,
            seed: 0,
            rank: 0,
            world_size: 1,
            start_iteration: 0,
            start_sample: None,
            end_iteration: None,
            shuffle: true,
            crops: MultiCropConfig::default(),
        }
    }
}

/// One iteration's crops, crop-major: `global_crops` is `[2B, 3, G, G]` (rows `0..B` are the
/// first global crop of images `0..B`), `local_crops` is `[nB, 3, L, L]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub iteration: u64,
    pub global_crops: Vec<f32>,
    pub global_shape: [usize; 4],
    pub local_crops: Vec<f32>,
    pub local_shape: [usize; 4],
    pub labels: Vec<Option<u32>>,
    /// Dataset index of each image (after substitution of unreadable ones).
    pub indices: Vec<usize>,
}

impl Batch {
    pub fn global_tensor(&self) -> Tensor {
        Tensor::from_slice(&self.global_crops).view(shape_i64(self.global_shape))
    }

    pub fn local_tensor(&self) -> Tensor {
        Tensor::from_slice(&self.local_crops).view(shape_i64(self.local_shape))
    }

    /// Labels as int64, `-1` where the image has none.
    pub fn labels_tensor(&self) -> Tensor {
        let v: Vec<i64> = self
            .labels
            .iter()
            .map(|l| l.map_or(-1, i64::from))
            .collect();
        Tensor::from_slice(&v)
    }
}

fn shape_i64(s: [usize; 4]) -> [i64; 4] {
    s.map(|d| d as i64)
}

/// Time the consumer spent blocked waiting for data.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DataWait {
    pub last: Duration,
    pub total: Duration,
}

struct State {
    next_claim: u64,
    next_consume: u64,
    ready: BTreeMap<u64, Result<Batch, DataError>>,
    stop: bool,
}

struct Shared {
    state: Mutex<State>,
    /// Signalled when a batch is ready or the consumer moves on.
    changed: Condvar,
    dataset: Arc<dyn Dataset>,
    sampler: ShardedInfiniteSampler,
    segment: Segment,
    augment: MultiCrop,
    skipped: Arc<SkippedImages>,
    cfg: LoaderConfig,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub struct Loader {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    wait: DataWait,
}

impl std::fmt::Debug for Loader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loader")
            .field("dataset", &self.shared.dataset.describe())
            .field("wait", &self.wait)
            .finish()
    }
}

impl Loader {
    pub fn new(dataset: Arc<dyn Dataset>, cfg: LoaderConfig) -> Result<Self, DataError> {
        Self::start(dataset, cfg, Arc::new(SkippedImages::new()))
    }

    /// Restarts the loader at `iteration` of its own segment (a resume with the batch and
    /// world size it has). The record of unreadable images is kept, so each one is still
    /// logged and counted once per run.
    pub fn seek(&mut self, iteration: u64) -> Result<(), DataError> {
        let seg = self.shared.segment;
        let per_iteration = seg.samples_per_iteration() as i128;
        let sample = seg.start_sample as i128
            + (iteration as i128 - seg.start_iteration as i128) * per_iteration;
        let sample = u64::try_from(sample).map_err(|_| DataError::InvalidConfig {
            field: "data position",
            message: format!(
                "iteration {iteration} lies before global sample 0 of this loader's segment \
                 ({seg:?})"
            ),
        })?;
        self.seek_to(iteration, sample)
    }

    /// Restarts the loader at `iteration`, whose first sample is global position `sample`
    /// (a resume that continues a data order written with another batch or world size).
    pub fn seek_to(&mut self, iteration: u64, sample: u64) -> Result<(), DataError> {
        self.restart(LoaderConfig {
            start_iteration: iteration,
            start_sample: Some(sample),
            ..self.shared.cfg.clone()
        })
    }

    /// Restarts the loader on the same dataset with another config (the next curriculum
    /// phase: crops, batch size, start and end); the record of unreadable images is kept.
    pub fn restart(&mut self, cfg: LoaderConfig) -> Result<(), DataError> {
        let skipped = Arc::clone(&self.shared.skipped);
        *self = Self::start(Arc::clone(&self.shared.dataset), cfg, skipped)?;
        Ok(())
    }

    /// The config the loader runs with.
    pub fn config(&self) -> &LoaderConfig {
        &self.shared.cfg
    }

    fn start(
        dataset: Arc<dyn Dataset>,
        cfg: LoaderConfig,
        skipped: Arc<SkippedImages>,
    ) -> Result<Self, DataError> {
        let bad = |field, message: String| Err(DataError::InvalidConfig { field, message });
        if cfg.batch_size == 0 {
            return bad("train.batchSizePerGpu", "must be >= 1, got 0".into());
        }
        if cfg.num_workers == 0 {
            return bad("data.numWorkers", "must be >= 1, got 0".into());
        }
        if dataset.is_empty() {
            return Err(DataError::Empty {
                path: dataset.describe().into(),
                detail: "the dataset has no images".into(),
            });
        }
        let augment = MultiCrop::new(cfg.crops.clone())?;
        let sampler = ShardedInfiniteSampler::new(
            dataset.len(),
            cfg.seed,
            cfg.rank,
            cfg.world_size,
            cfg.shuffle,
        )?;
        let segment = Segment {
            start_iteration: cfg.start_iteration,
            start_sample: cfg
                .start_sample
                .unwrap_or(cfg.start_iteration * (cfg.batch_size * cfg.world_size) as u64),
            batch_size: cfg.batch_size,
            world_size: cfg.world_size,
        };
        let state = State {
            next_claim: cfg.start_iteration,
            next_consume: cfg.start_iteration,
            ready: BTreeMap::new(),
            stop: false,
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            changed: Condvar::new(),
            dataset,
            sampler,
            segment,
            augment,
            skipped,
            cfg,
        });
        let workers = (0..shared.cfg.num_workers)
            .map(|i| {
                let shared = Arc::clone(&shared);
                std::thread::Builder::new()
                    .name(format!("data-{i}"))
                    .spawn(move || worker(&shared))
                    .map_err(DataError::Spawn)
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            shared,
            workers,
            wait: DataWait::default(),
        })
    }

    /// The next batch in iteration order; blocks until it is ready.
    pub fn next_batch(&mut self) -> Result<Batch, DataError> {
        let start = Instant::now();
        let mut state = self.shared.lock();
        let it = state.next_consume;
        if self.shared.cfg.end_iteration.is_some_and(|end| it >= end) {
            return Err(DataError::InvalidConfig {
                field: "data position",
                message: format!(
                    "iteration {it} is past this loader's end ({:?}); the next curriculum \
                     phase needs its own loader",
                    self.shared.cfg.end_iteration
                ),
            });
        }
        let result = loop {
            if let Some(result) = state.ready.remove(&it) {
                break result;
            }
            state = self
                .shared
                .changed
                .wait(state)
                .unwrap_or_else(|e| e.into_inner());
        };
        state.next_consume += 1;
        drop(state);
        self.shared.changed.notify_all();
        self.wait.last = start.elapsed();
        self.wait.total += self.wait.last;
        result
    }

    /// The iteration `next_batch` will return next (the data position to checkpoint).
    pub fn position(&self) -> u64 {
        self.shared.lock().next_consume
    }

    /// Global samples (all ranks) consumed before [`Self::position`]: with it, the data
    /// order continues exactly under another batch or world size.
    pub fn sample_position(&self) -> u64 {
        self.shared.segment.samples_before(self.position())
    }

    /// The sampler segment this loader produces.
    pub fn segment(&self) -> Segment {
        self.shared.segment
    }

    /// Batches built ahead and waiting for the consumer (at most `prefetch`): 0 when the next
    /// `next_batch` will wait for a worker.
    pub fn queue_depth(&self) -> usize {
        let state = self.shared.lock();
        let next = state.next_consume;
        state.ready.keys().filter(|&&it| it >= next).count()
    }

    pub fn data_wait(&self) -> DataWait {
        self.wait
    }

    /// Distinct unreadable images skipped so far (for `dinoflow_trainer_skipped_images`).
    pub fn skipped_counter(&self) -> Arc<AtomicU64> {
        self.shared.skipped.counter()
    }

    pub fn dataset(&self) -> &Arc<dyn Dataset> {
        &self.shared.dataset
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.changed.notify_all();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

fn worker(shared: &Shared) {
    loop {
        let it = {
            let mut state = shared.lock();
            let past_end = |next: u64| shared.cfg.end_iteration.is_some_and(|end| next >= end);
            while !state.stop
                && (state.next_claim >= state.next_consume + shared.cfg.prefetch.max(1) as u64
                    || past_end(state.next_claim))
            {
                state = shared
                    .changed
                    .wait(state)
                    .unwrap_or_else(|e| e.into_inner());
            }
            if state.stop {
                return;
            }
            state.next_claim += 1;
            state.next_claim - 1
        };
        // A panic in decoding must reach the consumer as an error, not leave it waiting.
        let result = catch_unwind(AssertUnwindSafe(|| build_batch(shared, it)))
            .unwrap_or_else(|p| Err(DataError::Worker(panic_message(&*p))));
        shared.lock().ready.insert(it, result);
        shared.changed.notify_all();
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}

fn build_batch(shared: &Shared, iteration: u64) -> Result<Batch, DataError> {
    let cfg = &shared.cfg;
    let crops = &cfg.crops;
    let b = cfg.batch_size;
    let (gl, ll) = (crops.global_len(), crops.local_len());
    let n_local = crops.local_crops_number;
    let mut global = vec![0f32; 2 * b * gl];
    let mut local = vec![0f32; n_local * b * ll];
    let mut global_slots: Vec<&mut [f32]> = global.chunks_exact_mut(gl).collect();
    let mut local_slots: Vec<&mut [f32]> = local.chunks_exact_mut(ll.max(1)).collect();
    let mut labels = Vec::with_capacity(b);
    let mut indices = Vec::with_capacity(b);
    for i in 0..b {
        let position = shared.segment.position(cfg.rank, iteration, i);
        let index = shared.sampler.index_at(position);
        let (used, sample) = shared.skipped.get_or_next(shared.dataset.as_ref(), index)?;
        let mut rng = sample_rng(cfg.seed, cfg.rank, iteration, i);
        let g1 = std::mem::take(&mut global_slots[i]);
        let g2 = std::mem::take(&mut global_slots[b + i]);
        let mut locals: Vec<&mut [f32]> = (0..n_local)
            .map(|k| std::mem::take(&mut local_slots[k * b + i]))
            .collect();
        shared
            .augment
            .apply(&sample.image, &mut rng, [g1, g2], &mut locals);
        labels.push(sample.label);
        indices.push(used);
    }
    drop((global_slots, local_slots));
    let (g, l) = (
        crops.global_crops_size as usize,
        crops.local_crops_size as usize,
    );
    Ok(Batch {
        iteration,
        global_crops: global,
        global_shape: [2 * b, 3, g, g],
        local_crops: local,
        local_shape: [n_local * b, 3, l, l],
        labels,
        indices,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Sample;
    use image::{Rgb, RgbImage};

    /// Images of varied sizes; every `bad_every`-th one is unreadable.
    struct Synthetic {
        len: usize,
        bad_every: Option<usize>,
    }

    impl Dataset for Synthetic {
        fn len(&self) -> usize {
            self.len
        }
        fn get(&self, i: usize) -> Result<Sample, DataError> {
            if self.bad_every.is_some_and(|k| i.is_multiple_of(k)) {
                return Err(DataError::Corrupt {
                    what: format!("img{i}"),
                    reason: "synthetic".into(),
                });
            }
            let (w, h) = (40 + (i as u32 * 7) % 30, 30 + (i as u32 * 5) % 40);
            let image = RgbImage::from_fn(w, h, |x, y| {
                Rgb([(x * 5 + i as u32) as u8, (y * 3) as u8, (x ^ y) as u8])
            });
            Ok(Sample {
                image,
                label: Some((i % 4) as u32),
            })
        }
        fn num_classes(&self) -> Option<usize> {
            Some(4)
        }
        fn describe(&self) -> String {
            "synthetic".into()
        }
    }

    fn small(start: u64, workers: usize) -> LoaderConfig {
        LoaderConfig {
            batch_size: 3,
            num_workers: workers,
            prefetch: 2,
            seed: 42,
            start_iteration: start,
            crops: MultiCropConfig {
                global_crops_size: 24,
                local_crops_size: 12,
                local_crops_number: 2,
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn take(loader: &mut Loader, n: usize) -> Vec<Batch> {
        (0..n).map(|_| loader.next_batch().unwrap()).collect()
    }

    #[test]
    fn batches_are_crop_major_with_the_right_shapes() {
        let ds: Arc<dyn Dataset> = Arc::new(Synthetic {
            len: 10,
            bad_every: None,
        });
        let mut loader = Loader::new(ds, small(0, 2)).unwrap();
        let b = loader.next_batch().unwrap();
        assert_eq!(b.global_shape, [6, 3, 24, 24]);
        assert_eq!(b.local_shape, [6, 3, 12, 12]);
        assert_eq!(b.global_crops.len(), 6 * 3 * 24 * 24);
        assert_eq!(b.labels.len(), 3);
        assert_eq!(b.global_tensor().size(), [6, 3, 24, 24]);
        assert_eq!(b.labels_tensor().size(), [3]);
        assert_eq!(loader.position(), 1);
    }

    #[test]
    fn the_queue_fills_up_to_prefetch_and_drains_as_batches_are_taken() {
        let ds: Arc<dyn Dataset> = Arc::new(Synthetic {
            len: 10,
            bad_every: None,
        });
        let mut loader = Loader::new(ds, small(0, 2)).unwrap();
        let full = |loader: &Loader| {
            let deadline = Instant::now() + Duration::from_secs(20);
            while loader.queue_depth() < 2 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            loader.queue_depth()
        };
        // prefetch 2: the workers stop two batches ahead of the consumer.
        assert_eq!(full(&loader), 2);
        loader.next_batch().unwrap();
        assert_eq!(full(&loader), 2, "refilled after a take");
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(loader.queue_depth(), 2, "never more than prefetch");
    }

    #[test]
    fn a_loader_resumed_at_iteration_k_yields_the_batches_of_an_uninterrupted_run() {
        let ds: Arc<dyn Dataset> = Arc::new(Synthetic {
            len: 7,
            bad_every: None,
        });
        let full = take(&mut Loader::new(Arc::clone(&ds), small(0, 3)).unwrap(), 6);
        let resumed = take(&mut Loader::new(Arc::clone(&ds), small(4, 1)).unwrap(), 2);
        assert_eq!(resumed, full[4..6]);
        // The batches really change from one iteration to the next (the test can fail).
        assert_ne!(full[4].global_crops, full[5].global_crops);
    }

    #[test]
    fn ranks_draw_disjoint_images_in_one_pass() {
        let ds: Arc<dyn Dataset> = Arc::new(Synthetic {
            len: 12,
            bad_every: None,
        });
        let mut seen = Vec::new();
        for rank in 0..2 {
            let cfg = LoaderConfig {
                rank,
                world_size: 2,
                batch_size: 2,
                ..small(0, 1)
            };
            let mut loader = Loader::new(Arc::clone(&ds), cfg).unwrap();
            seen.extend(take(&mut loader, 3).into_iter().flat_map(|b| b.indices));
        }
        seen.sort();
        assert_eq!(seen, (0..12).collect::<Vec<_>>());
    }

    #[test]
    fn a_loader_continued_with_another_batch_and_world_size_draws_the_next_samples() {
        let ds: Arc<dyn Dataset> = Arc::new(Synthetic {
            len: 11,
            bad_every: None,
        });
        // One rank, batch 3, for 4 iterations: 12 samples, one image of pass 2 consumed.
        let mut first = Loader::new(Arc::clone(&ds), small(0, 2)).unwrap();
        let mut seen: Vec<usize> = take(&mut first, 4)
            .into_iter()
            .flat_map(|b| b.indices)
            .collect();
        assert_eq!(first.sample_position(), 12);
        // Then two ranks with batch 5 from iteration 4: positions 12..32 (the rest of
        // pass 2 and all of pass 3 except its last image).
        for rank in 0..2 {
            let cfg = LoaderConfig {
                rank,
                world_size: 2,
                batch_size: 5,
                start_iteration: 4,
                start_sample: Some(first.sample_position()),
                ..small(0, 1)
            };
            let mut loader = Loader::new(Arc::clone(&ds), cfg).unwrap();
            seen.extend(take(&mut loader, 2).into_iter().flat_map(|b| b.indices));
            assert_eq!(loader.sample_position(), 32);
        }
        // Together: global positions 0..32 exactly once each, whichever rank drew them
        // (two whole passes of the 11 images, then ten of the third).
        let sampler = ShardedInfiniteSampler::new(11, 42, 0, 1, true).unwrap();
        let mut want: Vec<usize> = (0..32).map(|g| sampler.index_at(g)).collect();
        want.sort();
        seen.sort();
        assert_eq!(seen, want);
        assert!((0..11).all(|i| seen.iter().filter(|&&j| j == i).count() >= 2));
    }

    #[test]
    fn unreadable_images_are_replaced_deterministically_and_counted_once() {
        let ds: Arc<dyn Dataset> = Arc::new(Synthetic {
            len: 9,
            bad_every: Some(3),
        });
        let mut loader = Loader::new(Arc::clone(&ds), small(0, 2)).unwrap();
        let batches = take(&mut loader, 6);
        assert!(batches.iter().flat_map(|b| &b.indices).all(|i| i % 3 != 0));
        assert_eq!(
            loader
                .skipped_counter()
                .load(std::sync::atomic::Ordering::Relaxed),
            3
        );
        let again = take(&mut Loader::new(ds, small(0, 1)).unwrap(), 6);
        assert_eq!(again, batches);
    }

    #[test]
    fn a_seek_keeps_the_record_of_unreadable_images() {
        let ds: Arc<dyn Dataset> = Arc::new(Synthetic {
            len: 9,
            bad_every: Some(3),
        });
        let mut loader = Loader::new(Arc::clone(&ds), small(0, 1)).unwrap();
        take(&mut loader, 6);
        let counter = loader.skipped_counter();
        assert_eq!(counter.load(std::sync::atomic::Ordering::Relaxed), 3);
        loader.seek(2).unwrap();
        take(&mut loader, 6);
        // The same three images, not counted (nor logged) again after the restart.
        assert_eq!(counter.load(std::sync::atomic::Ordering::Relaxed), 3);
        assert_eq!(loader.position(), 8);
    }

    #[test]
    fn a_dataset_of_only_unreadable_images_is_a_permanent_error() {
        let ds: Arc<dyn Dataset> = Arc::new(Synthetic {
            len: 4,
            bad_every: Some(1),
        });
        let err = Loader::new(ds, small(0, 1))
            .unwrap()
            .next_batch()
            .unwrap_err();
        assert!(
            matches!(err, DataError::NothingReadable { .. }) && err.is_permanent(),
            "{err}"
        );
    }

    #[test]
    fn bad_loader_settings_are_refused_with_the_field_name() {
        let ds: Arc<dyn Dataset> = Arc::new(Synthetic {
            len: 4,
            bad_every: None,
        });
        let err = Loader::new(
            Arc::clone(&ds),
            LoaderConfig {
                num_workers: 0,
                ..small(0, 1)
            },
        )
        .unwrap_err();
        assert!(err.to_string().starts_with("data.numWorkers"), "{err}");
        let err = Loader::new(
            ds,
            LoaderConfig {
                batch_size: 0,
                ..small(0, 1)
            },
        )
        .unwrap_err();
        assert!(
            err.to_string().starts_with("train.batchSizePerGpu"),
            "{err}"
        );
    }
}
