//! The sharded infinite sampler and the per-sample random streams.
//!
//! Everything is a pure function of (seed, pass, rank, iteration, index in batch), so any
//! iteration's batch can be produced without replaying the ones before it: resuming at
//! iteration k yields exactly the batches an uninterrupted run would have seen.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use super::DataError;

/// ChaCha stream of the per-pass permutations; per-sample streams use stream 0, so the two
/// never share key stream even when their 256-bit keys coincide.
const PERMUTATION_STREAM: u64 = 1;

/// Like DINOv2's `InfiniteSampler`: an endless sequence of passes over the dataset, each a
/// fresh permutation (seeded by `(seed, pass)`), of which rank `r` takes positions
/// `r, r + world_size, r + 2·world_size, ...`.
#[derive(Debug)]
pub struct ShardedInfiniteSampler {
    len: usize,
    seed: u64,
    rank: usize,
    world_size: usize,
    shuffle: bool,
    per_pass: usize,
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
        let per_pass = (len - rank).div_ceil(world_size);
        Ok(Self {
            len,
            seed,
            rank,
            world_size,
            shuffle,
            per_pass,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// Samples this rank sees per pass.
    pub fn per_pass(&self) -> usize {
        self.per_pass
    }

    /// Dataset index of this rank's `j`-th sample (`j = iteration · batch + position`).
    pub fn index(&self, j: u64) -> usize {
        let pass = j / self.per_pass as u64;
        let pos = self.rank + (j % self.per_pass as u64) as usize * self.world_size;
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
        let s = ShardedInfiniteSampler::new(7, 0, 1, 2, false).unwrap();
        assert_eq!(
            (0..5).map(|j| s.index(j)).collect::<Vec<_>>(),
            [1, 3, 5, 1, 3]
        );
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
