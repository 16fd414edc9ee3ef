//! Cross-rank communication used by the losses and the training step.
//!
//! Everything that the reference implementation reduces with `torch.distributed` (teacher
//! centers, Sinkhorn–Knopp sums, the iBOT masked-patch count, logged losses) goes through the
//! [`Collective`] trait, so the maths is written once and the transport (NCCL, gloo, ...) is
//! chosen at start-up. [`Single`] is the world-size-1 backend; real backends come with the
//! distributed work.

use tch::Tensor;

/// A group of ranks that can sum tensors across all members.
///
/// Implementations must be collective: every rank calls the same methods in the same order
/// with tensors of the same shape and dtype.
pub trait Collective: Send + Sync {
    /// Number of ranks in the group (≥ 1).
    fn world_size(&self) -> usize;

    /// This process's rank, in `0..world_size()`.
    fn rank(&self) -> usize;

    /// Replaces `t` on every rank by the element-wise sum of `t` over all ranks.
    fn all_reduce_sum(&self, t: &mut Tensor);
}

/// The trivial group of one process: reductions are the identity.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Single;

impl Collective for Single {
    fn world_size(&self) -> usize {
        1
    }

    fn rank(&self) -> usize {
        0
    }

    fn all_reduce_sum(&self, _t: &mut Tensor) {}
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Test double for a multi-rank group: every rank is assumed to hold the same tensor, so
    /// the sum is `world_size × t`. Records how many reductions were issued.
    #[derive(Debug)]
    pub(crate) struct Replicated {
        pub world_size: usize,
        pub calls: Mutex<usize>,
    }

    impl Replicated {
        pub(crate) fn new(world_size: usize) -> Self {
            Self {
                world_size,
                calls: Mutex::new(0),
            }
        }
    }

    impl Collective for Replicated {
        fn world_size(&self) -> usize {
            self.world_size
        }
        fn rank(&self) -> usize {
            0
        }
        fn all_reduce_sum(&self, t: &mut Tensor) {
            *self.calls.lock().unwrap() += 1;
            let _ = t.g_mul_scalar_(self.world_size as i64);
        }
    }

    #[test]
    fn single_is_rank_zero_of_one_and_leaves_tensors_unchanged() {
        let single = Single;
        assert_eq!(single.world_size(), 1);
        assert_eq!(single.rank(), 0);
        let mut t = Tensor::from_slice(&[1.0f32, -2.0, 3.5]);
        single.all_reduce_sum(&mut t);
        assert_eq!(Vec::<f32>::try_from(&t).unwrap(), vec![1.0, -2.0, 3.5]);
    }

    #[test]
    fn replicated_double_sums_over_its_ranks() {
        let group = Replicated::new(4);
        let mut t = Tensor::from_slice(&[1.0f32, 2.0]);
        group.all_reduce_sum(&mut t);
        assert_eq!(Vec::<f32>::try_from(&t).unwrap(), vec![4.0, 8.0]);
        assert_eq!(*group.calls.lock().unwrap(), 1);
    }
}
