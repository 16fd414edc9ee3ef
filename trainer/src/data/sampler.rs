//! The sharded infinite sampler and the per-sample random streams.
//!
//! The data order is one global stream of sample positions `0, 1, 2, ...`: position `g` is
//! entry `g mod len` of pass `g / len`'s permutation (seeded by `(seed, pass)`). A run is a
//! sequence of [`Segment`]s — stretches of iterations with one batch size per rank and one
//! world size (a curriculum phase, or the time between two resumes on different world
//! sizes) — and each maps (rank, iteration, index in batch) to a global position. Everything
//! is a pure function of those coordinates, so any iteration's batch can be produced without
//! replaying the ones before it, and when the batch size or the world size changes the next
//! segment continues the stream exactly where the last one stopped: no sample is skipped or
//! repeated.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use super::DataError;

/// ChaCha stream of the per-pass permutations; per-sample streams use stream 0, so the two
/// never share key stream even when their 256-bit keys coincide.
const PERMUTATION_STREAM: u64 = 1;

/// A stretch of iterations with one batch size per rank and one world size. Rank `r`'s
/// sample `b` of iteration `i` is global position
/// `start_sample + ((i - start_iteration)·batch_size + b)·world_size + r`: each iteration
/// takes the next `batch_size·world_size` positions, interleaved over the ranks as DINOv2's
/// `InfiniteSampler` strides a pass (`r, r + W, r + 2W, ...`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// First iteration of the segment.
    pub start_iteration: u64,
    /// Global samples consumed before `start_iteration`.
    pub start_sample: u64,
    /// Images per iteration on each rank.
    pub batch_size: usize,
    pub world_size: usize,
}

impl Segment {
    /// The segment of a run that has one batch size and world size from iteration 0.
    pub fn from_start(batch_size: usize, world_size: usize) -> Self {
        Self {
            start_iteration: 0,
            start_sample: 0,
            batch_size,
            world_size,
        }
    }

    /// Global samples per iteration (all ranks).
    pub fn samples_per_iteration(&self) -> u64 {
        (self.batch_size * self.world_size) as u64
    }

    /// Global position of rank `rank`'s sample `index_in_batch` of `iteration`
    /// (`iteration >= start_iteration`).
    pub fn position(&self, rank: usize, iteration: u64, index_in_batch: usize) -> u64 {
        debug_assert!(iteration >= self.start_iteration && index_in_batch < self.batch_size);
        let step = iteration - self.start_iteration;
        self.start_sample
            + (step * self.batch_size as u64 + index_in_batch as u64) * self.world_size as u64
            + rank as u64
    }

    /// Global samples consumed before `iteration` (the data position to checkpoint).
    pub fn samples_before(&self, iteration: u64) -> u64 {
        debug_assert!(iteration >= self.start_iteration);
        self.start_sample + (iteration - self.start_iteration) * self.samples_per_iteration()
    }

    /// The segment that continues this one at `iteration` with another batch size or world
    /// size.
    pub fn continued(&self, iteration: u64, batch_size: usize, world_size: usize) -> Self {
        Self {
            start_iteration: iteration,
            start_sample: self.samples_before(iteration),
            batch_size,
            world_size,
        }
    }
}

/// Like DINOv2's `InfiniteSampler`: an endless sequence of passes over the dataset, each a
/// fresh permutation (seeded by `(seed, pass)`), of which rank `r` takes global positions
/// `r, r + world_size, r + 2·world_size, ...`. The stream runs on across pass boundaries:
/// when the dataset length is not a multiple of the world size, a pass's last positions go to
/// the first ranks and the next pass starts at the rank after them, so every pass is covered
/// exactly once whatever the world size (the official sampler restarts every rank's stride
/// at each pass, which makes the short ranks see their share more often and has no global
/// position to continue from on another world size). The two orders are identical when the
/// world size divides the dataset length (always for one rank).
#[derive(Debug)]
pub struct ShardedInfiniteSampler {
    len: usize,
    seed: u64,
    rank: usize,
    world_size: usize,
    shuffle: bool,
    cache: Mutex<HashMap<u64, Arc<Vec<u32>>>>,
}

impl ShardedInfiniteSampler {
    pub fn new(
        len: usize,
        seed: u64,
        rank: usize,
        world_size: usize,
        shuffle: bool,
    ) -> Result<Self, DataError> {
        if world_size == 0 || rank >= world_size {
            return Err(DataError::InvalidConfig {
                field: "rank",
                message: format!("rank {rank} is outside world size {world_size}"),
            });
        }
        if len < world_size {
            return Err(DataError::InvalidConfig {
                field: "data.path",
                message: format!(
                    "the dataset has {len} images, fewer than the {world_size} ranks; every rank needs at least one"
                ),
            });
        }
        if u32::try_from(len).is_err() {
            return Err(DataError::InvalidConfig {
                field: "data.path",
                message: format!("{len} images exceed the sampler's 2^32 limit"),
            });
        }
        Ok(Self {
            len,
            seed,
            rank,
            world_size,
            shuffle,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// Samples this rank sees in the first pass.
    pub fn per_pass(&self) -> usize {
        (self.len - self.rank).div_ceil(self.world_size)
    }

    /// Dataset index of this rank's `j`-th sample in a run of one segment from 0
    /// (`j = iteration · batch + position`).
    pub fn index(&self, j: u64) -> usize {
        self.index_at(j * self.world_size as u64 + self.rank as u64)
    }

    /// Dataset index at global position `position` (see [`Segment::position`]).
    pub fn index_at(&self, position: u64) -> usize {
        let pass = position / self.len as u64;
        let pos = (position % self.len as u64) as usize;
        if !self.shuffle {
            return pos;
        }
        self.permutation(pass)[pos] as usize
    }
    fn permutation(&self, pass: u64) -> Arc<Vec<u32>> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = cache.get(&pass) {
            return Arc::clone(p);
        }
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&self.seed.to_le_bytes());
        key[8..16].copy_from_slice(&pass.to_le_bytes());
        let mut rng = ChaCha8Rng::from_seed(key);
        rng.set_stream(PERMUTATION_STREAM);
        let mut perm: Vec<u32> = (0..self.len as u32).collect();
        perm.shuffle(&mut rng);
        let perm = Arc::new(perm);
        // Workers straddle at most two passes; keep the cache that small.
        cache.retain(|&p, _| p + 1 >= pass);
        cache.insert(pass, Arc::clone(&perm));
        perm
    }
}

/// The random stream of one sample: keyed by (seed, rank, iteration, index in batch), so it is
/// independent of worker count, scheduling and where the run started.
pub fn sample_rng(seed: u64, rank: usize, iteration: u64, index_in_batch: usize) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    for (i, v) in [seed, rank as u64, iteration, index_in_batch as u64]
        .into_iter()
        .enumerate()
    {
        key[i * 8..(i + 1) * 8].copy_from_slice(&v.to_le_bytes());
    }
    ChaCha8Rng::from_seed(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    #[test]
    fn the_ranks_of_one_pass_cover_the_dataset_exactly_once() {
        let (len, world) = (10, 3);
        let mut seen = Vec::new();
        for rank in 0..world {
            let s = ShardedInfiniteSampler::new(len, 7, rank, world, true).unwrap();
            seen.extend((0..s.per_pass() as u64).map(|j| s.index(j)));
        }
        seen.sort();
        assert_eq!(seen, (0..len).collect::<Vec<_>>());
    }

    #[test]
    fn every_pass_is_a_new_permutation_fixed_by_the_seed() {
        let s = ShardedInfiniteSampler::new(50, 1, 0, 1, true).unwrap();
        let pass = |p: u64| (0..50).map(|j| s.index(p * 50 + j)).collect::<Vec<_>>();
        assert_ne!(pass(0), pass(1));
        let mut sorted = pass(1);
        sorted.sort();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
        let again = ShardedInfiniteSampler::new(50, 1, 0, 1, true).unwrap();
        assert_eq!(
            (0..50).map(|j| again.index(50 + j)).collect::<Vec<_>>(),
            pass(1)
        );
        let other = ShardedInfiniteSampler::new(50, 2, 0, 1, true).unwrap();
        assert_ne!((0..50).map(|j| other.index(j)).collect::<Vec<_>>(), pass(0));
    }

    #[test]
    fn without_shuffle_a_rank_walks_its_stride_in_order() {
        let s = ShardedInfiniteSampler::new(8, 0, 1, 2, false).unwrap();
        assert_eq!(
            (0..5).map(|j| s.index(j)).collect::<Vec<_>>(),
            [1, 3, 5, 7, 1]
        );
        // With 7 images the stride runs on into the next pass: rank 0 takes the pass's last
        // image (6), so rank 1 starts the next pass at 0 (no image is seen twice as often).
        let s = ShardedInfiniteSampler::new(7, 0, 1, 2, false).unwrap();
        assert_eq!(
            (0..5).map(|j| s.index(j)).collect::<Vec<_>>(),
            [1, 3, 5, 0, 2]
        );
    }

    /// The per-rank order of the official sampler (each pass restarts every rank's stride).
    fn official_order(len: usize, seed: u64, rank: usize, world: usize, j: u64) -> usize {
        let per_pass = (len - rank).div_ceil(world) as u64;
        let s = ShardedInfiniteSampler::new(len, seed, 0, 1, true).unwrap();
        let (pass, k) = (j / per_pass, j % per_pass);
        s.index_at(pass * len as u64 + rank as u64 + k * world as u64)
    }

    #[test]
    fn one_segment_from_zero_is_the_official_order_when_the_world_divides_the_dataset() {
        for (len, world) in [(12, 1), (12, 3), (12, 4), (7, 1)] {
            for rank in 0..world {
                let s = ShardedInfiniteSampler::new(len, 5, rank, world, true).unwrap();
                let seg = Segment::from_start(3, world);
                for it in 0..10u64 {
                    for b in 0..3 {
                        let j = it * 3 + b as u64;
                        let ours = s.index_at(seg.position(rank, it, b));
                        assert_eq!(ours, s.index(j));
                        assert_eq!(
                            ours,
                            official_order(len, 5, rank, world, j),
                            "{len} {world}"
                        );
                    }
                }
            }
        }
    }

    /// Every global position a run of `segments` (each until the next one's start, the last
    /// one for `tail` iterations) hands to some rank, in iteration order.
    fn positions(segments: &[Segment], tail: u64) -> Vec<u64> {
        let mut out = Vec::new();
        for (i, seg) in segments.iter().enumerate() {
            let end = segments
                .get(i + 1)
                .map_or(seg.start_iteration + tail, |n| n.start_iteration);
            for it in seg.start_iteration..end {
                for rank in 0..seg.world_size {
                    out.extend((0..seg.batch_size).map(|b| seg.position(rank, it, b)));
                }
            }
        }
        out
    }

    #[test]
    fn no_sample_is_skipped_or_repeated_when_the_batch_or_the_world_size_changes() {
        let len = 17;
        // B=3 on 2 ranks, then B=2 on 3 ranks from iteration 5, then B=5 on 1 rank from 9.
        let a = Segment::from_start(3, 2);
        let b = a.continued(5, 2, 3);
        let c = b.continued(9, 5, 1);
        assert_eq!((b.start_sample, c.start_sample), (30, 54));
        let mut seen = positions(&[a, b, c], 6);
        let n = seen.len() as u64;
        assert_eq!(n, 30 + 24 + 30);
        seen.sort();
        assert_eq!(
            seen,
            (0..n).collect::<Vec<_>>(),
            "a contiguous prefix, no gaps"
        );
        // And the images: every complete pass is a permutation of the dataset, whichever
        // rank drew each of its positions.
        let sampler = ShardedInfiniteSampler::new(len, 9, 0, 1, true).unwrap();
        for pass in 0..n / len as u64 {
            let mut images: Vec<usize> = (pass * len as u64..(pass + 1) * len as u64)
                .map(|g| sampler.index_at(g))
                .collect();
            images.sort();
            assert_eq!(images, (0..len).collect::<Vec<_>>());
        }
        // The data position at each boundary is where the next segment starts.
        assert_eq!(a.samples_before(5), b.start_sample);
        assert_eq!(c.samples_before(15), n);
    }

    #[test]
    fn a_dataset_smaller_than_the_world_is_refused() {
        let err = ShardedInfiniteSampler::new(2, 0, 0, 4, true).unwrap_err();
        assert!(
            err.is_permanent() && err.to_string().contains("fewer than the 4 ranks"),
            "{err}"
        );
    }

    #[test]
    fn sample_streams_differ_in_every_coordinate() {
        let draw = |s, r, i, b| sample_rng(s, r, i, b).random::<u64>();
        let base = draw(1, 0, 5, 3);
        assert_eq!(base, draw(1, 0, 5, 3));
        for other in [
            draw(2, 0, 5, 3),
            draw(1, 1, 5, 3),
            draw(1, 0, 6, 3),
            draw(1, 0, 5, 4),
        ] {
            assert_ne!(base, other);
        }
    }
}
