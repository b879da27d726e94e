//! The replacement pod's mutation, shared by the pod-create webhook (which applies it to
//! pods the owner creates) and the controller (which applies it to bare pods it recreates and
//! to gated pods before releasing them): restore binding, scheduling gate, node pin,
//! checkpoint images, and the inverse that recovers the pod as its owner meant it.

use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, Container, EmptyDirVolumeSource, NodeAffinity, NodeSelector, NodeSelectorRequirement,
    NodeSelectorTerm, Pod, PodSchedulingGate, ResourceRequirements, SeccompProfile, SecurityContext, Volume,
    VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use crate::{
    agent::{api as agent_api, volumes as agent_volumes},
    api::{self, PodMigration},
};

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

/// The image of kube-migrate's restore init container: the agent's (one image to build, pin
/// and trust, and already on every node), read from the agent DaemonSet unless set.
#[derive(Clone, Default)]
pub struct HelperImage {
    pub fixed: Option<String>,
    pub daemonsets: Option<kube::runtime::reflector::Store<k8s_openapi::api::apps::v1::DaemonSet>>,
}

impl HelperImage {
    pub fn get(&self) -> Option<String> {
        self.fixed.clone().or_else(|| {
            self.daemonsets.as_ref()?.state().iter().find_map(|d| {
                d.spec
                    .as_ref()?
                    .template
                    .spec
                    .as_ref()?
                    .containers
                    .first()?
                    .image
                    .clone()
            })
        })
    }
}

/// The emptyDir volumes of a pod whose contents move with it (not kube-migrate's own).
pub fn empty_dirs(pod: &Pod) -> Vec<&Volume> {
    pod.spec
        .iter()
        .flat_map(|s| s.volumes.iter().flatten())
        .filter(|v| v.empty_dir.is_some() && v.name != agent_api::RESTORE_VOLUME)
        .collect()
}

/// Whether `pod` has kube-migrate's restore init container.
pub fn has_restore_helper(pod: &Pod) -> bool {
    pod.spec
        .iter()
        .flat_map(|s| s.init_containers.iter().flatten())
        .any(|c| c.name == agent_api::RESTORE_VOLUME)
}

/// Give a replacement with emptyDir volumes kube-migrate's restore init container (the agent
/// image, `await-restore`): it mounts every emptyDir and a marker volume and waits until the
/// target agent has put the source's files in place (see `agent::volumes`). Last of the init
/// containers, so the pod's own init containers cannot overwrite what it restores. Only at
/// creation: init containers cannot be added to a pod later. Restricted Pod Security: no
/// privileges, read-only root, unprivileged user. Idempotent.
pub fn add_restore_helper(pod: &mut Pod, image: &str) {
    let volumes: Vec<String> = empty_dirs(pod).iter().map(|v| v.name.clone()).collect();
    if volumes.is_empty() || has_restore_helper(pod) {
        return;
    }
    let mut mounts: Vec<VolumeMount> = volumes
        .iter()
        .map(|v| VolumeMount {
            name: v.clone(),
            mount_path: format!("{}/{v}", agent_volumes::HELPER_VOLUMES_DIR),
            ..Default::default()
        })
        .collect();
    mounts.push(VolumeMount {
        name: agent_api::RESTORE_VOLUME.into(),
        mount_path: agent_volumes::HELPER_MARKER_DIR.into(),
        ..Default::default()
    });
    let small = |cpu: &str, memory: &str| {
        [("cpu", cpu), ("memory", memory)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), Quantity(v.to_string())))
            .collect()
    };
    let helper = Container {
        name: agent_api::RESTORE_VOLUME.into(),
        image: Some(image.to_string()),
        args: Some(vec![
            "await-restore".into(),
            format!(
                "--marker={}/{}",
                agent_volumes::HELPER_MARKER_DIR,
                agent_api::RESTORED_MARKER
            ),
        ]),
        volume_mounts: Some(mounts),
        resources: Some(ResourceRequirements {
            requests: Some(small("10m", "16Mi")),
            limits: Some(small("100m", "32Mi")),
            ..Default::default()
        }),
        security_context: Some(SecurityContext {
            run_as_user: Some(65534),
            run_as_group: Some(65534),
            run_as_non_root: Some(true),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Default::default()
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let spec = pod.spec.get_or_insert_with(Default::default);
    spec.init_containers.get_or_insert_with(Vec::new).push(helper);
    spec.volumes.get_or_insert_with(Vec::new).push(Volume {
        name: agent_api::RESTORE_VOLUME.into(),
        empty_dir: Some(EmptyDirVolumeSource {
            medium: Some("Memory".into()),
            size_limit: Some(Quantity("1Mi".into())),
        }),
        ..Default::default()
    });
}

/// The runtime ID of the restore init container while it runs (what the target agent
/// reaches the pod's volumes through).
pub fn running_restore_helper(pod: &Pod) -> Option<String> {
    pod.status
        .as_ref()?
        .init_container_statuses
        .iter()
        .flatten()
        .find(|c| c.name == agent_api::RESTORE_VOLUME)
        .filter(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()))
        .and_then(|c| c.container_id.clone())
}

/// Whether the restore init container has finished (the volumes were filled).
pub fn restore_helper_done(pod: &Pod) -> bool {
    pod.status
        .iter()
        .flat_map(|s| s.init_container_statuses.iter().flatten())
        .any(|c| {
            c.name == agent_api::RESTORE_VOLUME
                && c.state
                    .as_ref()
                    .and_then(|s| s.terminated.as_ref())
                    .is_some_and(|t| t.exit_code == 0)
        })
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
        if let Some(inits) = spec.init_containers.as_mut() {
            inits.retain(|c| c.name != agent_api::RESTORE_VOLUME);
            if inits.is_empty() {
                spec.init_containers = None;
            }
        }
        if let Some(volumes) = spec.volumes.as_mut() {
            volumes.retain(|v| v.name != agent_api::RESTORE_VOLUME);
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
    fn the_restore_helper_waits_last_with_every_empty_dir_and_goes_with_without_restore() {
        let mut pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": { "name": "db-0" },
            "spec": {
                "initContainers": [{ "name": "init-config", "image": "busybox" }],
                "containers": [{ "name": "db", "image": "db:1" }],
                "volumes": [
                    { "name": "scratch", "emptyDir": {} },
                    { "name": "shm", "emptyDir": { "medium": "Memory" } },
                    { "name": "config", "configMap": { "name": "c" } }
                ]
            }
        }))
        .unwrap();
        let before = pod.clone();
        add_restore_helper(&mut pod, "kube-migrate-agent@sha256:abc");
        let spec = pod.spec.as_ref().unwrap();
        let inits = spec.init_containers.as_ref().unwrap();
        assert_eq!(inits.len(), 2);
        let helper = &inits[1];
        assert_eq!(
            helper.name,
            agent_api::RESTORE_VOLUME,
            "after the pod's own init containers"
        );
        assert_eq!(helper.image.as_deref(), Some("kube-migrate-agent@sha256:abc"));
        let mounts: Vec<(&str, &str)> = helper
            .volume_mounts
            .iter()
            .flatten()
            .map(|m| (m.name.as_str(), m.mount_path.as_str()))
            .collect();
        assert_eq!(
            mounts,
            [
                ("scratch", "/kube-migrate/volumes/scratch"),
                ("shm", "/kube-migrate/volumes/shm"),
                (agent_api::RESTORE_VOLUME, "/kube-migrate/restore")
            ]
        );
        assert_eq!(helper.security_context.as_ref().unwrap().run_as_non_root, Some(true));
        assert!(has_restore_helper(&pod));
        assert_eq!(empty_dirs(&pod).len(), 2, "the marker volume is not moved");
        let again = pod.clone();
        add_restore_helper(&mut pod, "other");
        assert_eq!(pod, again, "idempotent");
        assert_eq!(without_restore(&pod).spec, before.spec, "the owner's pod again");

        let mut plain: Pod = serde_json::from_value(serde_json::json!({
            "spec": { "containers": [{ "name": "db", "image": "db:1" }] }
        }))
        .unwrap();
        let untouched = plain.clone();
        add_restore_helper(&mut plain, "x");
        assert_eq!(plain, untouched, "no emptyDir, no helper");
    }

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
