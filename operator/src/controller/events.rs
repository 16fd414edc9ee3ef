//! Kubernetes events (events.k8s.io/v1) as kube's `Recorder` records them — a repeat of the
//! same event within 6 minutes counted in the first one's `series`, not a new object — except
//! that the note is part of what makes two events the same. kube 5's key leaves the note out
//! (so does client-go's), which folded every `RestartingGang` of a job into the first one's
//! series: the note of the second restart ("as attempt 2 (disruption 2/20): pod ... evicted")
//! was never stored, and `kubectl describe` told only of attempt 1. Our notes say which
//! attempt, budget and pod; each different one is its own event.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event as K8sEvent, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType, Reporter};

/// How long an event is remembered for its series (kube's and client-go's 6 minutes).
const SERIES_WINDOW: Duration = Duration::from_secs(6 * 60);

/// What makes two events the same: kube's key (type, reason, action, the object) and the note.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    regarding: [Option<String>; 4],
    warning: bool,
    reason: String,
    action: String,
    note: Option<String>,
}

impl Key {
    fn of(ev: &Event, regarding: &ObjectReference) -> Self {
        Self {
            regarding: [
                regarding.kind.clone(),
                regarding.namespace.clone(),
                regarding.name.clone(),
                regarding.uid.clone(),
            ],
            warning: matches!(ev.type_, EventType::Warning),
            reason: ev.reason.clone(),
            action: ev.action.clone(),
            note: ev.note.clone(),
        }
    }
}

/// An event published: its object's name and how many times it was seen, when last.
#[derive(Clone, Debug)]
struct Seen {
    name: String,
    count: i32,
    last: Instant,
}

/// What publishing an event means.
#[derive(Debug, PartialEq, Eq)]
enum Publish {
    /// A new Event object.
    Create,
    /// The `count`th occurrence of the Event object `name`.
    Repeat { name: String, count: i32 },
}

#[derive(Debug, Default)]
struct Cache(HashMap<Key, Seen>);

impl Cache {
    /// Forgets events older than the window, then says how to publish `key` at `now`.
    fn plan(&mut self, key: &Key, now: Instant) -> Publish {
        self.0
            .retain(|_, s| now.saturating_duration_since(s.last) < SERIES_WINDOW);
        match self.0.get(key) {
            Some(s) => Publish::Repeat {
                name: s.name.clone(),
                count: s.count + 1,
            },
            None => Publish::Create,
        }
    }

    fn record(&mut self, key: Key, name: String, count: i32, now: Instant) {
        self.0.insert(
            key,
            Seen {
                name,
                count,
                last: now,
            },
        );
    }
}

/// Publishes events about the jobs; clones share the cache.
#[derive(Clone)]
pub struct Recorder {
    client: Client,
    reporter: Reporter,
    cache: Arc<Mutex<Cache>>,
}

impl Recorder {
    pub fn new(client: Client, reporter: Reporter) -> Self {
        Self {
            client,
            reporter,
            cache: Arc::default(),
        }
    }

    /// Creates the event, or counts a repeat of the same one (same note) in its series.
    pub async fn publish(&self, ev: &Event, regarding: &ObjectReference) -> kube::Result<()> {
        let key = Key::of(ev, regarding);
        let plan = self.lock().plan(&key, Instant::now());
        let ns = regarding.namespace.as_deref().unwrap_or("default");
        let events: Api<K8sEvent> = Api::namespaced(self.client.clone(), ns);
        let now = Timestamp::now();
        if let Publish::Repeat { name, count } = plan {
            let patch = K8sEvent {
                series: Some(EventSeries {
                    count,
                    last_observed_time: MicroTime(now),
                }),
                ..K8sEvent::default()
            };
            match events
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    self.lock().record(key, name, count, Instant::now());
                    return Ok(());
                }
                // Gone (its TTL, or deleted): a new one.
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
        let event = self.generate(ev, regarding, now);
        let created = events.create(&PostParams::default(), &event).await?;
        let name = created.metadata.name.unwrap_or_default();
        self.lock().record(key, name, 1, Instant::now());
        Ok(())
    }

    fn generate(&self, ev: &Event, regarding: &ObjectReference, now: Timestamp) -> K8sEvent {
        let controller = &self.reporter.controller;
        K8sEvent {
            action: Some(ev.action.clone()),
            reason: Some(ev.reason.clone()),
            event_time: Some(MicroTime(now)),
            regarding: Some(regarding.clone()),
            note: ev.note.clone(),
            metadata: ObjectMeta {
                namespace: regarding.namespace.clone(),
                name: Some(format!(
                    "{}.{:x}",
                    regarding.name.as_ref().unwrap_or(controller),
                    now.as_nanosecond()
                )),
                ..ObjectMeta::default()
            },
            reporting_controller: Some(controller.clone()),
            reporting_instance: Some(
                self.reporter
                    .instance
                    .clone()
                    .unwrap_or_else(|| controller.clone()),
            ),
            type_: Some(
                match ev.type_ {
                    EventType::Normal => "Normal",
                    EventType::Warning => "Warning",
                }
                .into(),
            ),
            related: ev.secondary.clone(),
            ..K8sEvent::default()
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(reason: &str, note: &str) -> Event {
        Event {
            type_: EventType::Warning,
            reason: reason.into(),
            note: Some(note.into()),
            action: reason.into(),
            secondary: None,
        }
    }

    fn job() -> ObjectReference {
        ObjectReference {
            kind: Some("PretrainJob".into()),
            namespace: Some("ns".into()),
            name: Some("j".into()),
            uid: Some("u".into()),
            ..ObjectReference::default()
        }
    }

    #[test]
    fn restarts_with_different_notes_are_different_events_and_a_repeat_is_a_series() {
        let mut cache = Cache::default();
        let t = Instant::now();
        let first = Key::of(
            &event("RestartingGang", "as attempt 1 (pod deleted)"),
            &job(),
        );
        let second = Key::of(
            &event("RestartingGang", "as attempt 2 (pod evicted)"),
            &job(),
        );
        assert_eq!(cache.plan(&first, t), Publish::Create);
        cache.record(first.clone(), "j.1".into(), 1, t);
        // kube's Recorder would answer Repeat here and keep attempt 1's note.
        assert_eq!(cache.plan(&second, t), Publish::Create);
        cache.record(second, "j.2".into(), 1, t);
        assert_eq!(
            cache.plan(&first, t + Duration::from_secs(5)),
            Publish::Repeat {
                name: "j.1".into(),
                count: 2
            }
        );
    }

    #[test]
    fn an_event_older_than_the_window_starts_a_new_object() {
        let mut cache = Cache::default();
        let t = Instant::now();
        let key = Key::of(&event("ReconcileError", "422"), &job());
        cache.record(key.clone(), "j.1".into(), 3, t);
        assert_eq!(cache.plan(&key, t + SERIES_WINDOW), Publish::Create);
        assert!(cache.0.is_empty(), "forgotten");
    }

    #[test]
    fn the_same_note_about_another_object_or_of_another_type_is_another_event() {
        let mut cache = Cache::default();
        let t = Instant::now();
        let key = Key::of(&event("PodFailed", "x"), &job());
        cache.record(key, "j.1".into(), 1, t);
        let other = ObjectReference {
            name: Some("k".into()),
            ..job()
        };
        assert_eq!(
            cache.plan(&Key::of(&event("PodFailed", "x"), &other), t),
            Publish::Create
        );
        let mut normal = event("PodFailed", "x");
        normal.type_ = EventType::Normal;
        assert_eq!(cache.plan(&Key::of(&normal, &job()), t), Publish::Create);
    }
}
