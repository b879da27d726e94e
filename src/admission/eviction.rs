//! The eviction decision: given one eviction request and a snapshot of the pod and its
//! migrations, say what to answer. Pure, so every branch is tested without a cluster.

use std::sync::Arc;

use k8s_openapi::{api::core::v1::Pod, jiff::Timestamp};

use crate::{
    api::{
        self, FailurePolicyAnnotation, MigrationPolicy, Mode, OnFailure, Phase, PodMigration, PodMigrationSpec, Trigger,
    },
    preflight,
};

pub use crate::api::STOP_SOURCE_OF;

/// How long after a migration ended an eviction naming its pod is still taken for a retry of
/// the drain that started it (kubectl retries every 5 s; this leaves ample margin).
pub const STALE_RETRY_WINDOW_SECS: i64 = 600;

/// What the webhook was asked.
#[derive(Debug, Clone)]
pub struct EvictionRequest<'a> {
    pub namespace: &'a str,
    pub pod_name: &'a str,
    /// `request.dryRun` or `object.deleteOptions.dryRun` (kubectl drain --dry-run=server sets
    /// only the latter).
    pub dry_run: bool,
    /// The `migrate.io/stop-source-of` annotation of the Eviction object, if any.
    pub stop_source_of: Option<&'a str>,
    /// `deleteOptions.preconditions` of the Eviction: (uid, resourceVersion).
    pub precondition_uid: Option<&'a str>,
    pub precondition_resource_version: Option<&'a str>,
}

/// What the webhook knows of the cluster at that moment.
#[derive(Debug, Clone)]
pub struct Snapshot<'a> {
    /// The pod currently holding the name, if any.
    pub pod: Option<&'a Pod>,
    /// Whether the node the pod is bound to accepts new pods (false when cordoned; None
    /// when unbound or unknown).
    pub pod_node_schedulable: Option<bool>,
    /// PodMigrations in the namespace whose `spec.podName` is the requested name.
    pub migrations: &'a [Arc<PodMigration>],
    /// Opted-in static (mirror) pods on the pod's node, `namespace/name`: a drain skips them
    /// without a word, so every answer about that node names them.
    pub static_on_node: &'a [String],
    pub now: Timestamp,
}

/// The answer, with enough context for the message and the metric.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Let the eviction through.
    Allow {
        result: &'static str,
        warning: Option<String>,
    },
    /// Create this PodMigration, then answer 429. With `refusal`, the pod cannot move: the
    /// controller fails the migration with that reason, and the next retry follows the pod's
    /// `on-failure` policy.
    Start {
        name: String,
        spec: PodMigrationSpec,
        refusal: Option<String>,
    },
    /// Answer 429: the migration runs (kubectl retries in 5 s).
    Wait { message: String },
    /// Answer 429: the migration failed and the pod's policy blocks the eviction.
    Block { message: String },
    /// Answer 404: the eviction is a drain retry for a pod that has already been migrated and
    /// whose name is now held by its replacement; NotFound makes kubectl count it as gone.
    Gone { message: String },
}

impl Decision {
    /// Label for the `webhook_decisions_total{result}` metric.
    pub fn result(&self) -> &'static str {
        match self {
            Decision::Allow { result, .. } => result,
            Decision::Start { .. } => "started",
            Decision::Wait { .. } => "waiting",
            Decision::Block { .. } => "blocked",
            Decision::Gone { .. } => "gone",
        }
    }
}

fn allow(result: &'static str) -> Decision {
    Decision::Allow { result, warning: None }
}

/// Decide what to answer to one eviction.
pub fn decide(req: &EvictionRequest<'_>, snap: &Snapshot<'_>) -> Decision {
    let Some(pod) = snap.pod else {
        // Nothing holds the name: the API server answers NotFound itself. When a migration
        // just moved the pod (its source removed while this eviction was held), say where.
        return match moved_recently(snap) {
            Some(m) => state_safe(req, m),
            None => allow("allowed_no_pod"),
        };
    };
    let uid = pod.metadata.uid.as_deref().unwrap_or_default();

    // The API server refuses an eviction whose preconditions do not match the pod (409):
    // start nothing for it.
    let uid_mismatch = req.precondition_uid.is_some_and(|u| u != uid);
    let rv_mismatch = req
        .precondition_resource_version
        .is_some_and(|rv| Some(rv) != pod.metadata.resource_version.as_deref());
    if uid_mismatch || rv_mismatch {
        return allow("allowed_precondition_mismatch");
    }
    if let Some(gone) = stale_drain_retry(pod, uid, snap) {
        return gone;
    }
    if !api::is_stateful(pod) {
        return allow("allowed_unmanaged");
    }
    if preflight::is_mirror(pod) {
        // Never a migration: the Node owns it and nothing could ever replace it elsewhere.
        return refused_static(req, pod);
    }
    // Only migrations count: a stored checkpoint (backup) of the same pod says nothing about
    // whether its state is safe elsewhere.
    let own = snap
        .migrations
        .iter()
        .find(|m| m.spec.pod_uid == uid && !uid.is_empty() && m.spec.mode == Mode::Migrate);

    if req.dry_run {
        let warning = match own {
            Some(m) => format!(
                "kube-migrate: dry run; migration {} is {}",
                m.metadata.name.as_deref().unwrap_or_default(),
                m.phase()
            ),
            None => format!(
                "kube-migrate: dry run; a real eviction would live-migrate {}/{} first",
                req.namespace, req.pod_name
            ),
        };
        return Decision::Allow {
            result: "allowed_dry_run",
            warning: Some(warning),
        };
    }

    let Some(m) = own else {
        return start(req, pod, uid);
    };
    let name = m.metadata.name.as_deref().unwrap_or_default();
    let target = m.target_node().unwrap_or("a node still to be chosen");

    // The controller's own eviction that stops the source right after the checkpoint.
    if req.stop_source_of == Some(name) && m.source_stop_requested() && !m.phase().is_terminal() {
        return allow("allowed_source_stop");
    }
    if m.state_is_safe() {
        return state_safe(req, m);
    }
    if m.phase() == Phase::Failed {
        return failed(req, pod, m, name);
    }
    let detail = m
        .status
        .as_ref()
        .and_then(|s| s.message.as_deref())
        .map(|msg| format!(": {msg}"))
        .unwrap_or_default();
    Decision::Wait {
        message: format!(
            "kube-migrate is migrating {}/{} to {target} (PodMigration {name}, phase {}{detail}); \
             the eviction is allowed once the state is safe on the target",
            req.namespace,
            req.pod_name,
            m.phase()
        ),
    }
}

fn state_safe(req: &EvictionRequest<'_>, m: &PodMigration) -> Decision {
    Decision::Allow {
        result: "allowed_state_safe",
        warning: Some(format!(
            "kube-migrate: state of {}/{} is safe on node {} (migration {} {})",
            req.namespace,
            req.pod_name,
            m.target_node().unwrap_or("?"),
            m.metadata.name.as_deref().unwrap_or_default(),
            m.phase()
        )),
    }
}

/// The latest migration of the requested name whose state is safe and that is running or
/// ended within [`STALE_RETRY_WINDOW_SECS`].
fn moved_recently<'a>(snap: &Snapshot<'a>) -> Option<&'a PodMigration> {
    snap.migrations
        .iter()
        .filter(|m| m.spec.mode == Mode::Migrate && m.state_is_safe())
        .filter(|m| {
            m.finished_at()
                .is_none_or(|t| snap.now.as_second() - t.0.as_second() <= STALE_RETRY_WINDOW_SECS)
        })
        .max_by_key(|m| m.metadata.creation_timestamp.clone())
        .map(AsRef::as_ref)
}

fn start(req: &EvictionRequest<'_>, pod: &Pod, uid: &str) -> Decision {
    let node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    let (Some(node), Some("Running")) = (node, phase) else {
        // Not running anywhere: there is no state to save.
        return Decision::Allow {
            result: "allowed_not_running",
            warning: Some(format!(
                "kube-migrate: {}/{} is not running, evicted without migration",
                req.namespace, req.pod_name
            )),
        };
    };
    let on_failure = match api::on_failure(pod) {
        Ok(FailurePolicyAnnotation::Block) => OnFailure::Block,
        // An unreadable policy must not block a drain forever: fall back to the default.
        Ok(FailurePolicyAnnotation::Evict) | Err(_) => OnFailure::Evict,
    };
    Decision::Start {
        refusal: preflight::check_pod(pod).err().map(|r| r.to_string()),
        name: api::migration_name(req.pod_name, uid),
        spec: PodMigrationSpec {
            pod_name: req.pod_name.to_string(),
            pod_uid: uid.to_string(),
            source_node: node.to_string(),
            target_node: api::requested_target(pod).map(str::to_string),
            trigger: Trigger::Drain,
            policy: MigrationPolicy { on_failure },
            mode: Mode::Migrate,
            restore_from: None,
        },
    }
}

/// An opted-in static pod: refused, and the eviction follows its `on-failure` policy.
fn refused_static(req: &EvictionRequest<'_>, pod: &Pod) -> Decision {
    let why = preflight::Refusal::StaticPod(format!("{}/{}", req.namespace, req.pod_name));
    match api::on_failure(pod) {
        Ok(FailurePolicyAnnotation::Block) => Decision::Block {
            message: format!(
                "kube-migrate: {why}; eviction blocked by {}=block (its state stays on this node)",
                api::ON_FAILURE
            ),
        },
        _ => Decision::Allow {
            result: "refused_static_pod",
            warning: Some(format!(
                "kube-migrate: {why}; evicted without migration as {}=evict says (its state stays on this node)",
                api::ON_FAILURE
            )),
        },
    }
}

/// Warnings every non-retry answer about `pod` carries, so that nothing is lost silently.
pub fn warnings(pod: Option<&Pod>, snap: &Snapshot<'_>) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(pod) = pod.filter(|p| api::is_stateful(p)) {
        out.extend(api::stateful_warning(pod));
        out.extend(
            preflight::warnings(pod)
                .into_iter()
                .map(|w| format!("kube-migrate: {w}")),
        );
    }
    for name in snap.static_on_node {
        out.push(format!(
            "kube-migrate: static pod {name} on this node is opted in but cannot be migrated \
             (the node's manifest files own it); kubectl drain leaves it, and its state, on the node"
        ));
    }
    out
}

fn failed(req: &EvictionRequest<'_>, pod: &Pod, m: &PodMigration, name: &str) -> Decision {
    let why = m
        .status
        .as_ref()
        .and_then(|s| s.message.clone())
        .unwrap_or_else(|| "no reason recorded".into());
    if m.source_stop_requested() {
        // The source is already stopping: nothing left to protect by refusing.
        return Decision::Allow {
            result: "allowed_failed",
            warning: Some(format!(
                "kube-migrate: migration {name} failed after the source stopped: {why}"
            )),
        };
    }
    // The pod's current annotation wins, so an operator can unblock a drain by re-annotating.
    let policy = match api::on_failure(pod) {
        Ok(FailurePolicyAnnotation::Block) => OnFailure::Block,
        Ok(FailurePolicyAnnotation::Evict) => OnFailure::Evict,
        Err(_) => m.spec.policy.on_failure,
    };
    match policy {
        OnFailure::Evict => Decision::Allow {
            result: "allowed_failed",
            warning: Some(format!(
                "kube-migrate: migration {name} failed ({why}); evicting without migration as {}=evict says",
                api::ON_FAILURE
            )),
        },
        OnFailure::Block => Decision::Block {
            message: format!(
                "kube-migrate: migration {name} of {}/{} failed ({why}); eviction blocked by {}=block. \
                 To retry, delete the PodMigration; to evict without migration, annotate the pod {}=evict",
                req.namespace,
                req.pod_name,
                api::ON_FAILURE,
                api::ON_FAILURE
            ),
        },
    }
}

/// kubectl drain keeps retrying an eviction by name. When the pod it meant has been migrated
/// and a StatefulSet (or our controller, for a bare pod) recreated the name on another node,
/// a retry must not evict the restored pod: answer NotFound. A genuine eviction of the
/// replacement comes from a drain of *its* node, which is cordoned.
fn stale_drain_retry(pod: &Pod, uid: &str, snap: &Snapshot<'_>) -> Option<Decision> {
    let restore_of = api::restore_of(pod)?;
    let m = snap
        .migrations
        .iter()
        .find(|m| m.metadata.name.as_deref() == Some(restore_of) && m.spec.pod_uid != uid)?;
    if let Some(finished) = m.finished_at() {
        let age = snap.now.as_second() - finished.0.as_second();
        if age > STALE_RETRY_WINDOW_SECS {
            return None;
        }
    }
    if snap.pod_node_schedulable == Some(false) {
        return None;
    }
    Some(Decision::Gone {
        message: format!(
            "pods \"{}\" not found: kube-migrate migrated pod uid {} to node {} (PodMigration {restore_of}); \
             the pod now holding the name is its replacement",
            m.spec.pod_name,
            m.spec.pod_uid,
            m.target_node().unwrap_or("?")
        ),
    })
}
