//! The error of every subcommand and the one mapping from errors and outcomes to the exit
//! codes of the contract (`dinoflow_api::exit_codes`): 0 done, 78 permanent, 79 non-finite
//! loss, 143 stopped by SIGTERM/SIGINT after a checkpoint, 1 for anything a restart may fix.
//! 70 (a collective failed) is the one code not decided here: a failed collective ends the
//! process from inside the step (`dist::abort`), where no error can be returned.
use std::path::PathBuf;

use dinoflow_api::ConfigError;
use dinoflow_api::exit_codes::{NON_FINITE_LOSS, PERMANENT_FAILURE, STOPPED_BY_SIGNAL, SUCCESS};

use crate::checkpoint::CheckpointError;
use crate::data::DataError;
use crate::dist::WorldError;
use crate::distill::DistillError;
use crate::distill::run::BuildError as DistillBuildError;
use crate::eval::EvalError;
use crate::export::ExportError;
use crate::job::JobError;
use crate::launch::LaunchError;
use crate::pretrain::{BuildError, EvalInputsError};
use crate::train_loop::{LoopError, Outcome};

/// Exit code of a failure a restart may fix (I/O hiccup, lost peer, port in use ...): any
/// code the contract does not name is retryable.
pub const RETRYABLE: i32 = 1;

/// Why a subcommand failed; its cause chain is kept for the log.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// `train`.
    #[error(transparent)]
    Pretrain(#[from] JobError<BuildError>),
    /// `distill` (the job; the manifest's own errors are the variants below).
    #[error(transparent)]
    DistillJob(#[from] JobError<DistillBuildError>),
    #[error(transparent)]
    Export(#[from] ExportError),
    #[error(transparent)]
    Launch(#[from] LaunchError),
    /// `validate`: the error names the file.
    #[error("{}: {source}", .config.display())]
    Validate {
        config: PathBuf,
        #[source]
        source: ConfigError,
    },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(
        "{}: kind: expected a DistillJob manifest (apiVersion dinoflow.dev/v1alpha1, kind \
         DistillJob, spec.teacher naming the frozen teacher); run pretraining configs with \
         `dinoflow-trainer train`",
        .config.display()
    )]
    NotADistillJob { config: PathBuf },
    #[error(transparent)]
    Distill(#[from] DistillError),
    #[error(
        "training.evaluation: k-NN and the linear probe are both disabled; set \
         training.evaluation.knn.enabled or linearProbe.enabled to true"
    )]
    EvalDisabled,
    #[error("training.data.valPath: not set; point it at the labelled split to report on")]
    NoValPath,
    #[error("training.data: {0}")]
    Dataset(#[source] DataError),
    #[error(transparent)]
    EvalInputs(#[from] EvalInputsError),
    #[error("evaluation: {0}")]
    Evaluation(#[source] EvalError),
    /// `eval --out`.
    #[error("--out {}: {source}", .path.display())]
    Report {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl CommandError {
    /// The process exit code of this failure.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Pretrain(e) => job_code(e, build_code),
            Self::DistillJob(e) => job_code(e, |e| match e {
                DistillBuildError::Student(e) => build_code(e),
                DistillBuildError::Mapping(_) | DistillBuildError::Distill(_) => PERMANENT_FAILURE,
            }),
            Self::Launch(LaunchError::Env(_)) => PERMANENT_FAILURE,
            Self::Launch(_) => RETRYABLE,
            Self::Dataset(e) => data_code(e),
            Self::Export(_)
            | Self::Validate { .. }
            | Self::Config(_)
            | Self::NotADistillJob { .. }
            | Self::Distill(_)
            | Self::EvalDisabled
            | Self::NoValPath
            | Self::EvalInputs(_)
            | Self::Evaluation(_)
            | Self::Report { .. } => PERMANENT_FAILURE,
        }
    }
}

fn job_code<B: std::error::Error + 'static>(e: &JobError<B>, build: impl Fn(&B) -> i32) -> i32 {
    match e {
        JobError::Config(_)
        | JobError::OutputDir { .. }
        | JobError::CheckpointDir { .. }
        | JobError::PeakFlops { .. }
        | JobError::Env(_)
        | JobError::World(WorldError::Env(_))
        | JobError::Mapping(_)
        | JobError::Init(_) => PERMANENT_FAILURE,
        JobError::World(WorldError::Rendezvous(_))
        | JobError::Signals(_)
        | JobError::Progress(_)
        | JobError::Metrics(_) => RETRYABLE,
        // What a caching filesystem shows for a while: a rank that does not see the newest
        // checkpoint yet. The restart meets caches that caught up; it is charged to
        // backoffLimit, so storage that is not shared at all still ends the job.
        JobError::RanksDisagree { .. } => RETRYABLE,
        JobError::Build(e) => build(e),
        // A listed file that cannot be read now (EIO, a stale handle): not a corrupt one.
        JobError::Resume(e) if e.is_unreadable_for_now() => RETRYABLE,
        // An explicit checkpoint that does not verify, or a refused config change: a restart
        // would meet the same checkpoint.
        JobError::Resume(
            CheckpointError::Incompatible { .. }
            | CheckpointError::NotFound { .. }
            | CheckpointError::Corrupt { .. }
            | CheckpointError::CorruptJson { .. }
            | CheckpointError::Unreadable { .. },
        ) => PERMANENT_FAILURE,
        // Shards that do not belong together, or a state they do not cover: the same on
        // every restart.
        JobError::Resume(e) | JobError::Loop(LoopError::Checkpoint(e)) if e.is_bad_input() => {
            PERMANENT_FAILURE
        }
        JobError::Resume(_) => RETRYABLE,
        JobError::Loop(LoopError::NonFiniteLoss { .. }) => NON_FINITE_LOSS,
        JobError::Loop(LoopError::Restore { .. } | LoopError::Divergence(_)) => PERMANENT_FAILURE,
        JobError::Loop(_) => RETRYABLE,
    }
}

/// Pretraining components: the dataset decides (see [`data_code`]), the rest is config.
fn build_code(e: &BuildError) -> i32 {
    match e {
        BuildError::Data(e) => data_code(e),
        _ => PERMANENT_FAILURE,
    }
}

/// A missing, empty or unreadable dataset is permanent; I/O trouble is not.
fn data_code(e: &DataError) -> i32 {
    if e.is_permanent() {
        PERMANENT_FAILURE
    } else {
        RETRYABLE
    }
}

/// The exit code of a loop that ended without error.
pub fn outcome_code(outcome: &Outcome) -> i32 {
    match outcome {
        Outcome::Finished { .. } => SUCCESS,
        Outcome::Stopped { .. } => STOPPED_BY_SIGNAL,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::CollectiveError;

    #[test]
    fn an_unwritable_output_directory_is_a_permanent_failure() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, b"x").unwrap();
        let err = crate::job::prepare_output_dir::<BuildError>(&file.join("out")).unwrap_err();
        let err = CommandError::from(err);
        assert_eq!(err.exit_code(), PERMANENT_FAILURE);
        assert!(err.to_string().contains("--output-dir"), "{err}");
    }

    #[test]
    fn a_bad_peak_flops_value_is_a_permanent_failure() {
        for bad in ["0", "-1", "fast", "inf"] {
            let err = crate::job::peak_flops::<BuildError>(Some(bad)).unwrap_err();
            let err = CommandError::from(err);
            assert_eq!(err.exit_code(), PERMANENT_FAILURE);
            assert!(err.to_string().contains("DINOFLOW_PEAK_FLOPS"), "{err}");
        }
    }

    #[test]
    fn exit_codes_follow_the_contract() {
        let nan = CommandError::from(JobError::<BuildError>::Loop(LoopError::NonFiniteLoss {
            iteration: 3,
            terms: String::new(),
            last_iteration: 2,
            last_finite: String::new(),
        }));
        assert_eq!(nan.exit_code(), NON_FINITE_LOSS);
        let refused = CommandError::from(JobError::<BuildError>::Resume(
            CheckpointError::Incompatible {
                path: "/c".into(),
                diffs: vec![],
            },
        ));
        assert_eq!(refused.exit_code(), PERMANENT_FAILURE);
        // Shards of another job or iteration: refused, whether found by the scan or the read.
        let mixed = || CheckpointError::ShardsDisagree {
            path: "/c".into(),
            detail: "shard-00001.json was written by job b".into(),
        };
        for e in [
            JobError::<BuildError>::Resume(mixed()),
            JobError::Loop(LoopError::Checkpoint(mixed())),
        ] {
            assert_eq!(CommandError::from(e).exit_code(), PERMANENT_FAILURE);
        }
        let peer_lost = CommandError::from(JobError::<BuildError>::World(WorldError::Rendezvous(
            CollectiveError::Rendezvous("peer lost".into()),
        )));
        assert_eq!(peer_lost.exit_code(), 1);
        assert!(
            peer_lost.to_string().starts_with("distributed setup: "),
            "{peer_lost}"
        );
        assert_eq!(
            outcome_code(&Outcome::Stopped { iteration: 4 }),
            STOPPED_BY_SIGNAL
        );
        assert_eq!(outcome_code(&Outcome::Finished { iteration: 4 }), 0);
    }

    /// What a caching filesystem shows: one rank does not see the newest checkpoint yet and
    /// would start from an older iteration than rank 0. A restart meets caches that have
    /// caught up; it is charged to backoffLimit like any retryable exit, so a volume that is
    /// not shared at all still ends the job, after the restarts.
    #[test]
    fn ranks_that_disagree_on_the_newest_checkpoint_are_retryable() {
        let e = CommandError::from(JobError::<BuildError>::RanksDisagree {
            detail: "rank 1 has start iteration 0 but rank 0 has 3".into(),
        });
        assert_eq!(e.exit_code(), RETRYABLE, "{e}");
        let e = CommandError::from(JobError::<DistillBuildError>::RanksDisagree {
            detail: "rank 1 has start iteration 0 but rank 0 has 3".into(),
        });
        assert_eq!(e.exit_code(), RETRYABLE, "{e}");
    }

    /// A listed file that cannot be read now (EIO, a stale NFS handle, a timeout) is not a
    /// corrupt checkpoint: retryable. One that is missing, unreadable by permission, or
    /// whose bytes do not match the manifest is what it will be on every restart: 78.
    #[test]
    fn a_checkpoint_file_unreadable_for_now_is_retryable_and_a_corrupt_one_permanent() {
        let unreadable = |source: std::io::Error| {
            CommandError::from(JobError::<BuildError>::Resume(
                CheckpointError::Unreadable {
                    path: "/ckpt/ckpt-000000003/shard-00000.bin".into(),
                    source,
                },
            ))
        };
        const EIO: i32 = 5;
        const ETIMEDOUT: i32 = 110;
        const ESTALE: i32 = 116;
        for errno in [EIO, ETIMEDOUT, ESTALE] {
            let e = unreadable(std::io::Error::from_raw_os_error(errno));
            assert_eq!(e.exit_code(), RETRYABLE, "errno {errno}: {e}");
        }
        for kind in [
            std::io::ErrorKind::NotFound,
            std::io::ErrorKind::PermissionDenied,
        ] {
            let e = unreadable(kind.into());
            assert_eq!(e.exit_code(), PERMANENT_FAILURE, "{kind:?}: {e}");
        }
        let corrupt =
            CommandError::from(JobError::<BuildError>::Resume(CheckpointError::Corrupt {
                path: "/ckpt/ckpt-000000003/manifest.json".into(),
                reason: "sha256 does not match the manifest".into(),
            }));
        assert_eq!(corrupt.exit_code(), PERMANENT_FAILURE);
    }

    #[test]
    fn a_dataset_is_permanent_when_missing_and_retryable_on_io_trouble() {
        let missing = DataError::NotFound {
            path: "/nope".into(),
        };
        let job = CommandError::from(JobError::Build(BuildError::Data(missing)));
        let distill = CommandError::from(JobError::Build(DistillBuildError::Student(
            BuildError::Data(DataError::NotFound {
                path: "/nope".into(),
            }),
        )));
        assert_eq!(distill.exit_code(), PERMANENT_FAILURE);
        assert_eq!(job.exit_code(), PERMANENT_FAILURE);
        assert!(job.to_string().starts_with("training.data: "), "{job}");
        let io = DataError::Io {
            path: "/x".into(),
            source: std::io::Error::other("disk on fire"),
        };
        assert_eq!(CommandError::Dataset(io).exit_code(), RETRYABLE);
    }

    #[test]
    fn an_unwritable_export_is_a_permanent_failure_naming_out() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a-file");
        std::fs::write(&file, b"x").unwrap();
        let sd = std::iter::once(("a".to_string(), tch::Tensor::from_slice(&[1.0f32]))).collect();
        let err = crate::export::write_verified(&sd, &file.join("b.safetensors")).unwrap_err();
        let err = CommandError::from(err);
        assert_eq!(err.exit_code(), PERMANENT_FAILURE);
        assert!(err.to_string().contains("--out"), "{err}");
    }
}
