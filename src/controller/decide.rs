//! Pure decisions of the controller: concurrency slots, capacity reservations, deadlines,
//! PodDisruptionBudget matching, restore trouble, and what a migration records of its pod.
//! No I/O, so each is unit-tested without a cluster.

use std::{sync::Arc, time::Duration};

use k8s_openapi::{
    api::{
        core::v1::{Node, Pod},
        policy::v1::PodDisruptionBudget,
    },
    jiff::Timestamp,
};
use kube::{
    ResourceExt,
    core::{Selector, SelectorExt},
};

use crate::{
    agent::api::{ArchiveRef, BaseImage},
    api::{ContainerCheckpoint, OwnerInfo, Phase, PodMigration, PodMigrationStatus},
    replacement,
};

/// A concurrency slot held by one migration, with the capacity it reserves on its target
/// until its replacement is bound there.
#[derive(Clone, Debug)]
pub struct Slot {
    pub key: String,
    pub source_node: String,
    pub target_node: Option<String>,
    /// The source pod (its requests are what the target must keep free).
    pub pod: Option<Arc<Pod>>,
}

impl Slot {
    pub fn of(m: &PodMigration, pod: Option<Arc<Pod>>) -> Slot {
        let replacement_bound = m.status.as_ref().is_some_and(|s| s.replacement.is_some());
        Slot {
            key: format!("{}/{}", m.namespace().unwrap_or_default(), m.name_any()),
            source_node: m.spec.source_node.clone(),
            target_node: m.target_node().map(str::to_string),
            pod: if replacement_bound { None } else { pod },
        }
    }
}

/// Why a migration waits in `Pending`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Queued {
    pub reason: &'static str,
    pub message: String,
}

/// May `me` (from `source`) start now, given the slots already held? Its own slot, if it
/// holds one already, does not count against it.
pub fn concurrency_gate(
    held: &[Slot],
    me: &str,
    source: &str,
    max_per_node: usize,
    max_total: usize,
) -> Result<(), Queued> {
    let others: Vec<&Slot> = held.iter().filter(|s| s.key != me).collect();
    let on_node = others.iter().filter(|s| s.source_node == source).count();
    if on_node >= max_per_node || others.len() >= max_total {
        return Err(Queued {
            reason: "ConcurrencyLimit",
            message: format!(
                "queued: {on_node}/{max_per_node} active on node {source}, {}/{max_total} in the cluster",
                others.len()
            ),
        });
    }
    Ok(())
}

/// The capacity in-flight migrations will take on their targets: each source pod, as if it
/// were already bound to its target. Placement adds these to the pods bound there.
pub fn reservations(held: &[Slot], me: &str) -> Vec<Pod> {
    held.iter()
        .filter(|s| s.key != me)
        .filter_map(|s| {
            let mut pod = (**s.pod.as_ref()?).clone();
            pod.spec.get_or_insert_with(Default::default).node_name = Some(s.target_node.clone()?);
            Some(pod)
        })
        .collect()
}

/// Upper bound of each non-terminal phase. On expiry before the source stopped the migration
/// rolls back (the pod's `on-failure` policy decides the eviction); after, the replacement
/// starts from its original image and the migration fails loudly.
#[derive(Clone, Debug, PartialEq)]
pub struct Deadlines {
    pub pending: Duration,
    pub checkpointing: Duration,
    pub transferring: Duration,
    pub building_image: Duration,
    pub restoring: Duration,
}

impl Default for Deadlines {
    fn default() -> Self {
        Self {
            pending: Duration::from_secs(1800),
            checkpointing: Duration::from_secs(360),
            transferring: Duration::from_secs(900),
            building_image: Duration::from_secs(300),
            restoring: Duration::from_secs(300),
        }
    }
}

impl Deadlines {
    pub fn budget(&self, phase: Phase) -> Option<Duration> {
        match phase {
            Phase::Pending => Some(self.pending),
            Phase::Checkpointing => Some(self.checkpointing),
            Phase::Transferring => Some(self.transferring),
            Phase::BuildingImage => Some(self.building_image),
            Phase::Restoring => Some(self.restoring),
            Phase::Succeeded | Phase::Failed => None,
        }
    }

    /// When the current phase must have ended: its start plus its budget.
    pub fn deadline(&self, status: &PodMigrationStatus) -> Option<Timestamp> {
        let budget = self.budget(status.phase)?;
        let started = status.phases.last().filter(|t| t.phase == status.phase)?.started_at.0;
        started.checked_add(jiff_span(budget)).ok()
    }

    /// Seconds past the deadline of the current phase, if it passed.
    pub fn overdue(&self, status: &PodMigrationStatus, now: Timestamp) -> Option<f64> {
        let deadline = self.deadline(status)?;
        (now > deadline).then(|| seconds_between(&deadline, &now))
    }
}

fn jiff_span(d: Duration) -> k8s_openapi::jiff::SignedDuration {
    k8s_openapi::jiff::SignedDuration::try_from(d).unwrap_or(k8s_openapi::jiff::SignedDuration::MAX)
}

pub fn seconds_between(a: &Timestamp, b: &Timestamp) -> f64 {
    (b.as_millisecond() - a.as_millisecond()) as f64 / 1000.0
}

/// Exponential backoff with jitter: 1, 2, 4, ... seconds capped at 60, each scaled by a
/// factor in [0.5, 1.5) from `jitter` (a uniform sample in [0, 1)), so that many migrations
/// failing together do not retry in lockstep.
pub fn backoff(attempts: u32, jitter: f64) -> Duration {
    let base = 2u64.saturating_pow(attempts.saturating_sub(1).min(6)).min(60) as f64;
    Duration::from_secs_f64((base * (0.5 + jitter.clamp(0.0, 1.0))).min(60.0))
}

/// A retry's wait: the backoff, but never past the phase's deadline (plus a moment, so the
/// step that runs then finds it passed): a migration ends on time even while it backs off.
pub fn retry_wait(backoff: Duration, deadline: Option<Timestamp>, now: Timestamp) -> Duration {
    match deadline {
        Some(deadline) => {
            let left = Duration::from_secs_f64(seconds_between(&now, &deadline).max(0.0)) + Duration::from_millis(50);
            backoff.min(left)
        }
        None => backoff,
    }
}

/// How long to wait before the current step may run again (the backoff recorded in the
/// status), or None when it may run now.
pub fn wait_for_retry(status: &PodMigrationStatus, now: Timestamp) -> Option<Duration> {
    let at = status.retry_at.as_ref()?.0;
    (at > now).then(|| Duration::from_secs_f64(seconds_between(&now, &at).max(0.0)))
}

/// The PodMigrations a pod's change concerns: the one it restores (`migrate.io/restore-of`),
/// and, for an opted-in pod, the one its eviction would have created (names are deterministic).
/// A reference to a migration that does not exist is dropped by the controller.
pub fn migrations_of_pod(pod: &Pod) -> Vec<kube::runtime::reflector::ObjectRef<PodMigration>> {
    let Some(ns) = pod.metadata.namespace.as_deref() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    if let Some(name) = crate::api::restore_of(pod) {
        out.push(kube::runtime::reflector::ObjectRef::new(name).within(ns));
    }
    if crate::api::is_stateful(pod)
        && let (Some(name), Some(uid)) = (pod.metadata.name.as_deref(), pod.metadata.uid.as_deref())
    {
        out.push(kube::runtime::reflector::ObjectRef::new(&crate::api::migration_name(name, uid)).within(ns));
    }
    out
}

/// Queued migrations to wake when `ended` finished and left its slot, instead of letting them
/// wait for their next poll: the `n` oldest waiting for a slot, those of its source node first.
pub fn queued_to_wake(
    ended: &PodMigration,
    all: &[Arc<PodMigration>],
    n: usize,
) -> Vec<kube::runtime::reflector::ObjectRef<PodMigration>> {
    if !ended.phase().is_terminal() {
        return Vec::new();
    }
    let mut queued: Vec<&PodMigration> = all
        .iter()
        .map(AsRef::as_ref)
        .filter(|m| m.phase() == Phase::Pending)
        .filter(|m| {
            m.status.as_ref().is_some_and(|s| {
                s.conditions.iter().any(|c| {
                    c.type_ == super::state::CONDITION_QUEUED && c.status == "True" && c.reason == "ConcurrencyLimit"
                })
            })
        })
        .collect();
    queued.sort_by_key(|m| {
        (
            m.spec.source_node != ended.spec.source_node,
            m.metadata.creation_timestamp.as_ref().map(|t| t.0),
            m.metadata.name.clone(),
        )
    });
    queued
        .into_iter()
        .take(n)
        .map(kube::runtime::reflector::ObjectRef::from_obj)
        .collect()
}

/// The first PodDisruptionBudget that selects `pod` and allows no disruption right now.
pub fn blocking_pdb<'a>(pdbs: &'a [PodDisruptionBudget], pod: &Pod) -> Option<&'a PodDisruptionBudget> {
    let labels = pod.labels();
    pdbs.iter().find(|pdb| {
        let Some(selector) = pdb.spec.as_ref().and_then(|s| s.selector.clone()) else {
            return false; // policy/v1: a nil selector selects nothing
        };
        let Ok(selector) = Selector::try_from(selector) else {
            return false;
        };
        selector.matches(labels) && pdb.status.as_ref().map_or(0, |s| s.disruptions_allowed) < 1
    })
}

/// When the last container of `pod` stopped, once every container reports `terminated`.
pub fn all_stopped_at(pod: &Pod) -> Option<Timestamp> {
    let statuses = pod.status.as_ref()?.container_statuses.as_ref()?;
    let containers = pod.spec.as_ref().map_or(0, |s| s.containers.len());
    if statuses.len() < containers {
        return None;
    }
    let stops: Option<Vec<Timestamp>> = statuses
        .iter()
        .map(|c| c.state.as_ref()?.terminated.as_ref()?.finished_at.as_ref().map(|t| t.0))
        .collect();
    stops?.into_iter().max()
}

/// Every container of the pod reports `running`.
pub fn all_running(pod: &Pod) -> bool {
    let containers = pod.spec.as_ref().map_or(0, |s| s.containers.len());
    let statuses = pod.status.as_ref().and_then(|s| s.container_statuses.as_ref());
    statuses.is_some_and(|all| {
        all.len() >= containers
            && containers > 0
            && all
                .iter()
                .all(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()))
    })
}

pub fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Why a released replacement is not coming up: a failure the migration should retry or end
/// on. `None` while it is merely on its way.
pub fn restore_trouble(pod: &Pod) -> Option<String> {
    let status = pod.status.as_ref()?;
    if status.phase.as_deref() == Some("Failed") {
        return Some(format!(
            "replacement pod failed: {}",
            status.message.clone().unwrap_or_default()
        ));
    }
    // Init containers too: the restore init container's image may fail to pull.
    status
        .init_container_statuses
        .iter()
        .flatten()
        .chain(status.container_statuses.iter().flatten())
        .find_map(|c| {
            let waiting = c.state.as_ref()?.waiting.as_ref()?;
            let reason = waiting.reason.as_deref()?;
            matches!(
                reason,
                "CrashLoopBackOff" | "ErrImagePull" | "ImagePullBackOff" | "CreateContainerError" | "RunContainerError"
            )
            .then(|| {
                format!(
                    "container {}: {reason}: {}",
                    c.name,
                    waiting.message.clone().unwrap_or_default()
                )
            })
        })
}

/// Why the target of a migration in `Restoring` must be given up, if it must: its Node was
/// deleted, or it is not Ready and no replacement container ever started there (so no copy
/// can be running: once one started, a NotReady node may be a partition, and a second
/// restore elsewhere could make two live copies; the deadline decides then).
pub fn target_lost(node: Option<&Node>, replacements: &[&Pod]) -> Option<String> {
    let Some(node) = node else {
        return Some("its Node was deleted".into());
    };
    let ready = super::placement::ready_condition(node).filter(|c| c.status != "True")?;
    let started = replacements.iter().any(|p| {
        p.status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .is_some_and(|cs| {
                cs.iter().any(|c| {
                    c.state
                        .as_ref()
                        .is_some_and(|s| s.running.is_some() || s.terminated.is_some())
                        || c.last_state.as_ref().is_some_and(|s| s.terminated.is_some())
                })
            })
    });
    (!started).then(|| {
        format!(
            "it is not Ready ({}) and nothing was restored there",
            ready.reason.as_deref().unwrap_or(&ready.status)
        )
    })
}

/// What the replacement waits for, when it is not Ready and not in trouble: the scheduler's
/// verdict (`PodScheduled=False`, e.g. "0/3 nodes are available: 1 Insufficient cpu"), or
/// that it was not scheduled yet.
pub fn restore_wait(pod: &Pod) -> String {
    let unscheduled = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "PodScheduled" && c.status == "False"));
    match unscheduled {
        Some(c) => format!(
            "{} is not scheduled: {}",
            pod.name_any(),
            c.message.clone().or_else(|| c.reason.clone()).unwrap_or_default()
        ),
        None => format!("waiting for {} to become Ready", pod.name_any()),
    }
}

pub fn controller_owner(pod: &Pod) -> Option<OwnerInfo> {
    pod.metadata
        .owner_references
        .as_ref()?
        .iter()
        .find(|o| o.controller == Some(true))
        .map(|o| OwnerInfo {
            api_version: o.api_version.clone(),
            kind: o.kind.clone(),
            name: o.name.clone(),
            uid: o.uid.clone(),
        })
}

/// What it takes to recreate a pod: its metadata (name, labels, annotations) and spec
/// without the fields the API server or the scheduler own. Kept for every migration, so that
/// a re-placement keeps the pod's own constraints (selector, affinity, tolerations, requests).
pub fn pod_template(pod: &Pod) -> Result<serde_json::Value, serde_json::Error> {
    let pod = &replacement::without_restore(pod);
    let mut spec = pod.spec.clone().unwrap_or_default();
    spec.node_name = None;
    let template = Pod {
        metadata: kube::api::ObjectMeta {
            name: pod.metadata.name.clone(),
            namespace: pod.metadata.namespace.clone(),
            labels: pod.metadata.labels.clone(),
            annotations: pod.metadata.annotations.clone(),
            ..Default::default()
        },
        spec: Some(spec),
        status: None,
    };
    serde_json::to_value(template)
}

pub fn containers_of(pod: &Pod) -> Vec<ContainerCheckpoint> {
    pod.spec
        .as_ref()
        .map(|s| {
            s.containers
                .iter()
                .map(|c| ContainerCheckpoint {
                    name: c.name.clone(),
                    base_image: c.image.clone(),
                    ..Default::default()
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Each container's image as the target must have it for a restore: the spec's name and what
/// the source's kubelet reported it runs (`imageID`).
pub fn base_images(pod: &Pod) -> Vec<BaseImage> {
    let statuses = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_deref())
        .unwrap_or_default();
    pod.spec
        .iter()
        .flat_map(|s| &s.containers)
        .map(|c| BaseImage {
            container: c.name.clone(),
            image: c.image.clone().unwrap_or_default(),
            image_id: statuses
                .iter()
                .find(|s| s.name == c.name)
                .map(|s| s.image_id.clone())
                .unwrap_or_default(),
        })
        .collect()
}

pub fn archive_refs(status: &PodMigrationStatus) -> Vec<ArchiveRef> {
    status
        .containers
        .iter()
        .map(|c| ArchiveRef {
            container: c.name.clone(),
            digest: c.digest.clone().unwrap_or_default(),
            size_bytes: c.size_bytes.unwrap_or(0),
        })
        .collect()
}

/// A pod of the migrated pod's owner that the pod webhook never saw (it was down, and its
/// `failurePolicy: Ignore` let the pod through): created after the source was stopped, neither
/// bound to a migration nor gated for one, and not being deleted. It started from scratch in
/// place of the restore this migration waits to do.
pub fn slipped_through(pod: &Pod, owner_uid: &str, source_uid: &str, stopped_at: &Timestamp) -> bool {
    let meta = &pod.metadata;
    let controlled_by_owner = meta
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.controller == Some(true) && o.uid == owner_uid);
    let annotations = meta.annotations.as_ref();
    let bound = annotations
        .is_some_and(|a| a.contains_key(crate::api::RESTORE_OF) || a.contains_key(crate::api::RESTORE_OWNER));
    // Creation times are whole seconds: one created in the second of the stop counts.
    let after_stop = meta
        .creation_timestamp
        .as_ref()
        .is_some_and(|t| t.0.as_second() >= stopped_at.as_second());
    controlled_by_owner
        && meta.uid.as_deref() != Some(source_uid)
        && !bound
        && !replacement::is_gated(pod)
        && meta.deletion_timestamp.is_none()
        && after_stop
}

/// The emptyDir contents packed with the checkpoint, as the agents name them.
pub fn volume_refs(status: &PodMigrationStatus) -> Vec<ArchiveRef> {
    status
        .volumes
        .iter()
        .map(|v| ArchiveRef {
            container: v.name.clone(),
            digest: v.digest.clone(),
            size_bytes: v.size_bytes,
        })
        .collect()
}

pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
#[path = "decide_tests.rs"]
mod tests;
