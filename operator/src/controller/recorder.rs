//! Publishing `events.k8s.io/v1` Events, repeats folded into a series.
//!
//! Written here rather than taken from kube's `Recorder` because that one keys a series
//! without the note (its documentation says the note is part of the key; client-go includes it
//! since Kubernetes 1.26, kubernetes#112365). "replicas 3 -> 5" published shortly after
//! "replicas 1 -> 3" was then recorded as a second occurrence of the first, and
//! `kubectl describe` kept saying "1 -> 3". Here an Event is a repeat only when everything a
//! reader sees is the same: object, type, reason, action and note. The object is keyed without
//! its resourceVersion, so a repeat across status writes still folds into one series.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event as K8sEvent, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType, Reporter};
use kube::{Api, Client};
use serde_json::json;

/// Repeats within this long of the last occurrence extend its series (as client-go does).
const SERIES_WINDOW: Duration = Duration::from_secs(6 * 60);

#[derive(Clone, PartialEq, Eq, Hash)]
struct Key {
    namespace: String,
    regarding: (Option<String>, Option<String>, Option<String>),
    type_: &'static str,
    reason: String,
    action: String,
    note: Option<String>,
}

struct Occurrences {
    name: String,
    count: i32,
    last: Timestamp,
}

pub struct Recorder {
    client: Client,
    reporter: Reporter,
    recent: Mutex<HashMap<Key, Occurrences>>,
}

impl Recorder {
    pub fn new(client: Client, reporter: Reporter) -> Self {
        Recorder {
            client,
            reporter,
            recent: Mutex::default(),
        }
    }

    /// Publish `ev` about `regarding`: a new Event, or one more occurrence of the same Event
    /// published less than [`SERIES_WINDOW`] ago.
    pub async fn publish(&self, ev: &Event, regarding: &ObjectReference) -> kube::Result<()> {
        let namespace = regarding
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let type_ = match ev.type_ {
            EventType::Normal => "Normal",
            EventType::Warning => "Warning",
        };
        let key = Key {
            namespace: namespace.clone(),
            regarding: (
                regarding.kind.clone(),
                regarding.name.clone(),
                regarding.uid.clone(),
            ),
            type_,
            reason: ev.reason.clone(),
            action: ev.action.clone(),
            note: ev.note.clone(),
        };
        let now = Timestamp::now();
        let repeat = {
            let mut recent = self.recent.lock().expect("event cache lock");
            recent.retain(|_, o| {
                now.duration_since(o.last).as_secs() < SERIES_WINDOW.as_secs() as i64
            });
            recent.get(&key).map(|o| (o.name.clone(), o.count + 1))
        };
        let api: Api<K8sEvent> = Api::namespaced(self.client.clone(), &namespace);
        if let Some((name, count)) = repeat {
            let series = EventSeries {
                count,
                last_observed_time: MicroTime(now),
            };
            match api
                .patch(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({ "series": series })),
                )
                .await
            {
                Ok(_) => {
                    self.remember(key, name, count, now);
                    return Ok(());
                }
                // Gone (expired or deleted): start a new one.
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
        let mut regarding = regarding.clone();
        regarding.resource_version = None;
        let event = K8sEvent {
            metadata: ObjectMeta {
                namespace: Some(namespace),
                name: Some(format!(
                    "{}.{:x}",
                    regarding
                        .name
                        .as_deref()
                        .unwrap_or(&self.reporter.controller),
                    now.as_nanosecond()
                )),
                ..Default::default()
            },
            action: Some(ev.action.clone()),
            reason: Some(ev.reason.clone()),
            note: ev.note.clone(),
            type_: Some(type_.into()),
            event_time: Some(MicroTime(now)),
            regarding: Some(regarding),
            related: ev.secondary.clone(),
            reporting_controller: Some(self.reporter.controller.clone()),
            reporting_instance: Some(
                self.reporter
                    .instance
                    .clone()
                    .unwrap_or_else(|| self.reporter.controller.clone()),
            ),
            ..Default::default()
        };
        let created = api.create(&PostParams::default(), &event).await?;
        let name = created.metadata.name.unwrap_or_default();
        self.remember(key, name, 1, now);
        Ok(())
    }

    fn remember(&self, key: Key, name: String, count: i32, last: Timestamp) {
        self.recent
            .lock()
            .expect("event cache lock")
            .insert(key, Occurrences { name, count, last });
    }
}
