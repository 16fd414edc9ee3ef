//! What one replica remembers about a job between its reconciles, forgotten after a TTL.
//!
//! Pods on their way, verified children, the version a status write replaced and failure
//! counts are all facts of this kind: in memory only (a new leader starts without them and
//! is merely slower), keyed by job, trusted only while younger than their TTL, and dropped on
//! the next insert once older, so jobs deleted or never reconciled again do not stay forever.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// A value per job, with the time it was recorded.
#[derive(Debug)]
pub struct JobRecords<V> {
    ttl: Duration,
    jobs: Mutex<HashMap<String, (V, Instant)>>,
}

impl<V> JobRecords<V> {
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            jobs: Mutex::new(HashMap::new()),
        }
    }

    fn jobs(&self) -> MutexGuard<'_, HashMap<String, (V, Instant)>> {
        // The map holds no invariant a panicking holder could break; keep using it.
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records `value` for `job` at `now`, replacing what was there.
    pub fn insert(&self, job: &str, value: V, now: Instant) {
        let mut jobs = self.jobs();
        jobs.retain(|_, (_, at)| now.saturating_duration_since(*at) < self.ttl);
        jobs.insert(job.to_string(), (value, now));
    }

    /// Forgets `job`.
    pub fn remove(&self, job: &str) {
        self.jobs().remove(job);
    }

    /// `f` of `job`'s record and the time it has left, if it is younger than the TTL (an
    /// older one is forgotten); `None` otherwise.
    pub fn fresh<R>(
        &self,
        job: &str,
        now: Instant,
        f: impl FnOnce(&mut V, Duration) -> R,
    ) -> Option<R> {
        let mut jobs = self.jobs();
        let (value, at) = jobs.get_mut(job)?;
        let age = now.saturating_duration_since(*at);
        if age >= self.ttl {
            jobs.remove(job);
            return None;
        }
        Some(f(value, self.ttl - age))
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.jobs().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(10);

    #[test]
    fn a_record_is_fresh_until_its_ttl_and_then_forgotten() {
        let r = JobRecords::new(TTL);
        let t0 = Instant::now();
        assert_eq!(r.fresh("j", t0, |v: &mut i32, _| *v), None);
        r.insert("j", 7, t0);
        let nine = t0 + Duration::from_secs(9);
        assert_eq!(
            r.fresh("j", nine, |v, left| (*v, left)),
            Some((7, Duration::from_secs(1)))
        );
        assert_eq!(r.fresh("other", nine, |v, _| *v), None);
        assert_eq!(r.fresh("j", t0 + TTL, |v, _| *v), None);
        assert_eq!(r.len(), 0, "an expired record is dropped when looked up");
    }

    #[test]
    fn records_of_jobs_never_seen_again_are_dropped_on_insert() {
        let r = JobRecords::new(TTL);
        let t0 = Instant::now();
        r.insert("gone", (), t0);
        r.insert("live", (), t0 + Duration::from_secs(5));
        r.insert("new", (), t0 + TTL);
        assert_eq!(r.len(), 2);
        r.remove("live");
        assert_eq!(r.len(), 1);
    }
}
