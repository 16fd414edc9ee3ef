//! [`World`]: where this process sits in the run. Built once per process from the
//! environment contract and passed down; the only place that knows this process's rank, its
//! node-local rank, its device and the collective joining it to the other ranks.
use std::sync::Arc;

use tch::Device;

use super::{Collective, CollectiveError, DistEnv, Single, init};
use crate::env::{EnvError, Lookup};

/// Why the world could not be formed.
#[derive(Debug, thiserror::Error)]
pub enum WorldError {
    /// `RANK`, `WORLD_SIZE`, `MASTER_*`, ... missing or malformed: a pod spec no restart fixes.
    #[error(transparent)]
    Env(#[from] EnvError),
    /// The rendezvous failed (a peer is late or gone): a restart of the gang may succeed.
    #[error("distributed setup: {0}")]
    Rendezvous(#[source] CollectiveError),
}

/// This process's place in the run: rank, world size, local rank, device and collective.
#[derive(Clone)]
pub struct World {
    rank: usize,
    world_size: usize,
    local_rank: usize,
    device: Device,
    collective: Arc<dyn Collective>,
}

impl std::fmt::Debug for World {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("World")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .field("local_rank", &self.local_rank)
            .field("device", &self.device)
            .finish()
    }
}

impl World {
    /// Reads `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, ... (set by `launch`) and
    /// meets the other ranks; with none of them set, a world of one process.
    pub fn from_env<F: Fn(&str) -> Option<String>>(env: &Lookup<F>) -> Result<Self, WorldError> {
        let dist = DistEnv::from_lookup(env)?;
        let local_rank = dist.as_ref().map_or(0, |d| d.local_rank);
        let device = device_for(local_rank);
        let collective = init(dist.as_ref(), device).map_err(WorldError::Rendezvous)?;
        Ok(Self::new(collective, local_rank, device))
    }

    /// One process (rank 0 of 1) on the first GPU when there is one, else the CPU.
    pub fn single() -> Self {
        Self::new(Arc::new(Single), 0, device_for(0))
    }

    /// A world over an existing collective (tests, tools).
    pub fn new(collective: Arc<dyn Collective>, local_rank: usize, device: Device) -> Self {
        Self {
            rank: collective.rank(),
            world_size: collective.world_size(),
            local_rank,
            device,
            collective,
        }
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// Rank among the processes of this node (`LOCAL_RANK`).
    pub fn local_rank(&self) -> usize {
        self.local_rank
    }

    /// The device this process computes on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The group of all ranks; gradient averaging, the losses' reductions and the loop's
    /// agreements go through it.
    pub fn collective(&self) -> &Arc<dyn Collective> {
        &self.collective
    }

    /// Rank 0: the replicas are identical (data parallelism), so only it writes checkpoints
    /// and metrics.jsonl, evaluates and reports progress.
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    /// The first process of its node: the one that serves the node's metrics endpoint.
    pub fn is_node_main(&self) -> bool {
        self.local_rank == 0
    }
}

/// CUDA device `local_rank` (modulo the node's GPUs) when CUDA is there, else the CPU.
fn device_for(local_rank: usize) -> Device {
    match crate::cuda_backend::load() {
        crate::cuda_backend::CudaBackend::Unavailable(why) => tracing::warn!(
            "an NVIDIA driver is present but {} could not be loaded ({why}): training on the CPU; \
             put the torch install's lib directory on LD_LIBRARY_PATH",
            crate::cuda_backend::LIBRARY
        ),
        crate::cuda_backend::CudaBackend::Loaded | crate::cuda_backend::CudaBackend::NoDriver => {}
    }
    if !tch::Cuda::is_available() {
        return Device::Cpu;
    }
    Device::Cuda(local_rank % tch::Cuda::device_count().max(1) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::tests::lookup;

    #[test]
    fn without_rank_variables_the_world_is_one_process_on_rank_zero() {
        let world = World::from_env(&lookup(&[])).unwrap();
        assert_eq!(
            (world.rank(), world.world_size(), world.local_rank()),
            (0, 1, 0)
        );
        assert!(world.is_main() && world.is_node_main());
    }

    #[test]
    fn a_half_set_environment_is_an_env_error_not_a_rendezvous_failure() {
        let err = World::from_env(&lookup(&[("WORLD_SIZE", "2")])).unwrap_err();
        assert!(
            matches!(&err, WorldError::Env(e) if e.name() == "RANK"),
            "{err}"
        );
    }

    #[test]
    fn a_world_of_one_over_a_given_collective_takes_its_rank() {
        let world = World::new(Arc::new(Single), 3, Device::Cpu);
        assert_eq!((world.rank(), world.local_rank()), (0, 3));
        assert!(world.is_main() && !world.is_node_main());
    }
}
