//! Leader election over a `coordination.k8s.io` Lease, with a write fence.
//!
//! Acquiring and renewing the Lease is delegated to `kube-lease-manager` (maintained, built
//! for kube 5, server-side-apply based so two candidates cannot both lock it). On top of it:
//! - the controllers start only once this replica holds the Lease;
//! - every write goes through [`Leadership::ensure`], so a replica that has noticed the loss
//!   of the Lease stops writing at once (the fence), and
//! - losing the Lease ends the process (as controller-runtime does), so a deposed leader never
//!   keeps reconciling from a stale view.

use std::time::Duration;

use kube::Client;
use kube_lease_manager::LeaseManagerBuilder;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::{Error, Result};

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
    /// How long before expiry the holder renews.
    pub grace: Duration,
}

impl Default for LeaseTiming {
    fn default() -> Self {
        Self {
            duration: Duration::from_secs(15),
            grace: Duration::from_secs(5),
        }
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
/// depend on the lifetimes of all `Leadership` clones.
pub async fn elect(
    client: Client,
    namespace: &str,
    name: &str,
    identity: &str,
    timing: LeaseTiming,
) -> Result<(Leadership, Election)> {
    let manager = LeaseManagerBuilder::new(client, name)
        .with_namespace(namespace)
        .with_identity(identity)
        .with_duration(timing.duration.as_secs())
        .with_grace(timing.grace.as_secs())
        .with_field_manager("dinoflow-operator-leader")
        .build()
        .await
        .map_err(|e| Error::Lease(e.to_string()))?;
    let (tx, rx) = watch::channel(false);
    let stop = CancellationToken::new();
    let cancelled = stop.clone();
    let identity = identity.to_string();
    let task = tokio::spawn(async move {
        let mut backoff = RETRY_MIN;
        loop {
            tokio::select! {
                biased;
                _ = cancelled.cancelled() => break,
                changed = manager.changed() => match changed {
                    Ok(leading) => {
                        backoff = RETRY_MIN;
                        tracing::info!(%identity, leading, "leader lease changed hands");
                        tx.send_replace(leading);
                    }
                    // Like the crate's own watcher: keep the last known state and retry. The
                    // API server being unreachable also stops every other replica's writes.
                    Err(e) => {
                        tracing::warn!(%identity, error = %e, retry_in = ?backoff, "leader election error");
                        tokio::select! {
                            _ = cancelled.cancelled() => break,
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(RETRY_MAX);
                    }
                },
            }
        }
        // Fence first, then give the Lease up.
        tx.send_replace(false);
        match manager.release().await {
            Ok(()) => tracing::info!(%identity, "released the leader lease"),
            Err(e) => {
                tracing::warn!(%identity, error = %e, "could not release the leader lease; it expires by itself")
            }
        }
    });
    Ok((Leadership { rx, _tx: None }, Election { stop, task }))
}

const RETRY_MIN: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(8);

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
}
