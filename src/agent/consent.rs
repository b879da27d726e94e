//! Before a checkpoint, the agent reads the PodMigration and the pod from the API server and
//! checkpoints only what they describe: a migration in `Checkpointing` of an opted-in pod of
//! this very node. A stolen controller key alone (or a controller bug) cannot make an agent
//! copy the memory of a pod that never opted in or that nobody is migrating.

use k8s_openapi::api::core::v1::Pod;
use kube::{Api, ResourceExt};

use super::api::CheckpointRequest;
use crate::api::{self, Mode, Phase, PodMigration};

/// Reads what a checkpoint request claims from the API server (`get` on pods and
/// podmigrations: the agent's ClusterRole allows nothing more); or, for an agent without an
/// API server (`--standalone`: benches), refuses every checkpoint.
#[derive(Clone)]
pub enum Consent {
    Api(kube::Client),
    RefuseAll,
}

impl Consent {
    pub fn new(client: kube::Client) -> Self {
        Self::Api(client)
    }

    /// `Ok` when the checkpoint may go ahead; otherwise why not, or that the API server could
    /// not be asked (the caller may retry that).
    pub async fn check(&self, id: &str, node: &str, req: &CheckpointRequest) -> Result<(), Refusal> {
        let client = match self {
            Consent::Api(client) => client,
            Consent::RefuseAll => {
                return Err(Refusal::Denied(
                    "a standalone agent has no API server to check a checkpoint against".into(),
                ));
            }
        };
        if req.migration.is_empty() {
            return Err(Refusal::Denied("the request names no PodMigration".into()));
        }
        let pms: Api<PodMigration> = Api::namespaced(client.clone(), &req.namespace);
        let pods: Api<Pod> = Api::namespaced(client.clone(), &req.namespace);
        let pm = pms.get_opt(&req.migration).await.map_err(Refusal::Unavailable)?;
        let pod = pods.get_opt(&req.pod).await.map_err(Refusal::Unavailable)?;
        may_checkpoint(id, node, req, pm.as_ref(), pod.as_ref()).map_err(Refusal::Denied)
    }
}

#[derive(Debug)]
pub enum Refusal {
    /// What the API server says does not allow this checkpoint.
    Denied(String),
    Unavailable(kube::Error),
}

/// Does what the API server holds allow node `node`'s agent to checkpoint `req` for migration
/// `id`? Pure: the decision, given the PodMigration and the pod as read.
pub fn may_checkpoint(
    id: &str,
    node: &str,
    req: &CheckpointRequest,
    pm: Option<&PodMigration>,
    pod: Option<&Pod>,
) -> Result<(), String> {
    let (ns, name) = (&req.namespace, &req.migration);
    let Some(pm) = pm else {
        return Err(format!("PodMigration {ns}/{name} does not exist"));
    };
    if pm.uid().as_deref() != Some(id) {
        return Err(format!("PodMigration {ns}/{name} is not migration {id}"));
    }
    if pm.metadata.deletion_timestamp.is_some() {
        return Err(format!("PodMigration {ns}/{name} is being deleted"));
    }
    if pm.spec.mode == Mode::Restore {
        return Err(format!("PodMigration {ns}/{name} restores; it checkpoints nothing"));
    }
    let phase = pm.status.as_ref().map(|s| s.phase).unwrap_or_default();
    if phase != Phase::Checkpointing {
        return Err(format!("PodMigration {ns}/{name} is {phase:?}, not Checkpointing"));
    }
    if pm.spec.pod_name != req.pod || pm.spec.source_node != node {
        return Err(format!(
            "PodMigration {ns}/{name} moves pod {} of node {}, not {} of node {node}",
            pm.spec.pod_name, pm.spec.source_node, req.pod
        ));
    }
    let Some(pod) = pod else {
        return Err(format!("pod {ns}/{} does not exist", req.pod));
    };
    if pod.uid().as_deref() != Some(pm.spec.pod_uid.as_str()) {
        return Err(format!(
            "pod {ns}/{} is not the pod PodMigration {name} moves (UID {})",
            req.pod, pm.spec.pod_uid
        ));
    }
    if pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) != Some(node) {
        return Err(format!("pod {ns}/{} does not run on node {node}", req.pod));
    }
    if !api::is_stateful(pod) {
        return Err(format!(
            "pod {ns}/{} has not opted in ({}=true)",
            req.pod,
            api::STATEFUL
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{PodMigrationSpec, PodMigrationStatus, Trigger};

    const ID: &str = "1c0ffee0-0000-4000-8000-000000000001";

    fn pm() -> PodMigration {
        let mut pm = PodMigration::new(
            "db-0-abcde",
            PodMigrationSpec {
                pod_name: "db-0".into(),
                pod_uid: "pod-uid-1".into(),
                source_node: "node-a".into(),
                target_node: None,
                trigger: Trigger::Manual,
                policy: Default::default(),
                mode: Mode::Migrate,
                restore_from: None,
            },
        );
        pm.metadata.namespace = Some("shop".into());
        pm.metadata.uid = Some(ID.into());
        pm.status = Some(PodMigrationStatus {
            phase: Phase::Checkpointing,
            ..Default::default()
        });
        pm
    }

    fn pod(stateful: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "db-0", "namespace": "shop", "uid": "pod-uid-1",
                         "annotations": {api::STATEFUL: stateful}},
            "spec": {"nodeName": "node-a", "containers": [{"name": "db"}]}
        }))
        .unwrap()
    }

    fn req() -> CheckpointRequest {
        CheckpointRequest {
            migration: "db-0-abcde".into(),
            namespace: "shop".into(),
            pod: "db-0".into(),
            containers: vec!["db".into()],
            timeout_seconds: 60,
            freeze: None,
            empty_dirs: vec![],
        }
    }

    #[test]
    fn a_checkpointing_migration_of_an_opted_in_pod_of_this_node() {
        assert_eq!(
            may_checkpoint(ID, "node-a", &req(), Some(&pm()), Some(&pod("true"))),
            Ok(())
        );
    }

    #[test]
    fn anything_else_is_refused_with_its_reason() {
        let (p, opted) = (pm(), pod("true"));
        let refused =
            |id: &str, node: &str, r: &CheckpointRequest, pm: Option<&PodMigration>, pod: Option<&Pod>, why: &str| {
                let got = may_checkpoint(id, node, r, pm, pod).unwrap_err();
                assert!(got.contains(why), "{got:?} should say {why:?}");
            };
        refused(ID, "node-a", &req(), None, Some(&opted), "does not exist");
        refused(
            "another-id",
            "node-a",
            &req(),
            Some(&p),
            Some(&opted),
            "is not migration",
        );
        refused(
            ID,
            "node-b",
            &req(),
            Some(&p),
            Some(&opted),
            "of node node-a, not db-0 of node node-b",
        );
        let mut other_pod = req();
        other_pod.pod = "web-0".into();
        refused(ID, "node-a", &other_pod, Some(&p), Some(&opted), "moves pod db-0");
        let mut done = pm();
        done.status.as_mut().unwrap().phase = Phase::Succeeded;
        refused(ID, "node-a", &req(), Some(&done), Some(&opted), "not Checkpointing");
        let mut pending = pm();
        pending.status = None;
        refused(ID, "node-a", &req(), Some(&pending), Some(&opted), "Pending");
        let mut restore = pm();
        restore.spec.mode = Mode::Restore;
        refused(ID, "node-a", &req(), Some(&restore), Some(&opted), "restores");
        let mut deleting = pm();
        deleting.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::now(),
        ));
        refused(ID, "node-a", &req(), Some(&deleting), Some(&opted), "being deleted");
        refused(ID, "node-a", &req(), Some(&p), None, "pod shop/db-0 does not exist");
        refused(ID, "node-a", &req(), Some(&p), Some(&pod("false")), "has not opted in");
        let mut reused_name = pod("true");
        reused_name.metadata.uid = Some("pod-uid-2".into());
        refused(ID, "node-a", &req(), Some(&p), Some(&reused_name), "is not the pod");
        let mut moved = pod("true");
        moved.spec.as_mut().unwrap().node_name = Some("node-b".into());
        refused(
            ID,
            "node-a",
            &req(),
            Some(&p),
            Some(&moved),
            "does not run on node node-a",
        );
        let mut unnamed = req();
        unnamed.migration = "other".into();
        refused(ID, "node-a", &unnamed, None, Some(&opted), "shop/other does not exist");
    }
}
