//! Pods this replica created that its pod cache has not shown yet.
//!
//! The pod watch lags the API server, most under load: a job's status write wakes the job
//! again before the watch has delivered the pods just created, and that reconcile would
//! apply the whole gang a second time. Server-side apply makes the repeat harmless but not
//! free (at 200 jobs it was a third of the operator's writes). Like the expectations of
//! Kubernetes' own ReplicaSet controller, a created pod counts as on its way until the cache
//! shows it or a short TTL passes; after the TTL it is created again, so a pod deleted
//! before the cache ever saw it is not lost.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a created pod may stay out of the cache before it is created again.
pub const EXPECTATION_TTL: Duration = Duration::from_secs(15);

/// Created-but-unseen pods by job uid.
#[derive(Debug)]
pub struct Expectations {
    ttl: Duration,
    jobs: Mutex<HashMap<String, Expected>>,
}

#[derive(Debug)]
struct Expected {
    attempt: i32,
    ranks: Vec<i32>,
    since: Instant,
}

impl Default for Expectations {
    fn default() -> Self {
        Self::new(EXPECTATION_TTL)
    }
}

impl Expectations {
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            jobs: Mutex::new(HashMap::new()),
        }
    }

    fn jobs(&self) -> std::sync::MutexGuard<'_, HashMap<String, Expected>> {
        // The map holds no invariant a panicking holder could break; keep using it.
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records that the pods `ranks` of `attempt` of job `uid` were just created.
    pub fn created(&self, uid: &str, attempt: i32, ranks: &[i32], now: Instant) {
        let mut jobs = self.jobs();
        // Entries of jobs never reconciled again (deleted) would otherwise stay forever.
        jobs.retain(|_, e| now.duration_since(e.since) < self.ttl);
        if ranks.is_empty() {
            jobs.remove(uid);
            return;
        }
        jobs.insert(
            uid.to_string(),
            Expected {
                attempt,
                ranks: ranks.to_vec(),
                since: now,
            },
        );
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
        let mut jobs = self.jobs();
        let Some(e) = jobs.get_mut(uid) else {
            return (missing.to_vec(), None);
        };
        let age = now.duration_since(e.since);
        if e.attempt != attempt || age >= self.ttl {
            jobs.remove(uid);
            return (missing.to_vec(), None);
        }
        e.ranks.retain(|r| missing.contains(r));
        if e.ranks.is_empty() {
            jobs.remove(uid);
            return (missing.to_vec(), None);
        }
        let on_the_way = &e.ranks;
        let create = missing
            .iter()
            .copied()
            .filter(|r| !on_the_way.contains(r))
            .collect();
        (create, Some(self.ttl - age))
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

    #[test]
    fn expired_entries_of_other_jobs_are_pruned() {
        let x = Expectations::new(TTL);
        let t0 = Instant::now();
        x.created("gone", 0, &[0], t0);
        x.created("uid", 0, &[0], t0 + TTL);
        assert_eq!(x.jobs().len(), 1);
    }
}
