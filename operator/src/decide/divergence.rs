//! Divergence rollback: a non-finite loss (exit 79) restarts the gang from the last verified
//! checkpoint, up to `runPolicy.divergenceRollbackLimit` times; the trainer, told by
//! `DINOFLOW_DIVERGENCE_ROLLBACK`, skips the data it consumed from that checkpoint through the
//! diverged iteration (`trainer/src/train_loop/divergence.rs`). Off by default, as in the
//! reference trainer, which stops on a non-finite loss.

use dinoflow_api::exit_codes::NON_FINITE_LOSS;

use super::{Budget, PodObservation, Step, describe, reason};

impl Step<'_> {
    /// Handles `p`'s exit `code` as a divergence when rollback is on; false leaves it to the
    /// permanent-failure path.
    pub(super) fn roll_back(
        &mut self,
        p: &PodObservation,
        code: i32,
        current: &[&PodObservation],
        all: &[PodObservation],
    ) -> bool {
        let limit = self.facts.cluster.run_policy.divergence_rollback_limit;
        if code != NON_FINITE_LOSS || limit == 0 {
            return false;
        }
        let who = describe(p);
        let Some(at) = self.status.last_checkpoint.as_ref().map(|c| c.iteration) else {
            let note = format!(
                "{who} exited with code {code} (non-finite loss) before any verified checkpoint: nothing to roll back to"
            );
            self.fail(reason::DIVERGENCE_ROLLBACK_LIMIT_EXCEEDED, note, all);
            return true;
        };
        let done = self.status.divergence_rollbacks.unwrap_or(0);
        if done >= limit {
            let note = format!(
                "{who} exited with code {code} (non-finite loss); cluster.runPolicy.divergenceRollbackLimit {limit} reached after {done} rollback(s)"
            );
            self.fail(reason::DIVERGENCE_ROLLBACK_LIMIT_EXCEEDED, note, all);
            return true;
        }
        let note = format!(
            "{who} exited with code {code} (non-finite loss); rolling back to the verified checkpoint of iteration {at}, the trainer skips the data from there through the diverged iteration"
        );
        self.event(true, reason::DIVERGED, note.clone());
        self.restart(Budget::Divergence, reason::DIVERGED, note, current);
        true
    }
}

/// Whether a stale pod's exit `code` is a divergence the rollback already handles (or the
/// next attempt meets again, deterministically, and rolls back then).
pub(super) fn rolled_back(code: i32, limit: i32) -> bool {
    code == NON_FINITE_LOSS && limit > 0
}
