//! Preflight: what cannot move with a pod, decided before anything happens. Shared by the
//! eviction webhook (pod-local checks, answered at once), the controller (which also sees the
//! PersistentVolumes) and `kubectl migrate`.

use k8s_openapi::api::core::v1::{PersistentVolume, Pod};

/// Annotation the kubelet puts on the API mirror of a static pod.
pub const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// A reason a pod cannot be migrated. `reason()` is the PodMigration's `status.reason`, the
/// Event reason and the metric label.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "{0} is a static (mirror) pod: the kubelet runs it from a manifest file on its node and no other node can take it over"
    )]
    StaticPod(String),
    #[error(
        "volume {volume} is a hostPath ({path}): its data stays on the source node, so a restored copy would not find it"
    )]
    HostPath { volume: String, path: String },
    #[error("volume {volume} is bound to {pv}, a node-local PersistentVolume ({kind}): its data cannot follow the pod")]
    LocalVolume {
        volume: String,
        pv: String,
        kind: &'static str,
    },
    #[error("container {0} keeps stdin or a TTY open; CRIU cannot restore a terminal attached from outside the pod")]
    Interactive(String),
}

impl Refusal {
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::StaticPod(_) => "StaticPod",
            Refusal::HostPath { .. } => "HostPathVolume",
            Refusal::LocalVolume { .. } => "LocalVolume",
            Refusal::Interactive(_) => "InteractiveContainer",
        }
    }
}

pub fn is_mirror(pod: &Pod) -> bool {
    pod.metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(MIRROR_ANNOTATION))
}

/// Every check that needs nothing but the pod (the webhook's part).
pub fn check_pod(pod: &Pod) -> Result<(), Refusal> {
    let name = pod.metadata.name.clone().unwrap_or_default();
    if is_mirror(pod) {
        return Err(Refusal::StaticPod(name));
    }
    let Some(spec) = pod.spec.as_ref() else {
        return Ok(());
    };
    for v in spec.volumes.iter().flatten() {
        if let Some(h) = &v.host_path {
            return Err(Refusal::HostPath {
                volume: v.name.clone(),
                path: h.path.clone(),
            });
        }
    }
    for c in spec.containers.iter() {
        if c.stdin == Some(true) || c.tty == Some(true) {
            return Err(Refusal::Interactive(c.name.clone()));
        }
    }
    Ok(())
}

/// The whole preflight: the pod's own checks, then the PersistentVolumes bound to its
/// claims (`pvs`), refused when they live on one node.
pub fn check(pod: &Pod, pvs: &[PersistentVolume]) -> Result<(), Refusal> {
    check_pod(pod)?;
    let claims = pod
        .spec
        .iter()
        .flat_map(|s| s.volumes.iter().flatten())
        .filter_map(|v| {
            v.persistent_volume_claim
                .as_ref()
                .map(|c| (v.name.clone(), c.claim_name.clone()))
        });
    for (volume, claim) in claims {
        for pv in pvs {
            let Some(spec) = pv.spec.as_ref() else { continue };
            let bound_here = spec.claim_ref.as_ref().and_then(|c| c.name.as_deref()) == Some(claim.as_str());
            if !bound_here {
                continue;
            }
            let kind = if spec.local.is_some() {
                Some("local")
            } else if spec.host_path.is_some() {
                Some("hostPath")
            } else if pinned_to_hostname(pv) {
                Some("node affinity to one host")
            } else {
                None
            };
            if let Some(kind) = kind {
                return Err(Refusal::LocalVolume {
                    volume,
                    pv: pv.metadata.name.clone().unwrap_or_default(),
                    kind,
                });
            }
        }
    }
    Ok(())
}

/// A PV whose required node affinity names hosts (`kubernetes.io/hostname`): its data is on
/// those nodes only.
fn pinned_to_hostname(pv: &PersistentVolume) -> bool {
    pv.spec
        .as_ref()
        .and_then(|s| s.node_affinity.as_ref())
        .and_then(|a| a.required.as_ref())
        .is_some_and(|r| {
            r.node_selector_terms.iter().any(|t| {
                t.match_expressions
                    .iter()
                    .flatten()
                    .any(|e| e.key == "kubernetes.io/hostname" && e.operator == "In")
            })
        })
}

/// An emptyDir whose contents move, and the container (name) through whose mount it is read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EmptyDirMount {
    pub volume: String,
    pub container: String,
    pub mount_path: String,
}

/// Where each emptyDir of `pod` can be read whole: the first container that mounts it
/// without a subPath. The others (only subPath mounts, or no container mounts it: only init
/// containers use it, and they run again on the replacement) are in [`warnings`].
pub fn empty_dir_mounts(pod: &Pod) -> Vec<EmptyDirMount> {
    let Some(spec) = pod.spec.as_ref() else {
        return Vec::new();
    };
    crate::replacement::empty_dirs(pod)
        .into_iter()
        .filter_map(|v| {
            spec.containers.iter().find_map(|c| {
                c.volume_mounts
                    .iter()
                    .flatten()
                    .find(|m| m.name == v.name && m.sub_path.is_none() && m.sub_path_expr.is_none())
                    .map(|m| EmptyDirMount {
                        volume: v.name.clone(),
                        container: c.name.clone(),
                        mount_path: m.mount_path.clone(),
                    })
            })
        })
        .collect()
}

/// What moves only partly, said in every answer about the pod: the operator must hear it.
pub fn warnings(pod: &Pod) -> Vec<String> {
    let movable: Vec<String> = empty_dir_mounts(pod).into_iter().map(|m| m.volume).collect();
    let mut out = Vec::new();
    for v in crate::replacement::empty_dirs(pod) {
        if movable.contains(&v.name) {
            continue;
        }
        let whole_elsewhere = pod
            .spec
            .iter()
            .flat_map(|s| &s.containers)
            .any(|c| c.volume_mounts.iter().flatten().any(|m| m.name == v.name));
        let why = if whole_elsewhere {
            "is mounted only with subPath"
        } else {
            "is mounted by no container (only init containers, which run again on the replacement)"
        };
        out.push(format!(
            "emptyDir volume {} {why}: its contents are not moved, the replacement starts with it empty",
            v.name
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(spec: serde_json::Value, annotations: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": { "name": "db-0", "annotations": annotations },
            "spec": spec,
        }))
        .unwrap()
    }

    fn plain() -> serde_json::Value {
        json!({ "containers": [{ "name": "db", "image": "db:1" }] })
    }

    #[test]
    fn a_plain_pod_passes() {
        assert_eq!(check(&pod(plain(), json!({})), &[]), Ok(()));
    }

    #[test]
    fn static_pods_are_refused() {
        let p = pod(plain(), json!({ MIRROR_ANNOTATION: "abc" }));
        let err = check_pod(&p).unwrap_err();
        assert_eq!(err.reason(), "StaticPod");
        assert!(err.to_string().contains("db-0 is a static"), "{err}");
    }

    #[test]
    fn host_path_volumes_are_refused_with_their_path() {
        let p = pod(
            json!({ "containers": [{ "name": "db", "image": "db:1" }],
                    "volumes": [{ "name": "data", "hostPath": { "path": "/srv/db" } }] }),
            json!({}),
        );
        let err = check_pod(&p).unwrap_err();
        assert_eq!(err.reason(), "HostPathVolume");
        assert!(err.to_string().contains("/srv/db"), "{err}");
    }

    #[test]
    fn interactive_containers_are_refused() {
        let p = pod(
            json!({ "containers": [{ "name": "sh", "image": "x", "stdin": true }] }),
            json!({}),
        );
        assert_eq!(check_pod(&p).unwrap_err(), Refusal::Interactive("sh".into()));
        let p = pod(
            json!({ "containers": [{ "name": "sh", "image": "x", "tty": true }] }),
            json!({}),
        );
        assert_eq!(check_pod(&p).unwrap_err().reason(), "InteractiveContainer");
    }

    #[test]
    fn node_local_persistent_volumes_are_refused_others_pass() {
        let p = pod(
            json!({ "containers": [{ "name": "db", "image": "db:1" }],
                    "volumes": [{ "name": "data", "persistentVolumeClaim": { "claimName": "data-db-0" } }] }),
            json!({}),
        );
        let pv = |spec: serde_json::Value| -> PersistentVolume {
            let mut spec = spec;
            spec["claimRef"] = json!({ "name": "data-db-0", "namespace": "shop" });
            serde_json::from_value(json!({ "metadata": { "name": "pv-1" }, "spec": spec })).unwrap()
        };
        let local = pv(json!({ "local": { "path": "/mnt/disk1" } }));
        assert_eq!(check(&p, &[local]).unwrap_err().reason(), "LocalVolume");
        let pinned = pv(
            json!({ "csi": { "driver": "x", "volumeHandle": "h" }, "nodeAffinity": { "required": {
            "nodeSelectorTerms": [{ "matchExpressions": [{ "key": "kubernetes.io/hostname", "operator": "In", "values": ["node-a"] }] }] } } }),
        );
        let err = check(&p, &[pinned]).unwrap_err();
        assert!(err.to_string().contains("node affinity to one host"), "{err}");
        let zonal = pv(
            json!({ "csi": { "driver": "x", "volumeHandle": "h" }, "nodeAffinity": { "required": {
            "nodeSelectorTerms": [{ "matchExpressions": [{ "key": "topology.kubernetes.io/zone", "operator": "In", "values": ["z1"] }] }] } } }),
        );
        assert_eq!(check(&p, &[zonal]), Ok(()));
        // A PV bound to another claim says nothing about this pod.
        let mut other = pv(json!({ "local": { "path": "/mnt/disk1" } }));
        other.spec.as_mut().unwrap().claim_ref.as_mut().unwrap().name = Some("other".into());
        assert_eq!(check(&p, &[other]), Ok(()));
    }

    #[test]
    fn empty_dirs_move_when_a_container_mounts_them_whole() {
        let p = pod(
            json!({ "containers": [
                        { "name": "db", "image": "db:1", "volumeMounts": [
                            { "name": "scratch", "mountPath": "/scratch" },
                            { "name": "parts", "mountPath": "/part", "subPath": "a" }] },
                        { "name": "side", "image": "s:1", "volumeMounts": [{ "name": "shm", "mountPath": "/dev/shm" }] }],
                    "volumes": [{ "name": "scratch", "emptyDir": {} }, { "name": "shm", "emptyDir": { "medium": "Memory" } },
                                { "name": "parts", "emptyDir": {} }, { "name": "init-only", "emptyDir": {} }] }),
            json!({}),
        );
        let mounts = empty_dir_mounts(&p);
        let found: Vec<(&str, &str, &str)> = mounts
            .iter()
            .map(|m| (m.volume.as_str(), m.container.as_str(), m.mount_path.as_str()))
            .collect();
        assert_eq!(found, [("scratch", "db", "/scratch"), ("shm", "side", "/dev/shm")]);
        let w = warnings(&p);
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].contains("parts is mounted only with subPath"), "{w:?}");
        assert!(w[1].contains("init-only is mounted by no container"), "{w:?}");
    }
}
