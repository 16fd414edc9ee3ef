//! Children a reconcile has just verified for the next gang, so the pods can go out in the
//! next reconcile without asking the API server about them again.
//!
//! A gang's pods refer to its Secret, ConfigMap and Service (and a gang scheduler wants its
//! PodGroup first), and one of those names taken by an object the job does not own must stop
//! the gang before any pod would use it: the children are written and their owner checked a
//! full round trip before the pods. Doing both in one reconcile held a worker for two
//! sequential round trips (its p99 under load was two API latencies); instead one reconcile
//! writes and checks the children, records them here, and asks to run again at once; the next
//! one, seeing the same desired children recorded, creates the pods. Each reconcile then waits
//! for one round trip. The record is in memory only: a new leader, or a record older than
//! [`PREPARED_TTL`], writes and checks the children again (what every gang did before), and a
//! record is used once, so pods created later (a vanished pod's replacement, the next attempt)
//! check them again too.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::job_records::JobRecords;

/// How long verified children are trusted for the pods of the next reconcile. Long enough
/// for that reconcile to come round behind a burst of other jobs (200 jobs on a loaded API
/// server queue it for tens of seconds: were the record to lapse first, every job would
/// verify its children again and again); short enough that children deleted and replaced by
/// someone in between are checked again before a later gang.
pub const PREPARED_TTL: Duration = Duration::from_secs(120);

/// Verified children by job uid: the attempt and the digest of the children checked.
#[derive(Debug)]
pub struct Prepared(JobRecords<(i32, u64)>);

impl Default for Prepared {
    fn default() -> Self {
        Self::new(PREPARED_TTL)
    }
}

/// Digest of the desired children: a record is good only for the very objects it checked (a
/// spec or teacher change in between makes the next reconcile write them again).
pub fn digest<T: Serialize>(children: &T) -> u64 {
    let mut h = DefaultHasher::new();
    // Serialising owned, already-built objects cannot fail; were it to, an empty digest
    // simply never matches a real one.
    serde_json::to_vec(children)
        .unwrap_or_default()
        .hash(&mut h);
    h.finish()
}

impl Prepared {
    pub fn new(ttl: Duration) -> Self {
        Self(JobRecords::new(ttl))
    }

    /// Records that the children with `digest` of job `uid`'s `attempt` were just written and
    /// found to be the job's own.
    pub fn record(&self, uid: &str, attempt: i32, digest: u64, now: Instant) {
        self.0.insert(uid, (attempt, digest), now);
    }

    /// Whether these very children were verified for this attempt less than the TTL ago.
    pub fn is_ready(&self, uid: &str, attempt: i32, digest: u64, now: Instant) -> bool {
        self.0
            .fresh(uid, now, |checked, _| *checked == (attempt, digest))
            == Some(true)
    }

    /// The pods were created: the record is used up.
    pub fn used(&self, uid: &str) {
        self.0.remove(uid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_holds_for_the_same_children_and_attempt_within_the_ttl_once() {
        let p = Prepared::new(Duration::from_secs(10));
        let t0 = Instant::now();
        let d = digest(&("secret", "config", "service"));
        assert!(!p.is_ready("u", 0, d, t0), "nothing verified yet");
        p.record("u", 0, d, t0);
        assert!(p.is_ready("u", 0, d, t0 + Duration::from_secs(9)));
        // Other children (a spec change), another attempt or another job: write them again.
        assert!(!p.is_ready("u", 0, digest(&("secret", "config2", "service")), t0));
        assert!(!p.is_ready("u", 1, d, t0));
        assert!(!p.is_ready("v", 0, d, t0));
        // Too old: someone may have replaced them since.
        assert!(!p.is_ready("u", 0, d, t0 + Duration::from_secs(10)));
        // Used by the pods: the next gang checks them again.
        p.used("u");
        assert!(!p.is_ready("u", 0, d, t0));
    }

    #[test]
    fn the_digest_is_stable_and_tells_contents_apart() {
        assert_eq!(digest(&("a", 1)), digest(&("a", 1)));
        assert_ne!(digest(&("a", 1)), digest(&("a", 2)));
    }
}
