//! The pod side of the contract between operator and trainer (`DESIGN.md`, "Contracts
//! between operator and trainer"): the job kinds, environment variables and label keys that
//! more than one component names, in one place. Each env constant is named like its variable
//! without the `DINOFLOW_` prefix.

// Environment of a trainer pod, set by the operator and read by the launcher (torchrun names,
// so other tools feel at home).
/// Host of rank 0's pod, the rendezvous point.
pub const MASTER_ADDR: &str = "MASTER_ADDR";
/// Rendezvous port on [`MASTER_ADDR`].
pub const MASTER_PORT: &str = "MASTER_PORT";
/// Number of pods (nodes) in the gang.
pub const NNODES: &str = "NNODES";
/// This pod's rank among the nodes, 0-based.
pub const NODE_RANK: &str = "NODE_RANK";
/// Trainer processes per pod (one per GPU, one on CPU).
pub const NPROC_PER_NODE: &str = "NPROC_PER_NODE";
/// Processes in the whole gang.
pub const WORLD_SIZE: &str = "WORLD_SIZE";
/// Name of the job.
pub const JOB: &str = "DINOFLOW_JOB";
/// Namespace of the job.
pub const NAMESPACE: &str = "DINOFLOW_NAMESPACE";
/// Kind of the job ([`JobKind::as_str`]).
pub const JOB_KIND: &str = "DINOFLOW_JOB_KIND";
/// `true` when `cluster.runPolicy.divergenceRollbackLimit` > 0: a restore skips the data
/// windows that diverged after its checkpoint (set only then).
pub const DIVERGENCE_ROLLBACK: &str = "DINOFLOW_DIVERGENCE_ROLLBACK";
/// Run attempt of the gang (0 first, +1 per gang restart).
pub const RUN_ATTEMPT: &str = "DINOFLOW_RUN_ATTEMPT";
/// The operator's progress endpoint rank 0 streams to.
pub const PROGRESS_ENDPOINT: &str = "DINOFLOW_PROGRESS_ENDPOINT";
/// The job's progress token (from its Secret), bound to the job's uid and run attempt.
pub const PROGRESS_TOKEN: &str = "DINOFLOW_PROGRESS_TOKEN";
/// PEM of the CA the progress endpoint's certificate chains to (from the job's Secret). Set:
/// the endpoint must be `https://` and is verified against this CA only.
pub const PROGRESS_CA: &str = "DINOFLOW_PROGRESS_CA";
/// Path of the trainer config inside the pod.
pub const CONFIG: &str = "DINOFLOW_CONFIG";
/// DistillJob: the teacher checkpoint the operator resolved (also honoured outside a cluster).
pub const TEACHER_CHECKPOINT: &str = "DINOFLOW_TEACHER_CHECKPOINT";

// Label keys on the objects the operator creates.
/// Names the job on every child.
pub const LABEL_JOB: &str = "dinoflow.dev/job";
/// Names the job's kind (a PretrainJob and a DistillJob may share a name).
pub const LABEL_JOB_KIND: &str = "dinoflow.dev/job-kind";
/// Pod label: node rank within the gang.
pub const LABEL_NODE_RANK: &str = "dinoflow.dev/node-rank";
/// Pod label: run attempt the pod belongs to.
pub const LABEL_RUN_ATTEMPT: &str = "dinoflow.dev/run-attempt";

/// The trainer container's command: the trainer binary on the image's PATH (the node agent
/// maps it to a local build).
pub const TRAINER_COMMAND: &str = "dinoflow-trainer";

/// Extended resource of a GPU: what the operator requests per pod and a node offers.
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";

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

/// A worker's global rank (set by the launcher, torchrun's numbering).
pub const RANK: &str = "RANK";
/// A worker's rank on its node (set by the launcher; picks the GPU).
pub const LOCAL_RANK: &str = "LOCAL_RANK";
/// Workers on this node (set by the launcher).
pub const LOCAL_WORLD_SIZE: &str = "LOCAL_WORLD_SIZE";
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
