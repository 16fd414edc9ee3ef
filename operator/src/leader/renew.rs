//! The leader's renew deadline (client-go's `RenewDeadline`): a leader whose Lease has not
//! been renewed for this long stops acting, before another replica may take the Lease over.
//!
//! `kube-lease-manager` retries failed renewals while still reporting leadership, and one
//! stalled API call can block it for the client's read timeout (minutes). So the deadline is
//! checked beside it, from the Lease's `renewTime` as read back: that time is written by this
//! replica's own clock, so comparing it with `now` needs no clock agreement between hosts.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::LeaseSpec;
use k8s_openapi::jiff::{SignedDuration, Timestamp};

/// When this replica, as leader, last renewed its Lease.
#[derive(Clone, Debug)]
pub struct RenewClock {
    identity: String,
    deadline: Duration,
    last: Timestamp,
}

impl RenewClock {
    /// Starts the clock at `acquired`, the moment this replica took the Lease.
    pub fn new(identity: &str, deadline: Duration, acquired: Timestamp) -> Self {
        Self {
            identity: identity.to_string(),
            deadline,
            last: acquired,
        }
    }

    /// Takes a renewal from the Lease as read back; another holder's times never count.
    pub fn observe(&mut self, spec: &LeaseSpec) {
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return;
        }
        if let Some(renewed) = &spec.renew_time
            && renewed.0 > self.last
        {
            self.last = renewed.0;
        }
    }

    /// Whether the last renewal is older than the deadline at `now`.
    pub fn overdue(&self, now: Timestamp) -> bool {
        let deadline = SignedDuration::try_from(self.deadline).unwrap_or(SignedDuration::MAX);
        now.duration_since(self.last) > deadline
    }

    /// The last renewal seen.
    pub fn last_renewed(&self) -> Timestamp {
        self.last
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + s).unwrap()
    }

    fn spec(holder: &str, renewed: i64) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            renew_time: Some(MicroTime(at(renewed))),
            ..Default::default()
        }
    }

    #[test]
    fn overdue_only_past_the_deadline_since_the_last_own_renewal() {
        let mut c = RenewClock::new("a", Duration::from_secs(10), at(0));
        assert!(!c.overdue(at(10)));
        assert!(c.overdue(at(11)));
        c.observe(&spec("a", 8));
        assert_eq!(c.last_renewed(), at(8));
        assert!(!c.overdue(at(18)));
        assert!(c.overdue(at(19)));
    }

    #[test]
    fn another_holder_or_an_older_time_does_not_renew() {
        let mut c = RenewClock::new("a", Duration::from_secs(10), at(5));
        c.observe(&spec("b", 9));
        c.observe(&spec("a", 3));
        c.observe(&LeaseSpec::default());
        assert_eq!(c.last_renewed(), at(5));
        assert!(c.overdue(at(16)));
    }
}
