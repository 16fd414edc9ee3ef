//! Per-job exponential backoff with jitter for failed reconciles.
//!
//! A job whose reconcile keeps failing (API server down, a child refused) is retried ever
//! more slowly, up to [`MAX_DELAY`], instead of at a fixed pace; jitter spreads the retries of
//! many jobs failing together (an API server outage) so they do not return as one burst. A
//! success forgets the job's failures. Conflicts (409: the view was stale) start from a much
//! shorter delay: a fresh view is usually there already.

use std::time::{Duration, Instant};

use super::job_records::JobRecords;

/// First retry after an error (before jitter).
pub const BASE_DELAY: Duration = Duration::from_secs(1);
/// First retry after a conflict (before jitter).
pub const CONFLICT_BASE_DELAY: Duration = Duration::from_millis(200);
/// Longest wait between retries (the controller's resync period).
pub const MAX_DELAY: Duration = Duration::from_secs(300);
/// A job not failing again for this long starts over (its entry is dropped; deleted jobs too).
const FORGET_AFTER: Duration = Duration::from_secs(3600);

/// Consecutive failures by job.
#[derive(Debug)]
pub struct Backoff(JobRecords<u32>);

impl Default for Backoff {
    fn default() -> Self {
        Self(JobRecords::new(FORGET_AFTER))
    }
}

impl Backoff {
    /// Records a failed reconcile of `job`; returns how long to wait before the next one.
    pub fn failed(&self, job: &str, conflict: bool, now: Instant) -> Duration {
        let failures = self.failures(job, now).saturating_add(1);
        self.0.insert(job, failures, now);
        let base = if conflict {
            CONFLICT_BASE_DELAY
        } else {
            BASE_DELAY
        };
        delay(failures, base, rand::random::<f64>())
    }

    /// Records a successful reconcile of `job`: its next failure starts from the base delay.
    pub fn succeeded(&self, job: &str) {
        self.0.remove(job);
    }

    /// Consecutive failures recorded for `job` (none once forgotten).
    pub fn failures(&self, job: &str, now: Instant) -> u32 {
        self.0.fresh(job, now, |n, _| *n).unwrap_or(0)
    }
}

/// The wait after the `failures`-th consecutive failure: `base · 2^(failures-1)`, capped at
/// [`MAX_DELAY`], of which the upper half is scaled by `jitter` in [0, 1) ("equal jitter": never
/// less than half the exponential delay, so backing off stays backing off).
pub fn delay(failures: u32, base: Duration, jitter: f64) -> Duration {
    let doublings = failures.saturating_sub(1).min(20);
    let exponential = base.saturating_mul(1 << doublings).min(MAX_DELAY);
    let half = exponential / 2;
    half + half.mul_f64(jitter.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_per_failure_up_to_the_cap() {
        let d = |n| delay(n, BASE_DELAY, 1.0);
        assert_eq!(d(1), Duration::from_secs(1));
        assert_eq!(d(2), Duration::from_secs(2));
        assert_eq!(d(3), Duration::from_secs(4));
        assert_eq!(d(9), Duration::from_secs(256));
        assert_eq!(d(10), MAX_DELAY);
        assert_eq!(d(u32::MAX), MAX_DELAY);
    }

    #[test]
    fn jitter_keeps_at_least_half_the_delay() {
        assert_eq!(delay(3, BASE_DELAY, 0.0), Duration::from_secs(2));
        assert_eq!(delay(3, BASE_DELAY, 0.5), Duration::from_secs(3));
        let b = Backoff::default();
        let now = Instant::now();
        for n in 1..=12 {
            let got = b.failed("job", false, now);
            let full = delay(n, BASE_DELAY, 1.0);
            assert!(got >= full / 2 && got <= full, "failure {n}: {got:?}");
        }
    }

    #[test]
    fn success_resets_the_job_and_jobs_back_off_separately() {
        let b = Backoff::default();
        let now = Instant::now();
        for _ in 0..5 {
            b.failed("a", false, now);
        }
        b.failed("b", false, now);
        assert_eq!((b.failures("a", now), b.failures("b", now)), (5, 1));
        b.succeeded("a");
        assert_eq!(b.failures("a", now), 0);
        assert!(b.failed("a", false, now) <= BASE_DELAY);
    }

    #[test]
    fn conflicts_retry_sooner_than_errors() {
        let b = Backoff::default();
        let now = Instant::now();
        assert!(b.failed("c", true, now) <= CONFLICT_BASE_DELAY);
    }

    #[test]
    fn jobs_that_stopped_failing_long_ago_are_forgotten() {
        let b = Backoff::default();
        let now = Instant::now();
        b.failed("gone", false, now);
        assert_eq!(b.failures("gone", now + FORGET_AFTER), 0);
    }
}
