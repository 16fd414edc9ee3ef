//! The one Pod watch, shared by both controllers: a reflector keeps the pod cache, and every
//! pod event is handed to each controller's trigger stream as the object itself.
//!
//! Written by hand instead of kube-runtime's `store_shared` + `Writer::subscribe` because its
//! `ReflectHandle` (kube-runtime 5.0, `unstable-runtime-subscribe`) passes object *references*
//! and looks each one up in the store when polled: a pod that is gone by then (deleted between
//! the event and the lookup) makes it return `Pending` without registering a waker, and the
//! controller never sees another pod event (observed: a job stayed Running for minutes after
//! its pod Succeeded, until the periodic resync). It also never forwards deletions. Here the
//! trigger carries the pod, so nothing is looked up, and deletions wake the owner too.

use std::sync::Arc;

use futures::channel::mpsc;
use futures::{SinkExt, Stream, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher;

/// Forwards every pod of `events` (applied, deleted, or listed again after a desync) to each
/// of `subscribers`, in order; a full subscriber holds the watch back (backpressure, as
/// kube's shared streams do) and a dropped one is skipped. Watch errors are left to the
/// watcher's backoff. Ends when `events` ends.
pub async fn fan_out<E: std::fmt::Display>(
    events: impl Stream<Item = Result<watcher::Event<Pod>, E>>,
    mut subscribers: Vec<PodSender>,
) {
    let mut events = std::pin::pin!(events);
    while let Some(event) = events.next().await {
        let pod = match event {
            Ok(
                watcher::Event::Apply(p) | watcher::Event::Delete(p) | watcher::Event::InitApply(p),
            ) => Arc::new(p),
            Ok(watcher::Event::Init | watcher::Event::InitDone) => continue,
            Err(e) => {
                tracing::debug!(error = %e, "pod watch");
                continue;
            }
        };
        for tx in &mut subscribers {
            // An error means that controller has stopped; the others still want events.
            let _ = tx.send(Arc::clone(&pod)).await;
        }
    }
}

/// What [`fan_out`] feeds.
pub type PodSender = mpsc::Sender<Arc<Pod>>;
/// A controller's trigger stream.
pub type PodTrigger = mpsc::Receiver<Arc<Pod>>;

/// One trigger stream per controller, fed by [`fan_out`].
pub fn subscribers(n: usize, buffer: usize) -> (Vec<PodSender>, Vec<PodTrigger>) {
    (0..n).map(|_| mpsc::channel(buffer)).unzip()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::api::ObjectMeta;

    fn pod(name: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                ..ObjectMeta::default()
            },
            ..Pod::default()
        }
    }

    fn names(pods: Vec<Arc<Pod>>) -> Vec<String> {
        pods.iter()
            .map(|p| p.metadata.name.clone().unwrap())
            .collect()
    }

    #[tokio::test]
    async fn every_subscriber_sees_every_pod_event_even_for_pods_already_gone() {
        // The sequence that stalled kube's ReflectHandle: an event for a pod deleted before the
        // subscriber looked at it, followed by events that must still arrive.
        let events = futures::stream::iter([
            Ok::<_, String>(watcher::Event::Init),
            Ok(watcher::Event::InitApply(pod("old"))),
            Ok(watcher::Event::InitDone),
            Ok(watcher::Event::Apply(pod("a"))),
            Ok(watcher::Event::Delete(pod("a"))),
            Err("watch hiccup".into()),
            Ok(watcher::Event::Apply(pod("b"))),
        ]);
        let (tx, rx) = subscribers(2, 1);
        let collect = rx
            .into_iter()
            .map(|r| tokio::spawn(r.collect::<Vec<_>>()))
            .collect::<Vec<_>>();
        fan_out(events, tx).await; // drops the senders: the receivers end
        for handle in collect {
            assert_eq!(names(handle.await.unwrap()), ["old", "a", "a", "b"]);
        }
    }

    #[tokio::test]
    async fn a_stopped_subscriber_does_not_stop_the_others() {
        let (tx, mut rx) = subscribers(2, 4);
        drop(rx.remove(0));
        let events = futures::stream::iter([
            Ok::<_, String>(watcher::Event::Apply(pod("a"))),
            Ok(watcher::Event::Apply(pod("b"))),
        ]);
        fan_out(events, tx).await;
        assert_eq!(names(rx.remove(0).collect().await), ["a", "b"]);
    }
}
