//! Data-parallel layout of the student: which gradients are reduced how, and who holds which
//! optimizer state. The one place that knows about sharding; the step calls into it.
//!
//! FSDP semantics without autograd hooks (tch has none): the student's parameters are grouped
//! into *flat units* as the official `get_fsdp_wrapper(..., modules_to_wrap={BlockChunk})`
//! wraps them ([`units`]), and after backward each unit's gradients are flattened, padded to a
//! multiple of the world size and
//! - `NO_SHARD`: all-reduced; every rank keeps the whole gradient and the whole AdamW state;
//! - `SHARD_GRAD_OP` (the official default): reduce-scattered, so rank r keeps only its fp32
//!   `1/W` slice of the gradient and the AdamW moments of that slice; after the update the
//!   slices are all-gathered back into the full parameters the next forward uses.
//!
//! `FULL_SHARD` (parameters also sharded between uses) is refused at validation: without
//! autograd hooks, freeing a unit's parameters after its forward and re-gathering them for
//! its backward needs a per-unit recomputation scheme this trainer does not implement.
//!
//! The teacher is kept as a full replica on every rank (it has neither gradients nor optimizer
//! state, so sharding it would only save parameter memory): its EMA runs locally on the full
//! student parameters, which are identical on every rank after the all-gather, so the EMA
//! needs no communication at all.

use tch::Kind;

mod chunks;
mod sharded;
mod units;

pub use chunks::{ShardLoadError, qualified};
pub use sharded::{MemoryBytes, ShardedStudent};
pub use units::{Unit, plan_units};

/// How one student sub-module's gradients and optimizer state are distributed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sharding {
    /// Replicated (DDP-like): gradients all-reduced, full AdamW state on every rank.
    NoShard,
    /// Gradients reduce-scattered into fp32 shards, AdamW state for the shard only.
    ShardGradOp,
}

/// Sharding and gradient-communication dtype of one student sub-module.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModuleParallel {
    pub sharding: Sharding,
    /// dtype gradients travel in between ranks (official `reduce_dtype`); the reduced result
    /// is always accumulated back into fp32.
    pub reduce_kind: Kind,
}

impl Default for ModuleParallel {
    fn default() -> Self {
        Self {
            sharding: Sharding::NoShard,
            reduce_kind: Kind::Float,
        }
    }
}

/// The student's parallel layout (`training.sharding.student`, the student `reduceDtype`s and
/// `model.blockChunks`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ParallelConfig {
    pub backbone: ModuleParallel,
    pub dino_head: ModuleParallel,
    pub ibot_head: ModuleParallel,
    /// Official `student.block_chunks`: the backbone's blocks form this many FSDP units
    /// (`depth / block_chunks` consecutive blocks each); 0 = the whole backbone is one unit.
    pub block_chunks: u32,
}

impl ParallelConfig {
    /// Settings of the sub-module `name` (`backbone`, `dino_head`, `ibot_head`).
    pub fn module(&self, name: &str) -> ModuleParallel {
        match name {
            "backbone" => self.backbone,
            "dino_head" => self.dino_head,
            _ => self.ibot_head,
        }
    }

    /// Whether any sub-module is sharded (then the step goes through [`ShardedStudent`]).
    pub fn any_sharded(&self) -> bool {
        [self.backbone, self.dino_head, self.ibot_head]
            .iter()
            .any(|m| m.sharding == Sharding::ShardGradOp)
    }
}

/// The replicated (`NO_SHARD`) reduction: averages each group of gradients over the ranks,
/// communicating in its reduce dtype. fp32 groups go through [`crate::dist::average_gradients`]
/// unchanged; a 16-bit group is divided by the world size first (so the sum cannot overflow),
/// sent in that dtype and written back into the fp32 gradients.
pub fn average_gradients_by_kind(
    collective: &dyn crate::dist::Collective,
    groups: Vec<(Kind, Vec<tch::Tensor>)>,
) {
    let world = collective.world_size();
    if world == 1 {
        return;
    }
    let mut same: Vec<tch::Tensor> = Vec::new();
    for (kind, mut grads) in groups {
        if grads.iter().all(|g| g.kind() == kind) {
            same.append(&mut grads);
            continue;
        }
        let mut low: Vec<tch::Tensor> = tch::no_grad(|| {
            grads
                .iter()
                .map(|g| (g / world as f64).to_kind(kind))
                .collect()
        });
        crate::dist::sum_gradients(collective, &mut low);
        tch::no_grad(|| {
            for (g, l) in grads.iter_mut().zip(&low) {
                g.copy_(l);
            }
        });
    }
    crate::dist::average_gradients(collective, &mut same);
}
