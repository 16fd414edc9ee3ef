//! Leader election over a `coordination.k8s.io` Lease, with a write fence.
//!
//! Acquiring and renewing the Lease is delegated to `kube-lease-manager` (maintained, built
//! for kube 5, server-side-apply based so two candidates cannot both lock it). On top of it:
//! - the controllers start only once this replica holds the Lease;
//! - every write goes through [`Leadership::ensure`], so a replica that has noticed the loss
//!   of the Lease stops writing at once (the fence), and
//! - losing the Lease ends the process (as controller-runtime does), so a deposed leader never
//!   keeps reconciling from a stale view;
//! - a leader that cannot renew within the renew deadline steps down ([`RenewClock`]).

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;
use kube::{Api, Client};
use kube_lease_manager::{LeaseManager, LeaseManagerBuilder};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::{Error, Result};

mod renew;
pub use renew::RenewClock;

/// This replica's view of who leads.
#[derive(Clone, Debug)]
pub struct Leadership {
    rx: watch::Receiver<bool>,
    // Keeps the channel open when leader election is disabled.
    _tx: Option<std::sync::Arc<watch::Sender<bool>>>,
}

impl Leadership {
    /// Leader election disabled: this replica always leads (single replica, tests).
    pub fn always() -> Self {
        let (tx, rx) = watch::channel(true);
        Self {
            rx,
            _tx: Some(std::sync::Arc::new(tx)),
        }
    }

    /// A view driven by `rx` (tests of what follows leadership).
    pub fn from_receiver(rx: watch::Receiver<bool>) -> Self {
        Self { rx, _tx: None }
    }

    /// Whether this replica holds the Lease right now.
    pub fn is_leader(&self) -> bool {
        *self.rx.borrow()
    }

    /// The write fence: Ok only while this replica holds the Lease.
    pub fn ensure(&self) -> Result<()> {
        if self.is_leader() {
            Ok(())
        } else {
            Err(Error::NotLeader)
        }
    }

    /// Resolves once this replica holds the Lease.
    pub async fn acquired(&mut self) {
        let _ = self.rx.wait_for(|leader| *leader).await;
    }

    /// Resolves once this replica no longer holds the Lease (or election stopped).
    pub async fn lost(&mut self) {
        let _ = self.rx.wait_for(|leader| !*leader).await;
    }
}

/// Lease timing.
#[derive(Clone, Copy, Debug)]
pub struct LeaseTiming {
    /// How long a lock stays valid without renewal.
    pub duration: Duration,
    /// How long before expiry the holder renews: it renews every `duration - grace`.
    pub grace: Duration,
    /// How long the leader keeps acting without a renewal (client-go's `RenewDeadline`):
    /// longer than the renew interval, shorter than `duration`, so a deposed leader has
    /// stopped before another replica can take the expired Lease.
    pub renew_deadline: Duration,
}

impl LeaseTiming {
    /// client-go's proportions (15 s lease, 10 s renew deadline, 2 s retry period): renew
    /// every 2/15 of the lease (at least 1 s), give up after two thirds of it. Renewing only
    /// every third (5 s) made one API request stalled for 5 s cost the leadership: the next
    /// renewal came after the deadline (the chaos e2e's stall). Whole seconds, as the Lease
    /// counts them.
    pub fn for_duration(duration: Duration) -> Self {
        let secs = duration.as_secs();
        let deadline = secs - (secs / 3).max(1).min(secs);
        let interval = (secs * 2 / 15).max(1).min(secs);
        Self {
            duration: Duration::from_secs(secs),
            grace: Duration::from_secs(secs - interval),
            renew_deadline: Duration::from_secs(deadline),
        }
    }

    fn check(&self) -> Result<()> {
        let interval = self.duration.saturating_sub(self.grace);
        if interval.is_zero()
            || self.renew_deadline <= interval
            || self.renew_deadline >= self.duration
        {
            return Err(Error::Lease(format!(
                "lease timing {self:?}: the renew deadline must lie between the renew interval \
                 (duration - grace) and the lease duration"
            )));
        }
        Ok(())
    }
}

impl Default for LeaseTiming {
    fn default() -> Self {
        Self::for_duration(Duration::from_secs(15))
    }
}

/// This replica's candidacy: stop it with [`Election::release`].
pub struct Election {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Election {
    /// Stops competing and gives the Lease up if this replica holds it, so another replica
    /// takes over at once instead of after the lease duration (controller-runtime's
    /// `LeaderElectionReleaseOnCancel`). Dropping clones of [`Leadership`] is not enough to
    /// release: a clone kept alive anywhere would keep renewing the Lease.
    pub async fn release(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// Starts competing for the Lease `namespace/name` as `identity`.
///
/// The loop around `LeaseManager::changed` is ours rather than the crate's `watch()`, because
/// `watch()` only releases once every receiver is dropped, which makes a clean hand-over
/// depend on the lifetimes of all `Leadership` clones. While leading, the loop also enforces
/// the renew deadline ([`RenewClock`]); past it the replica fences itself and stops competing.
pub async fn elect(
    client: Client,
    namespace: &str,
    name: &str,
    identity: &str,
    timing: LeaseTiming,
) -> Result<(Leadership, Election)> {
    timing.check()?;
    let manager = LeaseManagerBuilder::new(client.clone(), name)
        .with_namespace(namespace)
        .with_identity(identity)
        .with_duration(timing.duration.as_secs())
        .with_grace(timing.grace.as_secs())
        .with_field_manager("dinoflow-operator-leader")
        .build()
        .await
        .map_err(|e| Error::Lease(e.to_string()))?;
    let leases: Api<Lease> = Api::namespaced(client, namespace);
    let (tx, rx) = watch::channel(false);
    let stop = CancellationToken::new();
    let cancelled = stop.clone();
    let identity = identity.to_string();
    let name = name.to_string();
    let task = tokio::spawn(async move {
        let mut backoff = RETRY_MIN;
        let mut clock: Option<RenewClock> = None;
        let mut ticker = tokio::time::interval(RETRY_PERIOD);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        'run: loop {
            // Pinned across deadline checks, so a check never cancels a renewal in flight.
            let step = next_change(&manager, &identity, backoff);
            tokio::pin!(step);
            let outcome = loop {
                tokio::select! {
                    biased;
                    _ = cancelled.cancelled() => break 'run,
                    outcome = &mut step => break outcome,
                    _ = ticker.tick(), if clock.is_some() => {
                        let Some(c) = clock.as_mut() else { continue };
                        read_back(&leases, &name, c).await;
                        if c.overdue(Timestamp::now()) {
                            tracing::error!(%identity, last_renewed = %c.last_renewed(), deadline = ?timing.renew_deadline,
                                "could not renew the leader lease within the renew deadline; stepping down");
                            break 'run;
                        }
                    }
                }
            };
            match outcome {
                Some(leading) => {
                    backoff = RETRY_MIN;
                    tracing::info!(%identity, leading, "leader lease changed hands");
                    clock = leading.then(|| {
                        RenewClock::new(&identity, timing.renew_deadline, Timestamp::now())
                    });
                    tx.send_replace(leading);
                }
                None => backoff = (backoff * 2).min(RETRY_MAX),
            }
        }
        // Fence first, then give the Lease up (bounded: the API server may be the fault).
        tx.send_replace(false);
        match tokio::time::timeout(RELEASE_TIMEOUT, manager.release()).await {
            Ok(Ok(())) => tracing::info!(%identity, "released the leader lease"),
            Ok(Err(e)) => {
                tracing::warn!(%identity, error = %e, "could not release the leader lease; it expires by itself")
            }
            Err(_) => {
                tracing::warn!(%identity, "releasing the leader lease timed out; it expires by itself")
            }
        }
    });
    Ok((Leadership { rx, _tx: None }, Election { stop, task }))
}

/// The next leadership change, or `None` after an error and a backoff sleep. Like the crate's
/// own watcher it keeps the last known state through errors; the renew deadline bounds that.
async fn next_change(manager: &LeaseManager, identity: &str, backoff: Duration) -> Option<bool> {
    match manager.changed().await {
        Ok(leading) => Some(leading),
        Err(e) => {
            tracing::warn!(%identity, error = %e, retry_in = ?backoff, "leader election error");
            tokio::time::sleep(backoff).await;
            None
        }
    }
}

/// Reads the Lease back into the renew clock; a failed or stalled read renews nothing.
async fn read_back(leases: &Api<Lease>, name: &str, clock: &mut RenewClock) {
    match tokio::time::timeout(RETRY_PERIOD, leases.get(name)).await {
        Ok(Ok(lease)) => {
            if let Some(spec) = &lease.spec {
                clock.observe(spec);
            }
        }
        Ok(Err(e)) => tracing::debug!(error = %e, "reading the leader lease back"),
        Err(_) => tracing::debug!("reading the leader lease back timed out"),
    }
}

const RETRY_MIN: Duration = Duration::from_millis(500);
/// client-go's `RetryPeriod`: the longest wait between tries, and the deadline check's period.
const RETRY_PERIOD: Duration = Duration::from_secs(2);
const RETRY_MAX: Duration = RETRY_PERIOD;
const RELEASE_TIMEOUT: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fence_follows_the_lease_state() {
        let (tx, rx) = watch::channel(false);
        let mut l = Leadership { rx, _tx: None };
        assert!(matches!(l.ensure(), Err(Error::NotLeader)));
        tx.send(true).unwrap();
        l.acquired().await;
        assert!(l.ensure().is_ok());
        tx.send(false).unwrap();
        l.lost().await;
        assert!(!l.is_leader());
        assert!(Leadership::always().ensure().is_ok());
    }

    #[test]
    fn timing_needs_a_deadline_between_the_renew_interval_and_the_duration() {
        let t = LeaseTiming::default();
        assert_eq!((t.grace.as_secs(), t.renew_deadline.as_secs()), (13, 10));
        assert!(t.check().is_ok());
        for secs in [3, 4, 6, 60] {
            let t = LeaseTiming::for_duration(Duration::from_secs(secs));
            assert!(t.check().is_ok(), "{t:?}");
        }
        assert!(
            LeaseTiming::for_duration(Duration::from_secs(1))
                .check()
                .is_err()
        );
        let late = LeaseTiming {
            renew_deadline: Duration::from_secs(15),
            ..t
        };
        // Not after the first renewal (every 2 s of 15).
        let early = LeaseTiming {
            renew_deadline: Duration::from_secs(2),
            ..t
        };
        let never = LeaseTiming {
            grace: Duration::from_secs(15),
            ..t
        };
        for bad in [late, early, never] {
            let e = bad.check().unwrap_err().to_string();
            assert!(e.contains("renew deadline"), "{e}");
        }
    }
}
