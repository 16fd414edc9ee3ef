//! Exit codes of `dinoflow-trainer`, the contract between the trainer and the operator.
//!
//! | code | meaning | operator reaction |
//! | --- | --- | --- |
//! | 0 | done | job Succeeded |
//! | 78 | permanent failure: bad config, missing or empty dataset, unusable output dir | job Failed at once, no restart |
//! | 79 | loss became NaN/Inf | job Failed at once (a deterministic resume would hit it again) |
//! | 70 | a collective failed (peer lost, ranks out of step) | restart the whole gang (retryable) |
//! | 143 | stopped by SIGTERM/SIGINT after writing a checkpoint | restart when the job still wants to run (retryable) |
//! | 137 | killed by SIGKILL (the end of a grace period, the OOM killer) | restart (retryable); a pod being deleted that exits 137 or 143 was stopped, not failed |
//! | any other | transient failure (crash, OOM, lost peer, signal) | restart the whole gang from the last verified checkpoint |

/// Training finished.
pub const SUCCESS: i32 = 0;
/// Bad config, missing or empty dataset, unusable output directory (sysexits `EX_CONFIG`).
pub const PERMANENT_FAILURE: i32 = 78;
/// The loss became NaN or infinite.
pub const NON_FINITE_LOSS: i32 = 79;

/// A collective failed: a peer is gone or the ranks are out of step (sysexits
/// `EX_SOFTWARE`). Retryable: the gang restarts together.
pub const COLLECTIVE_FAILED: i32 = 70;
/// Stopped by SIGTERM or SIGINT after writing a checkpoint: 128 + 15, as a shell reports it.
/// Retryable, so a stopped gang resumes.
pub const STOPPED_BY_SIGNAL: i32 = 143;
/// Killed by SIGKILL: 128 + 9, what a container still running at the end of its grace
/// period (or killed by the OOM killer) exits with. Not the trainer's own code; retryable.
pub const SIGKILLED: i32 = 137;

/// What the operator does with a trainer's exit code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitKind {
    /// Exit code 0.
    Success,
    /// Exit codes 78 and 79: fail the job, never restart.
    Permanent,
    /// Anything else: restart the gang from the last verified checkpoint.
    Retryable,
}

/// Classifies an exit code.
pub fn classify(code: i32) -> ExitKind {
    match code {
        SUCCESS => ExitKind::Success,
        PERMANENT_FAILURE | NON_FINITE_LOSS => ExitKind::Permanent,
        _ => ExitKind::Retryable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_and_nan_failures_are_permanent_and_the_rest_retryable() {
        assert_eq!(classify(0), ExitKind::Success);
        assert_eq!(classify(78), ExitKind::Permanent);
        assert_eq!(classify(79), ExitKind::Permanent);
        for code in [1, 2, 77, 80, 137, 139, -1] {
            assert_eq!(classify(code), ExitKind::Retryable, "code {code}");
        }
    }
}
