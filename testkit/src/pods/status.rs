//! The status of a pod as this kubelet reports it: phase, conditions (each keeping its
//! transition time), container and init container statuses.

use std::collections::HashMap;

use k8s_openapi::{api::core::v1::Pod, jiff::Timestamp};
use kube::ResourceExt;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::{Failure, POD_IP};
use crate::{checkpoint::rfc3339, container::Container};

/// What the status of one container is built from.
pub(super) enum ContainerView<'a> {
    Creating,
    Failed(&'a Failure),
    Running(&'a Container),
    Terminated(&'a Container),
}

/// Remembers what was reported, so transitions keep their times and nothing is sent twice.
pub(super) struct StatusTracker {
    start_time: String,
    transitions: HashMap<String, (String, String)>,
    pub(super) last_sent: Option<Value>,
}

impl StatusTracker {
    pub(super) fn new(pod: &Pod) -> Self {
        let status = pod.status.as_ref();
        let start_time = status
            .and_then(|s| s.start_time.as_ref())
            .map(|t| rfc3339(t.0))
            .unwrap_or_else(|| rfc3339(Timestamp::now()));
        let transitions = status
            .and_then(|s| s.conditions.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|c| {
                let time = c.last_transition_time.as_ref()?;
                Some((c.type_.clone(), (c.status.clone(), rfc3339(time.0))))
            })
            .collect();
        Self {
            start_time,
            transitions,
            last_sent: None,
        }
    }

    fn condition(&mut self, kind: &str, ok: bool, reason: Option<&str>, message: Option<String>) -> Value {
        let status = if ok { "True" } else { "False" };
        let entry = self
            .transitions
            .entry(kind.to_string())
            .or_insert_with(|| (status.to_string(), rfc3339(Timestamp::now())));
        if entry.0 != status {
            *entry = (status.to_string(), rfc3339(Timestamp::now()));
        }
        let mut c = json!({
            "type": kind,
            "status": status,
            "lastProbeTime": null,
            "lastTransitionTime": entry.1,
        });
        if let Some(reason) = reason {
            c["reason"] = json!(reason);
        }
        if let Some(message) = message {
            c["message"] = json!(message);
        }
        c
    }

    /// The full status of `pod` with `views` for its containers (in spec order).
    pub(super) fn status(&mut self, pod: &Pod, views: &[(String, String, ContainerView<'_>)], terminal: bool) -> Value {
        let all_running = views.iter().all(|(_, _, v)| matches!(v, ContainerView::Running(_)));
        let unready: Vec<&str> = views
            .iter()
            .filter(|(_, _, v)| !matches!(v, ContainerView::Running(_)))
            .map(|(n, _, _)| n.as_str())
            .collect();
        let phase = if terminal {
            "Succeeded"
        } else if all_running {
            "Running"
        } else {
            "Pending"
        };
        let (ready_reason, ready_message) = if terminal {
            (Some("PodCompleted"), None)
        } else if all_running {
            (None, None)
        } else {
            (
                Some("ContainersNotReady"),
                Some(format!("containers with unready status: [{}]", unready.join(" "))),
            )
        };
        let mut conditions = vec![
            self.condition("PodReadyToStartContainers", !terminal, None, None),
            self.condition("Initialized", true, None, None),
            self.condition("Ready", all_running && !terminal, ready_reason, ready_message.clone()),
            self.condition("ContainersReady", all_running && !terminal, ready_reason, ready_message),
            self.condition("PodScheduled", true, None, None),
        ];
        // Conditions owned by others (DisruptionTarget, readiness gates) are kept as they are.
        let ours = [
            "PodReadyToStartContainers",
            "Initialized",
            "Ready",
            "ContainersReady",
            "PodScheduled",
        ];
        for c in pod.status.iter().flat_map(|s| s.conditions.iter().flatten()) {
            if !ours.contains(&c.type_.as_str())
                && let Ok(v) = serde_json::to_value(c)
            {
                conditions.push(v);
            }
        }
        let container_statuses: Vec<Value> = views
            .iter()
            .map(|(name, image, view)| container_status(name, image, view))
            .collect();
        let init_statuses: Vec<Value> = pod
            .spec
            .iter()
            .flat_map(|s| s.init_containers.iter().flatten())
            .map(|c| {
                json!({
                    "name": c.name,
                    "image": c.image.clone().unwrap_or_default(),
                    "imageID": fake_image_id(c.image.as_deref().unwrap_or_default()),
                    "containerID": format!("test-kubelet://{}", hex::encode(Sha256::digest(format!("{}/{}", pod.uid().unwrap_or_default(), c.name)))),
                    "ready": true,
                    "started": false,
                    "restartCount": 0,
                    "state": {"terminated": {
                        "exitCode": 0,
                        "reason": "Completed",
                        "startedAt": self.start_time,
                        "finishedAt": self.start_time,
                    }},
                })
            })
            .collect();
        let mut status = json!({
            "phase": phase,
            "conditions": conditions,
            "hostIP": POD_IP,
            "hostIPs": [{"ip": POD_IP}],
            "podIP": POD_IP,
            "podIPs": [{"ip": POD_IP}],
            "startTime": self.start_time,
            "containerStatuses": container_statuses,
        });
        if !init_statuses.is_empty() {
            status["initContainerStatuses"] = json!(init_statuses);
        }
        status
    }
}

/// The imageID of an image that was not really pulled: `<name>@sha256:<hash of the name>`.
pub(super) fn fake_image_id(image: &str) -> String {
    let name = image.split('@').next().unwrap_or(image);
    let name = match name.rsplit_once(':') {
        Some((repo, tag)) if !tag.contains('/') => repo,
        _ => name,
    };
    format!("{name}@sha256:{}", hex::encode(Sha256::digest(image.as_bytes())))
}

fn container_status(name: &str, image: &str, view: &ContainerView<'_>) -> Value {
    match view {
        ContainerView::Creating => json!({
            "name": name, "image": image, "imageID": "", "ready": false, "started": false, "restartCount": 0,
            "state": {"waiting": {"reason": "ContainerCreating"}},
        }),
        ContainerView::Failed(f) => json!({
            "name": name, "image": image, "imageID": "", "ready": false, "started": false, "restartCount": 0,
            "state": {"waiting": {"reason": f.reason, "message": f.message}},
        }),
        ContainerView::Running(c) => json!({
            "name": name, "image": image, "imageID": c.image_id, "containerID": format!("test-kubelet://{}", c.id),
            "ready": true, "started": true, "restartCount": 0,
            "state": {"running": {"startedAt": rfc3339(c.started_at)}},
        }),
        ContainerView::Terminated(c) => json!({
            "name": name, "image": image, "imageID": c.image_id, "containerID": format!("test-kubelet://{}", c.id),
            "ready": false, "started": false, "restartCount": 0,
            "state": {"terminated": {
                "exitCode": if c.killed() { 137 } else { 0 },
                "reason": if c.killed() { "Error" } else { "Completed" },
                // Where the simulated counter stopped: what a restored copy must continue from.
                "message": c.counter().map(|n| format!("counter={n}")).unwrap_or_default(),
                "startedAt": rfc3339(c.started_at),
                "finishedAt": rfc3339(c.finished_at().unwrap_or_else(Timestamp::now)),
                "containerID": format!("test-kubelet://{}", c.id),
            }},
        }),
    }
}
