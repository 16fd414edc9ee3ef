//! Job views that predate this replica's own last status write.
//!
//! A job's status write and its new pods wake the job again, and the pod events often come
//! first: the job cache still holds the version the status was written over. A decision on
//! that view would write the status again with the old resourceVersion and be refused (409),
//! a wasted round trip and a retry. Remembering which version each write replaced lets the
//! reconcile wait for the watch to deliver its own write instead. Versions are compared only
//! for equality, as the API conventions allow.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Forget a write the cache has not caught up with after this long (a job deleted since).
const FORGET_AFTER: Duration = Duration::from_secs(60);

/// The resourceVersion each job's last status write replaced, by job uid.
#[derive(Debug, Default)]
pub struct OwnStatusWrites(Mutex<HashMap<String, (String, Instant)>>);

impl OwnStatusWrites {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, (String, Instant)>> {
        // The map holds no invariant a panicking holder could break; keep using it.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records that the status of job `uid` was written over resourceVersion `rv`.
    pub fn wrote_over(&self, uid: &str, rv: &str, now: Instant) {
        let mut map = self.map();
        map.retain(|_, (_, at)| now.duration_since(*at) < FORGET_AFTER);
        map.insert(uid.to_string(), (rv.to_string(), now));
    }

    /// Whether a view of job `uid` at `rv` predates this replica's last write of its status
    /// (it is the very version that write replaced). A newer view ends the wait.
    pub fn predates_own_write(&self, uid: &str, rv: Option<&str>) -> bool {
        let mut map = self.map();
        match (map.get(uid), rv) {
            (Some((replaced, _)), Some(rv)) if replaced == rv => true,
            (Some(_), _) => {
                map.remove(uid);
                false
            }
            (None, _) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_version_a_write_replaced_is_stale_until_a_newer_one_is_seen() {
        let w = OwnStatusWrites::default();
        let now = Instant::now();
        assert!(!w.predates_own_write("uid", Some("10")));
        w.wrote_over("uid", "10", now);
        assert!(w.predates_own_write("uid", Some("10")));
        assert!(!w.predates_own_write("other", Some("10")));
        assert!(!w.predates_own_write("uid", Some("11")));
        // Once the newer view was seen the write is forgotten.
        assert!(!w.predates_own_write("uid", Some("10")));
    }

    #[test]
    fn writes_of_jobs_never_seen_again_are_forgotten() {
        let w = OwnStatusWrites::default();
        let now = Instant::now();
        w.wrote_over("gone", "1", now);
        w.wrote_over("uid", "2", now + FORGET_AFTER);
        assert_eq!(w.map().len(), 1);
    }
}
