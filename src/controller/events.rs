//! Events on PodMigrations and pods, written as `core/v1` Events with `firstTimestamp`,
//! `lastTimestamp` and `count`. kube-runtime's `Recorder` writes `events.k8s.io/v1` Events, whose
//! strict validation forbids those deprecated fields, so `kubectl get events
//! --sort-by=.lastTimestamp` (what operators type) put every kube-migrate Event first, unordered.
//! Repeats of one (object, reason, message) within ten minutes bump `count` and
//! `lastTimestamp` of the same Event, as the kubelet's recorder does.

use std::{collections::HashMap, sync::Mutex, time::Duration};

use k8s_openapi::{
    api::core::v1::{Event, EventSource, ObjectReference},
    apimachinery::pkg::apis::meta::v1::{MicroTime, Time},
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{ObjectMeta, Patch, PatchParams, PostParams},
};
use serde_json::json;

/// How long a repeat is folded into the earlier Event.
const FOLD_WINDOW: Duration = Duration::from_secs(600);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    Normal,
    Warning,
}

impl EventType {
    fn as_str(self) -> &'static str {
        match self {
            EventType::Normal => "Normal",
            EventType::Warning => "Warning",
        }
    }
}

/// The Event object for a first occurrence (pure).
pub fn new_event(
    regarding: &ObjectReference,
    type_: EventType,
    reason: &str,
    note: &str,
    component: &str,
    instance: &str,
    now: Timestamp,
) -> Event {
    let name = format!(
        "{}.{:x}",
        regarding.name.as_deref().unwrap_or(component),
        now.as_nanosecond()
    );
    Event {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: regarding.namespace.clone(),
            ..Default::default()
        },
        involved_object: regarding.clone(),
        reason: Some(reason.to_string()),
        // Event messages are limited to 1 KiB by the API server's validation.
        message: Some(note.chars().take(1000).collect()),
        type_: Some(type_.as_str().to_string()),
        action: Some("Migrate".to_string()),
        first_timestamp: Some(Time(now)),
        last_timestamp: Some(Time(now)),
        event_time: Some(MicroTime(now)),
        count: Some(1),
        source: Some(EventSource {
            component: Some(component.to_string()),
            host: None,
        }),
        reporting_component: Some(component.to_string()),
        reporting_instance: Some(instance.to_string()),
        ..Default::default()
    }
}

#[derive(Clone, Hash, PartialEq, Eq)]
struct Key {
    namespace: String,
    uid: String,
    name: String,
    reason: String,
    note: String,
}

struct Seen {
    event: String,
    count: i32,
    at: Timestamp,
}

pub struct Recorder {
    client: Client,
    component: String,
    instance: String,
    seen: Mutex<HashMap<Key, Seen>>,
}

impl Recorder {
    pub fn new(client: Client, component: impl Into<String>, instance: impl Into<String>) -> Self {
        Self {
            client,
            component: component.into(),
            instance: instance.into(),
            seen: Mutex::new(HashMap::new()),
        }
    }

    pub async fn publish(
        &self,
        regarding: &ObjectReference,
        type_: EventType,
        reason: &str,
        note: &str,
    ) -> Result<(), kube::Error> {
        let now = Timestamp::now();
        let ns = regarding.namespace.clone().unwrap_or_else(|| "default".into());
        let api: Api<Event> = Api::namespaced(self.client.clone(), &ns);
        let key = Key {
            namespace: ns,
            uid: regarding.uid.clone().unwrap_or_default(),
            name: regarding.name.clone().unwrap_or_default(),
            reason: reason.to_string(),
            note: note.to_string(),
        };
        let repeat = {
            let mut seen = self.seen.lock().expect("event cache poisoned");
            seen.retain(|_, s| now.duration_since(s.at).unsigned_abs() < FOLD_WINDOW);
            seen.get_mut(&key).map(|s| {
                s.count += 1;
                s.at = now;
                (s.event.clone(), s.count)
            })
        };
        if let Some((name, count)) = repeat {
            let patch = json!({ "count": count, "lastTimestamp": Time(now), "eventTime": MicroTime(now) });
            match api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await {
                Ok(_) => return Ok(()),
                // Gone (TTL) or never created: record a new one.
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
        let event = new_event(regarding, type_, reason, note, &self.component, &self.instance, now);
        let name = event.metadata.name.clone().unwrap_or_default();
        api.create(&PostParams::default(), &event).await?;
        self.seen.lock().expect("event cache poisoned").insert(
            key,
            Seen {
                event: name,
                count: 1,
                at: now,
            },
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_carry_the_timestamps_kubectl_sorts_by() {
        let now = Timestamp::from_second(1_800_000_000).unwrap();
        let regarding = ObjectReference {
            kind: Some("Pod".into()),
            namespace: Some("shop".into()),
            name: Some("db-0".into()),
            uid: Some("u".into()),
            ..Default::default()
        };
        let e = new_event(
            &regarding,
            EventType::Warning,
            "StateLost",
            &"x".repeat(2000),
            "kube-migrate",
            "w-0",
            now,
        );
        assert_eq!(e.last_timestamp, Some(Time(now)));
        assert_eq!(e.first_timestamp, Some(Time(now)));
        assert_eq!(e.count, Some(1));
        assert_eq!(e.type_.as_deref(), Some("Warning"));
        assert_eq!(e.metadata.namespace.as_deref(), Some("shop"));
        assert!(e.metadata.name.unwrap().starts_with("db-0."));
        assert_eq!(e.message.unwrap().len(), 1000);
        assert_eq!(e.involved_object, regarding);
    }
}
