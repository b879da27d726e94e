//! Annotations, labels and fixed names shared by the webhook, the controller, the agent and
//! the kubectl plugin.

use k8s_openapi::api::core::v1::Pod;

/// API group of the `PodMigration` resource.
pub const GROUP: &str = "migrate.io";

/// Opt-in: `migrate.io/stateful: "true"` on a pod makes its evictions migrations.
pub const STATEFUL: &str = "migrate.io/stateful";
/// What happens to an eviction when the migration fails before the source stopped:
/// `evict` (default: the eviction goes through, as without kube-migrate) or `block`.
pub const ON_FAILURE: &str = "migrate.io/on-failure";
/// Names the node the pod must be migrated to.
pub const TARGET_NODE: &str = "migrate.io/target-node";
/// Set by the mutating webhook (or the controller) on a replacement pod: the PodMigration it
/// restores.
pub const RESTORE_OF: &str = "migrate.io/restore-of";
/// Set on a replacement pod that was gated but whose PodMigration the controller still has to
/// choose (several migrations of one ReplicaSet in flight at once).
pub const RESTORE_OWNER: &str = "migrate.io/restore-owner";
/// Set when a replacement pod's images are swapped for checkpoint images: the original
/// image of each container (JSON object), so a later migration or backup of the restored
/// pod knows what its containers really run.
pub const ORIGINAL_IMAGES: &str = "migrate.io/original-images";
/// Scheduling gate that keeps a replacement pod unscheduled until its checkpoint image is ready.
pub const RESTORE_GATE: &str = "migrate.io/restore";
/// Label on every PodMigration: the UID of the pod it migrates (idempotency key).
pub const POD_UID_LABEL: &str = "migrate.io/pod-uid";
/// Label on every PodMigration: the node it drains.
pub const SOURCE_NODE_LABEL: &str = "migrate.io/source-node";
/// Label kube-migrate puts on every namespace that holds an opted-in pod; the eviction
/// webhook selects only those namespaces.
pub const NAMESPACE_LABEL: &str = "migrate.io/opted-in";
/// Field manager for server-side apply and the `fieldManager` of every write.
pub const FIELD_MANAGER: &str = "kube-migrate";
/// Finalizer that lets the controller clean archives before a PodMigration goes away.
pub const FINALIZER: &str = "migrate.io/cleanup";
/// Finalizer on a source pod from just before it is stopped until its checkpoint is verified
/// on the target node: `kubectl drain` waits for the pod object to go, so the drain cannot
/// complete while the only copy of the state is on the drained node.
pub const SOURCE_HOLD: &str = "migrate.io/state-hold";
/// Annotation the controller puts on its own Eviction of a source pod, naming the migration.
pub const STOP_SOURCE_OF: &str = "migrate.io/stop-source-of";

/// CRI-O reads this manifest annotation to know an image is a checkpoint (value: container name).
pub const CRIO_CHECKPOINT_NAME: &str = "io.kubernetes.cri-o.annotations.checkpoint.name";
/// containerd (2.1+) reads this one.
pub const CRIU_CHECKPOINT_NAME: &str = "org.criu.checkpoint.container.name";
/// Base (rootfs) image recorded in the checkpoint, CRI-O spelling.
pub const CRIO_CHECKPOINT_ROOTFS_IMAGE: &str = "io.kubernetes.cri-o.annotations.checkpoint.rootfsImageName";
/// Base (rootfs) image recorded in the checkpoint, CRIU/containerd spelling.
pub const CRIU_CHECKPOINT_ROOTFS_IMAGE: &str = "org.criu.checkpoint.rootfsImageName";

/// What a user asked for when a migration fails before the source stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailurePolicyAnnotation {
    Evict,
    Block,
}

fn annotation<'a>(pod: &'a Pod, key: &str) -> Option<&'a str> {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

/// What a pod's `migrate.io/stateful` annotation says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stateful {
    /// Absent, or `false`/`no`/`off`/`0`/empty: evictions are plain evictions.
    No,
    /// `true`/`yes`/`on`/`1` (any case, surrounding blanks ignored): opted in.
    Yes,
    /// Any other value: taken as opted in, because losing state on a typo is worse than
    /// migrating a pod that did not need it; every answer about the pod says so.
    Unrecognized(String),
}

pub fn stateful(pod: &Pod) -> Stateful {
    let Some(value) = annotation(pod, STATEFUL) else {
        return Stateful::No;
    };
    match value.trim().to_ascii_lowercase().as_str() {
        "true" | "yes" | "on" | "1" => Stateful::Yes,
        "false" | "no" | "off" | "0" | "" => Stateful::No,
        _ => Stateful::Unrecognized(value.to_string()),
    }
}

/// `true` when the pod opted in (see [`Stateful`]: unrecognized values count as opted in).
pub fn is_stateful(pod: &Pod) -> bool {
    stateful(pod) != Stateful::No
}

/// The warning every answer about a pod with an unrecognized opt-in value carries.
pub fn stateful_warning(pod: &Pod) -> Option<String> {
    match stateful(pod) {
        Stateful::Unrecognized(v) => Some(format!(
            "kube-migrate: {STATEFUL}={v:?} is not a recognized value (true/yes/on/1 or false/no/off/0); \
             treated as opted in so that no state is lost"
        )),
        _ => None,
    }
}

/// The pod's `migrate.io/on-failure` policy. Unknown values fall back to the safe default of
/// the annotation's documentation (`evict`) and are reported by the caller.
pub fn on_failure(pod: &Pod) -> Result<FailurePolicyAnnotation, String> {
    match annotation(pod, ON_FAILURE).map(str::trim) {
        None | Some("") => Ok(FailurePolicyAnnotation::Evict),
        Some(v) if v.eq_ignore_ascii_case("evict") => Ok(FailurePolicyAnnotation::Evict),
        Some(v) if v.eq_ignore_ascii_case("block") => Ok(FailurePolicyAnnotation::Block),
        Some(other) => Err(format!(
            "invalid {ON_FAILURE} value {other:?} (expected \"evict\" or \"block\")"
        )),
    }
}

/// The node named by `migrate.io/target-node`, if any.
pub fn requested_target(pod: &Pod) -> Option<&str> {
    annotation(pod, TARGET_NODE).map(str::trim).filter(|s| !s.is_empty())
}

/// The PodMigration a replacement pod was bound to, if any.
pub fn restore_of(pod: &Pod) -> Option<&str> {
    annotation(pod, RESTORE_OF)
}

/// The original image of every container of a (possibly restored) pod.
pub fn original_images(pod: &Pod) -> std::collections::BTreeMap<String, String> {
    let recorded: std::collections::BTreeMap<String, String> = annotation(pod, ORIGINAL_IMAGES)
        .and_then(|v| serde_json::from_str(v).ok())
        .unwrap_or_default();
    pod.spec
        .iter()
        .flat_map(|s| s.containers.iter())
        .map(|c| {
            let image = recorded
                .get(&c.name)
                .cloned()
                .or_else(|| c.image.clone())
                .unwrap_or_default();
            (c.name.clone(), image)
        })
        .collect()
}

/// Deterministic PodMigration name for a pod: `<pod name>-<first 8 hex of uid>`, cut to fit
/// the 253-character limit. Determinism makes the webhook's create idempotent across retries
/// and replicas: a second create gets AlreadyExists.
pub fn migration_name(pod_name: &str, pod_uid: &str) -> String {
    let short: String = pod_uid
        .chars()
        .filter(|c| c.is_ascii_hexdigit())
        .take(8)
        .collect::<String>()
        .to_ascii_lowercase();
    let max_prefix = 253 - 1 - short.len();
    let prefix: String = pod_name.chars().take(max_prefix).collect();
    format!("{}-{}", prefix.trim_end_matches(['-', '.']), short)
}

/// The Secret holding the pull credential of migration `migration` (see
/// `controller::pull`), listed in its replacement's `imagePullSecrets`.
pub fn pull_secret_name(migration: &str) -> String {
    format!("{migration}-pull")
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::api::ObjectMeta;

    fn pod_with(annotations: &[(&str, &str)]) -> Pod {
        Pod {
            metadata: ObjectMeta {
                annotations: Some(
                    annotations
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn stateful_annotation_spellings() {
        for yes in ["true", " TRUE ", "yes", "Yes", "on", "1"] {
            assert_eq!(stateful(&pod_with(&[(STATEFUL, yes)])), Stateful::Yes, "{yes:?}");
        }
        for no in ["false", "No", "off", "0", ""] {
            assert_eq!(stateful(&pod_with(&[(STATEFUL, no)])), Stateful::No, "{no:?}");
            assert!(stateful_warning(&pod_with(&[(STATEFUL, no)])).is_none());
        }
        assert_eq!(stateful(&Pod::default()), Stateful::No);
        let odd = pod_with(&[(STATEFUL, "maybe")]);
        assert_eq!(stateful(&odd), Stateful::Unrecognized("maybe".into()));
        assert!(is_stateful(&odd), "an unknown value must not lose state");
        assert!(stateful_warning(&odd).unwrap().contains("\"maybe\""));
    }

    #[test]
    fn on_failure_defaults_to_evict_and_rejects_garbage() {
        assert_eq!(on_failure(&Pod::default()), Ok(FailurePolicyAnnotation::Evict));
        assert_eq!(
            on_failure(&pod_with(&[(ON_FAILURE, "Block")])),
            Ok(FailurePolicyAnnotation::Block)
        );
        let err = on_failure(&pod_with(&[(ON_FAILURE, "keep")])).unwrap_err();
        assert!(err.contains("\"keep\""), "{err}");
    }

    #[test]
    fn migration_name_is_deterministic_and_bounded() {
        let uid = "0c9a8d74-9cb7-44dd-b98e-09fd62def2f4";
        assert_eq!(migration_name("web-0", uid), "web-0-0c9a8d74");
        assert_eq!(migration_name("web-0", uid), migration_name("web-0", uid));
        let long = "a".repeat(300);
        let name = migration_name(&long, uid);
        assert!(name.len() <= 253, "{}", name.len());
        assert!(name.ends_with("-0c9a8d74"));
    }
}
