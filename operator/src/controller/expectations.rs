//! Pods this replica created that its pod cache has not shown yet.
//!
//! The pod watch lags the API server, most under load: a job's status write wakes the job
//! again before the watch has delivered the pods just created, and that reconcile would
//! apply the whole gang a second time. Server-side apply makes the repeat harmless but not
//! free (at 200 jobs it was a third of the operator's writes). Like the expectations of
//! Kubernetes' own ReplicaSet controller, a created pod counts as on its way until the cache
//! shows it or a short TTL passes; after the TTL it is created again, so a pod deleted
//! before the cache ever saw it is not lost.

use std::time::{Duration, Instant};

use super::job_records::JobRecords;

/// How long a created pod may stay out of the cache before it is created again.
pub const EXPECTATION_TTL: Duration = Duration::from_secs(15);

/// Created-but-unseen pods by job uid.
#[derive(Debug)]
pub struct Expectations(JobRecords<Expected>);

#[derive(Debug)]
struct Expected {
    attempt: i32,
    ranks: Vec<i32>,
}

impl Default for Expectations {
    fn default() -> Self {
        Self::new(EXPECTATION_TTL)
    }
}

impl Expectations {
    pub fn new(ttl: Duration) -> Self {
        Self(JobRecords::new(ttl))
    }

    /// Records that the pods `ranks` of `attempt` of job `uid` were just created.
    pub fn created(&self, uid: &str, attempt: i32, ranks: &[i32], now: Instant) {
        if ranks.is_empty() {
            self.0.remove(uid);
        } else {
            let ranks = ranks.to_vec();
            self.0.insert(uid, Expected { attempt, ranks }, now);
        }
    }

    /// Of the ranks of `attempt` missing from the cache, those to create now: the rest were
    /// created by this replica less than the TTL ago and are on their way. Ranks the cache
    /// now shows (not in `missing`) are forgotten. Also returns how long until the pods on
    /// their way are given up on (look again then), if any are.
    pub fn to_create(
        &self,
        uid: &str,
        attempt: i32,
        missing: &[i32],
        now: Instant,
    ) -> (Vec<i32>, Option<Duration>) {
        let on_their_way = self.0.fresh(uid, now, |e, left| {
            if e.attempt != attempt {
                return None;
            }
            e.ranks.retain(|r| missing.contains(r));
            let create: Vec<i32> = missing
                .iter()
                .copied()
                .filter(|r| !e.ranks.contains(r))
                .collect();
            (!e.ranks.is_empty()).then_some((create, left))
        });
        match on_their_way.flatten() {
            Some((create, left)) => (create, Some(left)),
            None => {
                // Another attempt's, or nothing left on its way: forget it.
                self.0.remove(uid);
                (missing.to_vec(), None)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(15);

    #[test]
    fn pods_created_but_not_yet_cached_are_not_created_again() {
        let x = Expectations::new(TTL);
        let t0 = Instant::now();
        x.created("uid", 0, &[0, 1, 2, 3], t0);
        let (create, wait) = x.to_create("uid", 0, &[0, 1, 2, 3], t0 + Duration::from_secs(1));
        assert!(create.is_empty());
        assert_eq!(wait, Some(Duration::from_secs(14)));
    }

    #[test]
    fn a_pod_the_cache_showed_and_then_lost_is_created_again() {
        let x = Expectations::new(TTL);
        let t0 = Instant::now();
        x.created("uid", 0, &[0, 1], t0);
        // The cache shows rank 0; rank 1 is still on its way.
        let (create, _) = x.to_create("uid", 0, &[1], t0);
        assert!(create.is_empty());
        // Rank 0 is gone again (deleted): it is missing and no longer expected.
        let (create, wait) = x.to_create("uid", 0, &[0, 1], t0);
        assert_eq!(create, vec![0]);
        assert!(wait.is_some());
    }

    #[test]
    fn expectations_expire_after_the_ttl() {
        let x = Expectations::new(TTL);
        let t0 = Instant::now();
        x.created("uid", 0, &[0, 1], t0);
        let (create, wait) = x.to_create("uid", 0, &[0, 1], t0 + TTL);
        assert_eq!(create, vec![0, 1]);
        assert_eq!(wait, None);
    }

    #[test]
    fn a_new_attempt_or_another_job_ignores_the_expectations() {
        let x = Expectations::new(TTL);
        let t0 = Instant::now();
        x.created("uid", 0, &[0, 1], t0);
        assert_eq!(x.to_create("uid", 1, &[0, 1], t0).0, vec![0, 1]);
        assert_eq!(x.to_create("other", 0, &[0], t0).0, vec![0]);
    }
}
