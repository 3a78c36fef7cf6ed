//! Kubernetes Events (`events.k8s.io/v1`), each one created whole.
//!
//! kube's `Recorder` folds an Event into the one it sent for the same object, reason and action
//! in the last six minutes — a PATCH of `series.count` that keeps the *first* note — and keeps
//! every Event it sent for those six minutes. regmirror's notes carry what happened (which
//! config, how many nodes, why a mirror is Degraded): folded, `kubectl describe` would show a
//! stale one. And an operator reaching thousands of nodes would hold thousands of Events in
//! memory. regmirror sends few Events (per mirror and pass, per node and apply), so each is
//! simply created.

use std::sync::atomic::{AtomicI64, Ordering};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};

/// The longest note the API server accepts, in bytes.
pub const NOTE_MAX: usize = 1024;

/// Events about cluster-scoped objects (Nodes, RegistryMirrors) live in this namespace.
pub const CLUSTER_SCOPED_NAMESPACE: &str = "default";

/// What happened, for one Event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Occurrence<'a> {
    pub warning: bool,
    /// Why, in UpperCamelCase: `RolloutStep`, `Applied`.
    pub reason: &'a str,
    /// What was done: `Rollout`, `Apply`.
    pub action: &'a str,
    /// For people; cut to [`NOTE_MAX`] bytes.
    pub note: &'a str,
}

/// Creates Events as one controller instance.
pub struct EventPublisher {
    client: kube::Client,
    controller: String,
    instance: String,
    /// The last timestamp an Event's name was made from: names stay unique when two Events
    /// about one object come within the clock's resolution.
    last_stamp: AtomicI64,
}

impl EventPublisher {
    /// `controller` is e.g. `regmirror`; `instance` the pod or node name.
    pub fn new(client: kube::Client, controller: &str, instance: &str) -> Self {
        EventPublisher {
            client,
            controller: controller.to_owned(),
            instance: instance.to_owned(),
            last_stamp: AtomicI64::new(0),
        }
    }

    /// Records `what` about `regarding`.
    pub async fn publish(
        &self,
        what: &Occurrence<'_>,
        regarding: &ObjectReference,
    ) -> Result<(), kube::Error> {
        let now = Timestamp::now();
        let stamp = next_stamp(&self.last_stamp, now.as_nanosecond() as i64);
        let event = event(
            what,
            regarding,
            &self.controller,
            &self.instance,
            now,
            stamp,
        );
        let namespace = regarding
            .namespace
            .as_deref()
            .unwrap_or(CLUSTER_SCOPED_NAMESPACE);
        let api: Api<Event> = Api::namespaced(self.client.clone(), namespace);
        api.create(&PostParams::default(), &event).await.map(drop)
    }
}

/// `nanos`, or one past the last stamp handed out if the clock has not moved past it.
fn next_stamp(last: &AtomicI64, nanos: i64) -> i64 {
    let previous = last
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |last| {
            Some(nanos.max(last + 1))
        })
        .unwrap_or_else(|last| last);
    nanos.max(previous + 1)
}

/// The Event object for `what` (pure).
pub fn event(
    what: &Occurrence<'_>,
    regarding: &ObjectReference,
    controller: &str,
    instance: &str,
    time: Timestamp,
    stamp: i64,
) -> Event {
    let subject = name_prefix(regarding.name.as_deref().unwrap_or(controller));
    Event {
        metadata: ObjectMeta {
            name: Some(format!("{subject}.{stamp:x}")),
            namespace: regarding.namespace.clone(),
            ..ObjectMeta::default()
        },
        event_time: Some(MicroTime(time)),
        type_: Some(if what.warning { "Warning" } else { "Normal" }.to_owned()),
        reason: Some(what.reason.to_owned()),
        action: Some(what.action.to_owned()),
        note: Some(truncate(what.note, NOTE_MAX).to_owned()),
        regarding: Some(regarding.clone()),
        reporting_controller: Some(controller.to_owned()),
        reporting_instance: Some(truncate(instance, INSTANCE_MAX).to_owned()),
        ..Event::default()
    }
}

/// The longest `reportingInstance` the API server accepts.
const INSTANCE_MAX: usize = 128;

/// An Event's name is `<object>.<stamp>`, a DNS subdomain of at most 253 characters: a long
/// object name is cut (to end on a letter or digit, as a subdomain must).
fn name_prefix(object: &str) -> &str {
    truncate(object, 253 - 1 - 16).trim_end_matches(|c: char| !c.is_ascii_alphanumeric())
}

/// The longest prefix of `text` of at most `max` bytes that ends on a character boundary.
fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str) -> ObjectReference {
        ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(name.into()),
            uid: Some("u-1".into()),
            ..ObjectReference::default()
        }
    }

    #[test]
    fn an_event_names_its_object_reporter_and_what_happened() {
        let what = Occurrence {
            warning: true,
            reason: "ApplyFailed",
            action: "Apply",
            note: "hosts.toml: permission denied",
        };
        let time = Timestamp::from_second(1_800_000_000).unwrap();
        let e = event(
            &what,
            &node("edge-1"),
            "regmirror-agent",
            "edge-1",
            time,
            255,
        );
        assert_eq!(e.metadata.name.as_deref(), Some("edge-1.ff"));
        assert_eq!(e.metadata.namespace, None, "the API server takes the URL's");
        assert_eq!(e.type_.as_deref(), Some("Warning"));
        assert_eq!(e.reason.as_deref(), Some("ApplyFailed"));
        assert_eq!(e.action.as_deref(), Some("Apply"));
        assert_eq!(e.note.as_deref(), Some("hosts.toml: permission denied"));
        assert_eq!(e.regarding, Some(node("edge-1")));
        assert_eq!(e.reporting_controller.as_deref(), Some("regmirror-agent"));
        assert_eq!(e.reporting_instance.as_deref(), Some("edge-1"));
        assert_eq!(e.event_time, Some(MicroTime(time)));
        assert_eq!(e.series, None, "never folded into an earlier Event");
    }

    #[test]
    fn a_long_note_is_cut_on_a_character_boundary() {
        let note = "é".repeat(NOTE_MAX);
        let what = Occurrence {
            warning: false,
            reason: "RolloutStep",
            action: "Rollout",
            note: &note,
        };
        let e = event(&what, &node("n"), "regmirror", "pod", Timestamp::now(), 1);
        let cut = e.note.unwrap();
        assert_eq!(cut.len(), NOTE_MAX);
        assert!(cut.chars().all(|c| c == 'é'));
    }

    #[test]
    fn an_event_about_an_object_with_a_long_name_is_still_valid() {
        let long = format!("{}.{}", "a".repeat(230), "b".repeat(22));
        let what = Occurrence {
            warning: false,
            reason: "Applied",
            action: "Apply",
            note: "",
        };
        let e = event(
            &what,
            &node(&long),
            "regmirror-agent",
            &long,
            Timestamp::now(),
            i64::MAX,
        );
        let name = e.metadata.name.unwrap();
        assert!(name.len() <= 253, "{}", name.len());
        assert!(name.starts_with(&"a".repeat(230)));
        assert!(!name.contains(".."), "{name}");
        assert_eq!(e.reporting_instance.unwrap().len(), 128);
        assert_eq!(e.regarding.unwrap().name.as_deref(), Some(long.as_str()));
    }

    #[test]
    fn stamps_never_repeat_even_when_the_clock_does() {
        let last = AtomicI64::new(0);
        let stamps: Vec<i64> = [100, 100, 100, 90, 200]
            .into_iter()
            .map(|nanos| next_stamp(&last, nanos))
            .collect();
        assert_eq!(stamps, [100, 101, 102, 103, 200]);
    }
}
