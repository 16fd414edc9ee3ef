//! Job views that predate this replica's own last status write.
//!
//! A job's status write and its new pods wake the job again, and the pod events often come
//! first: the job cache still holds the version the status was written over. A decision on
//! that view would write the status again with the old resourceVersion and be refused (409),
//! a wasted round trip and a retry. Remembering which version each write replaced lets the
//! reconcile wait for the watch to deliver its own write instead. Versions are compared only
//! for equality, as the API conventions allow.

use std::time::{Duration, Instant};

use super::job_records::JobRecords;

/// Forget a write the cache has not caught up with after this long (a job deleted since).
const FORGET_AFTER: Duration = Duration::from_secs(60);

/// The resourceVersion each job's last status write replaced, by job uid.
#[derive(Debug)]
pub struct OwnStatusWrites(JobRecords<String>);

impl Default for OwnStatusWrites {
    fn default() -> Self {
        Self(JobRecords::new(FORGET_AFTER))
    }
}

impl OwnStatusWrites {
    /// Records that the status of job `uid` was written over resourceVersion `rv`.
    pub fn wrote_over(&self, uid: &str, rv: &str, now: Instant) {
        self.0.insert(uid, rv.to_string(), now);
    }

    /// Whether a view of job `uid` at `rv` predates this replica's last write of its status
    /// (it is the very version that write replaced). A newer view ends the wait.
    pub fn predates_own_write(&self, uid: &str, rv: Option<&str>, now: Instant) -> bool {
        let stale = self
            .0
            .fresh(uid, now, |replaced, _| rv == Some(replaced.as_str()));
        if stale == Some(false) {
            self.0.remove(uid);
        }
        stale == Some(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_version_a_write_replaced_is_stale_until_a_newer_one_is_seen() {
        let w = OwnStatusWrites::default();
        let now = Instant::now();
        assert!(!w.predates_own_write("uid", Some("10"), now));
        w.wrote_over("uid", "10", now);
        assert!(w.predates_own_write("uid", Some("10"), now));
        assert!(!w.predates_own_write("other", Some("10"), now));
        assert!(!w.predates_own_write("uid", Some("11"), now));
        // Once the newer view was seen the write is forgotten.
        assert!(!w.predates_own_write("uid", Some("10"), now));
    }

    #[test]
    fn a_write_the_cache_never_caught_up_with_is_forgotten() {
        let w = OwnStatusWrites::default();
        let now = Instant::now();
        w.wrote_over("uid", "10", now);
        assert!(!w.predates_own_write("uid", Some("10"), now + FORGET_AFTER));
    }
}
