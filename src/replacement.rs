//! The replacement pod's mutation, shared by the pod-create webhook (which applies it to
//! pods the owner creates) and the controller (which applies it to bare pods it recreates and
//! to gated pods before releasing them): restore binding, scheduling gate, node pin,
//! checkpoint images, and the inverse that recovers the pod as its owner meant it.

use k8s_openapi::api::core::v1::{
    Affinity, NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, Pod, PodSchedulingGate,
};

use crate::api::{self, PodMigration};

/// Add the restore gate, once.
pub fn add_gate(pod: &mut Pod) {
    let spec = pod.spec.get_or_insert_with(Default::default);
    let gates = spec.scheduling_gates.get_or_insert_with(Vec::new);
    if !gates.iter().any(|g| g.name == api::RESTORE_GATE) {
        gates.push(PodSchedulingGate {
            name: api::RESTORE_GATE.to_string(),
        });
    }
}

/// Remove the restore gate (leaving any other gate alone).
pub fn remove_gate(pod: &mut Pod) {
    if let Some(gates) = pod.spec.as_mut().and_then(|s| s.scheduling_gates.as_mut()) {
        gates.retain(|g| g.name != api::RESTORE_GATE);
    }
}

pub fn is_gated(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.scheduling_gates.as_ref())
        .is_some_and(|g| g.iter().any(|g| g.name == api::RESTORE_GATE))
}

fn set_annotation(pod: &mut Pod, key: &str, value: &str) {
    pod.metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(key.to_string(), value.to_string());
}

/// List the pull Secrets of `migrations` in a new replacement's `imagePullSecrets` (the field
/// is immutable once the pod exists: only its creation can carry them; see
/// `controller::pull`). The kubelet tries each for the registry it pulls from.
pub fn add_pull_secrets<'a>(pod: &mut Pod, migrations: impl IntoIterator<Item = &'a str>) {
    let spec = pod.spec.get_or_insert_with(Default::default);
    let secrets = spec.image_pull_secrets.get_or_insert_with(Vec::new);
    for m in migrations {
        let name = api::pull_secret_name(m);
        if !secrets.iter().any(|s| s.name == name) {
            secrets.push(k8s_openapi::api::core::v1::LocalObjectReference { name });
        }
    }
}

/// Gate a pod for the controller to bind later (several candidate migrations).
pub fn gate_for_owner(pod: &mut Pod, owner_uid: &str) {
    set_annotation(pod, api::RESTORE_OWNER, owner_uid);
    add_gate(pod);
}

/// Require `metadata.name == node`. A gated pod's required node affinity may only be
/// narrowed, so the requirement is added to every existing term (AND), or becomes the only
/// term when there were none. Idempotent.
pub fn pin_to_node(pod: &mut Pod, node: &str) {
    let requirement = NodeSelectorRequirement {
        key: "metadata.name".into(),
        operator: "In".into(),
        values: Some(vec![node.to_string()]),
    };
    let spec = pod.spec.get_or_insert_with(Default::default);
    let affinity = spec.affinity.get_or_insert_with(Affinity::default);
    let node_affinity = affinity.node_affinity.get_or_insert_with(NodeAffinity::default);
    let required = node_affinity
        .required_during_scheduling_ignored_during_execution
        .get_or_insert_with(|| NodeSelector {
            node_selector_terms: vec![],
        });
    if required.node_selector_terms.is_empty() {
        required.node_selector_terms.push(NodeSelectorTerm::default());
    }
    for term in &mut required.node_selector_terms {
        let fields = term.match_fields.get_or_insert_with(Vec::new);
        if !fields.contains(&requirement) {
            fields.push(requirement.clone());
        }
    }
}

/// The node a replacement is pinned to by [`pin_to_node`], if any.
pub fn pinned_to(pod: &Pod) -> Option<String> {
    pod.spec
        .as_ref()?
        .affinity
        .as_ref()?
        .node_affinity
        .as_ref()?
        .required_during_scheduling_ignored_during_execution
        .as_ref()?
        .node_selector_terms
        .iter()
        .flat_map(|t| t.match_fields.iter().flatten())
        .find(|f| f.key == "metadata.name" && f.operator == "In")
        .and_then(|f| f.values.as_ref()?.first().cloned())
}

/// Turn a pod into the replacement of `m`: bound by annotation, gated, pinned to the target
/// node when known, and running the checkpoint image of every container whose image is built.
/// Idempotent: applying it twice changes nothing more.
pub fn apply_restore(pod: &mut Pod, m: &PodMigration) {
    let name = m.metadata.name.as_deref().unwrap_or_default();
    set_annotation(pod, api::RESTORE_OF, name);
    if let Some(annotations) = pod.metadata.annotations.as_mut() {
        annotations.remove(api::RESTORE_OWNER);
    }
    add_gate(pod);
    if let Some(target) = m.target_node() {
        pin_to_node(pod, target);
    }
    set_images(pod, m);
}

/// Swap container images for the checkpoint images that are built (container images are
/// mutable on a live pod, so the controller can do this later too).
pub fn set_images(pod: &mut Pod, m: &PodMigration) {
    let Some(status) = m.status.as_ref() else {
        return;
    };
    if status.containers.iter().all(|c| c.image.is_none()) {
        return;
    }
    let originals = api::original_images(pod);
    set_annotation(
        pod,
        api::ORIGINAL_IMAGES,
        &serde_json::to_string(&originals).unwrap_or_default(),
    );
    let Some(spec) = pod.spec.as_mut() else {
        return;
    };
    for container in &mut spec.containers {
        if let Some(image) = status
            .containers
            .iter()
            .find(|c| c.name == container.name)
            .and_then(|c| c.image.as_ref())
        {
            container.image = Some(image.clone());
        }
    }
}

/// JSON patch that turns `before` into `after`, for the webhook answer.
pub fn patch(before: &Pod, after: &Pod) -> Result<json_patch::Patch, serde_json::Error> {
    Ok(json_patch::diff(
        &serde_json::to_value(before)?,
        &serde_json::to_value(after)?,
    ))
}

/// The pod as its owner meant it: without kube-migrate's annotations, gate, node pin and pull
/// credential, and with its containers' original images. What a later migration or backup
/// must recreate.
pub fn without_restore(pod: &Pod) -> Pod {
    let mut pod = pod.clone();
    let originals = api::original_images(&pod);
    let was_restored = api::restore_of(&pod).is_some();
    // The credential Secret goes with its migration: a pod recreated still naming it would
    // make the kubelet warn about a missing pull Secret on every start.
    let credential = api::restore_of(&pod).map(api::pull_secret_name);
    if let Some(a) = pod.metadata.annotations.as_mut() {
        for key in [api::RESTORE_OF, api::RESTORE_OWNER, api::ORIGINAL_IMAGES] {
            a.remove(key);
        }
    }
    remove_gate(&mut pod);
    if let Some(spec) = pod.spec.as_mut() {
        if spec.scheduling_gates.as_ref().is_some_and(Vec::is_empty) {
            spec.scheduling_gates = None;
        }
        for c in &mut spec.containers {
            if let Some(image) = originals.get(&c.name) {
                c.image = Some(image.clone());
            }
        }
        if let (Some(ours), Some(secrets)) = (&credential, spec.image_pull_secrets.as_mut()) {
            secrets.retain(|s| &s.name != ours);
            if secrets.is_empty() {
                spec.image_pull_secrets = None;
            }
        }
        // Our pin is the only `metadata.name` field requirement we add, and only to pods we
        // restored.
        if was_restored
            && let Some(na) = spec.affinity.as_mut().and_then(|a| a.node_affinity.as_mut())
            && let Some(req) = na.required_during_scheduling_ignored_during_execution.as_mut()
        {
            for term in &mut req.node_selector_terms {
                if let Some(fields) = term.match_fields.as_mut() {
                    fields.retain(|f| f.key != "metadata.name");
                    if fields.is_empty() {
                        term.match_fields = None;
                    }
                }
            }
            req.node_selector_terms
                .retain(|t| t.match_expressions.is_some() || t.match_fields.is_some());
            if req.node_selector_terms.is_empty() {
                na.required_during_scheduling_ignored_during_execution = None;
            }
        }
        if let Some(a) = spec.affinity.as_mut() {
            if a.node_affinity.as_ref().is_some_and(|n| {
                n.required_during_scheduling_ignored_during_execution.is_none()
                    && n.preferred_during_scheduling_ignored_during_execution.is_none()
            }) {
                a.node_affinity = None;
            }
            if a.node_affinity.is_none() && a.pod_affinity.is_none() && a.pod_anti_affinity.is_none() {
                spec.affinity = None;
            }
        }
    }
    pod
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pin_is_read_back() {
        let mut pod = Pod::default();
        assert_eq!(pinned_to(&pod), None);
        pin_to_node(&mut pod, "node-b");
        assert_eq!(pinned_to(&pod).as_deref(), Some("node-b"));
        pin_to_node(&mut pod, "node-b");
        assert_eq!(pinned_to(&pod).as_deref(), Some("node-b"), "idempotent");
    }
}
