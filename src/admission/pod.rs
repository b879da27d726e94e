//! Replacement pods: the pod-create decision of the mutating webhook and the restore
//! mutation it shares with the controller (which applies it to bare pods it recreates and to
//! gated pods before releasing them).

use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;

use crate::api::{self, Mode, PodMigration};
pub use crate::replacement::{add_pull_secrets, add_restore_helper, apply_restore, gate_for_owner, patch};

/// What to do with a pod being created.
#[derive(Debug, Clone, PartialEq)]
pub enum PodDecision {
    /// Not a replacement of anything in flight.
    Untouched,
    /// The replacement of exactly this migration: gate, pin and (when built) swap images.
    Restore { migration: String },
    /// A replacement for one of several migrations of the same owner: gate it and let the
    /// controller, which sees every claim in order, pick the migration.
    GateForOwner { owner_uid: String, candidates: Vec<String> },
}

impl PodDecision {
    pub fn result(&self) -> &'static str {
        match self {
            PodDecision::Untouched => "untouched",
            PodDecision::Restore { .. } => "restore",
            PodDecision::GateForOwner { .. } => "gated_for_owner",
        }
    }
}

/// The controlling owner reference of a pod, if any.
pub fn controller_uid(pod: &Pod) -> Option<&str> {
    pod.metadata
        .owner_references
        .as_ref()?
        .iter()
        .find(|o| o.controller == Some(true))
        .map(|o| o.uid.as_str())
}

/// Migrations that still wait for a replacement pod (they have checkpointed or are about to,
/// and have none bound yet).
fn awaits_replacement(m: &PodMigration) -> bool {
    let phase = m.phase();
    // A checkpoint-only backup never stops its pod, so nothing replaces it.
    m.spec.mode != Mode::Checkpoint && phase.is_active() && m.status.as_ref().is_none_or(|s| s.replacement.is_none())
}

/// Decide whether a new pod replaces a migrating one. `migrations` are those of the pod's
/// namespace.
pub fn decide(pod: &Pod, migrations: &[Arc<PodMigration>]) -> PodDecision {
    if let Some(name) = api::restore_of(pod) {
        // Already bound (recreated by our controller, or re-sent): re-apply idempotently.
        return match migrations.iter().find(|m| m.metadata.name.as_deref() == Some(name)) {
            Some(_) => PodDecision::Restore {
                migration: name.to_string(),
            },
            None => PodDecision::Untouched,
        };
    }
    let pod_name = pod.metadata.name.as_deref();
    let owner = controller_uid(pod);
    let candidates: Vec<&Arc<PodMigration>> = migrations
        .iter()
        .filter(|m| awaits_replacement(m))
        .filter(|m| {
            let m_owner = m.status.as_ref().and_then(|s| s.owner.as_ref());
            match (m_owner, owner) {
                // Same controller (ReplicaSet or StatefulSet).
                (Some(mo), Some(o)) if mo.uid == o => {
                    mo.kind != "StatefulSet" || pod_name == Some(m.spec.pod_name.as_str())
                }
                // A bare pod recreated under the same name.
                (None, None) => pod_name == Some(m.spec.pod_name.as_str()),
                _ => false,
            }
        })
        .collect();
    match candidates.as_slice() {
        [] => PodDecision::Untouched,
        [one] => PodDecision::Restore {
            migration: one.metadata.name.clone().unwrap_or_default(),
        },
        many => PodDecision::GateForOwner {
            owner_uid: owner.unwrap_or_default().to_string(),
            candidates: many.iter().filter_map(|m| m.metadata.name.clone()).collect(),
        },
    }
}
