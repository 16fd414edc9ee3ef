//! The pod side of the contract between operator and trainer (`DESIGN.md`, "Contracts
//! between operator and trainer"): the job kinds both sides name, in one place.

/// The two kinds of job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum JobKind {
    Pretrain,
    Distill,
}

impl JobKind {
    /// The Kubernetes kind, also the value of `DINOFLOW_JOB_KIND` in a pod.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pretrain => "PretrainJob",
            Self::Distill => "DistillJob",
        }
    }

    /// The trainer subcommand that runs this kind (`dinoflow-trainer launch <it>`).
    pub fn trainer_subcommand(self) -> &'static str {
        match self {
            Self::Pretrain => "train",
            Self::Distill => "distill",
        }
    }

    /// Parses a Kubernetes kind.
    pub fn from_kind(kind: &str) -> Option<Self> {
        match kind {
            "PretrainJob" => Some(Self::Pretrain),
            "DistillJob" => Some(Self::Distill),
            _ => None,
        }
    }
}

// Environment variables of a trainer pod: the operator sets them, `dinoflow-trainer launch`
// reads them and sets the per-process ones for its workers (DESIGN.md, "Contracts between
// operator and trainer"). Each constant is named like its variable.

/// Host of rank 0's rendezvous (the first pod's stable DNS name).
pub const MASTER_ADDR: &str = "MASTER_ADDR";
/// TCP port of rank 0's rendezvous.
pub const MASTER_PORT: &str = "MASTER_PORT";
/// Number of pods (nodes) of the gang.
pub const NNODES: &str = "NNODES";
/// This pod's index in `0..NNODES`.
pub const NODE_RANK: &str = "NODE_RANK";
/// Processes the launcher forks on this node (GPUs per node; 0, a CPU pod, means 1).
pub const NPROC_PER_NODE: &str = "NPROC_PER_NODE";
/// Processes of the whole gang (`NNODES * NPROC_PER_NODE`).
pub const WORLD_SIZE: &str = "WORLD_SIZE";
/// A worker's global rank (set by the launcher, torchrun's numbering).
pub const RANK: &str = "RANK";
/// A worker's rank on its node (set by the launcher; picks the GPU).
pub const LOCAL_RANK: &str = "LOCAL_RANK";
/// Workers on this node (set by the launcher).
pub const LOCAL_WORLD_SIZE: &str = "LOCAL_WORLD_SIZE";
/// Namespace of the job.
pub const DINOFLOW_NAMESPACE: &str = "DINOFLOW_NAMESPACE";
/// Name of the job.
pub const DINOFLOW_JOB: &str = "DINOFLOW_JOB";
/// Kind of the job ([`JobKind::as_str`]).
pub const DINOFLOW_JOB_KIND: &str = "DINOFLOW_JOB_KIND";
/// Which attempt (gang restart) of the job the pod belongs to.
pub const DINOFLOW_RUN_ATTEMPT: &str = "DINOFLOW_RUN_ATTEMPT";
/// The operator's progress endpoint (`http://...`), where rank 0 reports.
pub const DINOFLOW_PROGRESS_ENDPOINT: &str = "DINOFLOW_PROGRESS_ENDPOINT";
/// The resolved checkpoint of a DistillJob's `teacher.pretrainJob`.
pub const TEACHER_CHECKPOINT: &str = "DINOFLOW_TEACHER_CHECKPOINT";
/// Seconds the ranks wait for each other at start (default 900).
pub const DINOFLOW_RENDEZVOUS_TIMEOUT_SECONDS: &str = "DINOFLOW_RENDEZVOUS_TIMEOUT_SECONDS";
/// Seconds one collective may wait (default 1800).
pub const DINOFLOW_COLLECTIVE_TIMEOUT_SECONDS: &str = "DINOFLOW_COLLECTIVE_TIMEOUT_SECONDS";
/// Peak FLOP/s of one device, for MFU (unset: MFU is not reported).
pub const DINOFLOW_PEAK_FLOPS: &str = "DINOFLOW_PEAK_FLOPS";
/// Intra-op threads of a trainer process (unset: libtorch's default).
pub const DINOFLOW_THREADS: &str = "DINOFLOW_THREADS";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_through_their_names() {
        for kind in [JobKind::Pretrain, JobKind::Distill] {
            assert_eq!(JobKind::from_kind(kind.as_str()), Some(kind));
        }
        assert_eq!(JobKind::from_kind("Job"), None);
        assert_eq!(JobKind::Distill.trainer_subcommand(), "distill");
    }
}
