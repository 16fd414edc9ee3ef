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
