//! The Node object of this kubelet: registration, Lease renewal and the Ready heartbeat.
//!
//! `spec` is never written after creation: `spec.unschedulable` and taints belong to
//! `kubectl cordon`/`drain` and the node lifecycle controller.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use k8s_openapi::{
    api::{
        coordination::v1::{Lease, LeaseSpec},
        core::v1::Node,
    },
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference},
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::checkpoint::rfc3339;

/// Namespace of the node Leases.
pub const LEASE_NAMESPACE: &str = "kube-node-lease";
/// The kubelet's default lease duration.
pub const LEASE_DURATION_SECONDS: i32 = 40;
/// Field manager of every write.
pub const FIELD_MANAGER: &str = "test-kubelet";

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("invalid label {0:?}: expected key=value")]
    Label(String),
    #[error("{what} node {node}: {source}")]
    Api {
        what: &'static str,
        node: String,
        source: kube::Error,
    },
    #[error("encoding: {0}")]
    Json(#[from] serde_json::Error),
}

/// `key=value` (for clap).
pub fn parse_label(s: &str) -> Result<(String, String), NodeError> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.trim().to_string())),
        _ => Err(NodeError::Label(s.to_string())),
    }
}

/// What the Node says about itself.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub name: String,
    /// The kubelet's HTTPS port (`daemonEndpoints.kubeletEndpoint.Port`).
    pub port: u16,
    /// Value of the `Hostname` address.
    pub hostname_address: String,
    pub cpu: String,
    pub memory: String,
    pub pods: String,
    pub kubelet_version: String,
    pub extra_labels: BTreeMap<String, String>,
    pub lease_interval: Duration,
    pub status_interval: Duration,
}

impl NodeConfig {
    pub fn labels(&self) -> BTreeMap<String, String> {
        let mut labels = BTreeMap::from([
            ("kubernetes.io/hostname".to_string(), self.name.clone()),
            ("kubernetes.io/os".to_string(), "linux".to_string()),
            ("kubernetes.io/arch".to_string(), "amd64".to_string()),
            ("beta.kubernetes.io/os".to_string(), "linux".to_string()),
            ("beta.kubernetes.io/arch".to_string(), "amd64".to_string()),
        ]);
        labels.extend(self.extra_labels.clone());
        labels
    }
}

fn hex_id(seed: &str) -> String {
    hex::encode(&Sha256::digest(seed.as_bytes())[..16])
}

/// The whole status a kubelet with `config` reports, Ready since `ready_since`, with
/// heartbeats at `now`.
pub fn node_status(config: &NodeConfig, ready_since: Timestamp, boot_id: &str, now: Timestamp) -> serde_json::Value {
    let c = config;
    let resources = json!({
        "cpu": c.cpu,
        "memory": c.memory,
        "pods": c.pods,
        "ephemeral-storage": "100Gi",
    });
    let (now, since) = (rfc3339(now), rfc3339(ready_since));
    let condition = |kind: &str, status: &str, reason: &str, message: &str| {
        json!({
            "type": kind,
            "status": status,
            "reason": reason,
            "message": message,
            "lastHeartbeatTime": now,
            "lastTransitionTime": since,
        })
    };
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    json!({
        "capacity": resources,
        "allocatable": resources,
        "addresses": [
            {"type": "InternalIP", "address": "127.0.0.1"},
            {"type": "Hostname", "address": c.hostname_address},
        ],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": c.port}},
        "nodeInfo": {
            "machineID": hex_id(&format!("machine/{}", c.name)),
            "systemUUID": hex_id(&format!("system/{}", c.name)),
            "bootID": boot_id,
            "kernelVersion": kernel,
            "osImage": "test-kubelet (simulated containers)",
            "containerRuntimeVersion": concat!("test-kubelet://", env!("CARGO_PKG_VERSION")),
            "kubeletVersion": c.kubelet_version,
            "kubeProxyVersion": "",
            "operatingSystem": "linux",
            "architecture": "amd64",
        },
        "conditions": [
            condition("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
            condition("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
            condition("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
            condition("Ready", "True", "KubeletReady", "kubelet is posting ready status"),
        ],
    })
}

/// Keeps one Node registered and alive.
pub struct NodeKeeper {
    client: Client,
    config: NodeConfig,
    ready_since: Timestamp,
    boot_id: String,
}

impl NodeKeeper {
    pub fn new(client: Client, config: NodeConfig) -> Self {
        let ready_since = Timestamp::now();
        let boot_id = hex_id(&format!("{}/{}", config.name, ready_since.as_nanosecond()));
        Self {
            client,
            config,
            ready_since,
            boot_id,
        }
    }

    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    fn api_error(&self, what: &'static str) -> impl FnOnce(kube::Error) -> NodeError + '_ {
        move |source| NodeError::Api {
            what,
            node: self.config.name.clone(),
            source,
        }
    }

    /// The whole status this kubelet reports, with heartbeats at `now`.
    pub fn status(&self, now: Timestamp) -> serde_json::Value {
        node_status(&self.config, self.ready_since, &self.boot_id, now)
    }

    /// Create the Node, or add our labels to the existing one; then report the status.
    pub async fn register(&self) -> Result<(), NodeError> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        let name = &self.config.name;
        let existing = nodes.get_opt(name).await.map_err(self.api_error("reading"))?;
        match existing {
            None => {
                let node = Node {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        labels: Some(self.config.labels()),
                        ..Default::default()
                    },
                    status: Some(serde_json::from_value(self.status(Timestamp::now()))?),
                    ..Default::default()
                };
                match nodes.create(&PostParams::default(), &node).await {
                    Ok(_) => tracing::info!(node = %name, "registered node"),
                    // Raced with another instance of ourselves: update below.
                    Err(kube::Error::Api(s)) if s.code == 409 => {}
                    Err(e) => return Err(self.api_error("creating")(e)),
                }
            }
            Some(_) => {
                let patch = json!({"metadata": {"labels": self.config.labels()}});
                nodes
                    .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .map_err(self.api_error("labelling"))?;
                tracing::info!(node = %name, "node already registered; updated its labels");
            }
        }
        self.heartbeat().await
    }

    /// Report the status (Ready, with a fresh heartbeat). Re-registers a deleted Node.
    pub async fn heartbeat(&self) -> Result<(), NodeError> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        let patch = json!({"status": self.status(Timestamp::now())});
        match nodes
            .patch_status(&self.config.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Box::pin(self.register()).await,
            Err(e) => Err(self.api_error("updating the status of")(e)),
        }
    }

    /// Renew (or create) the node's Lease.
    pub async fn renew_lease(&self) -> Result<(), NodeError> {
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), LEASE_NAMESPACE);
        let name = &self.config.name;
        let now = MicroTime(Timestamp::now());
        let patch = json!({"spec": {
            "holderIdentity": name,
            "leaseDurationSeconds": LEASE_DURATION_SECONDS,
            "renewTime": now,
        }});
        match leases.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(self.api_error("renewing the lease of")(e)),
        }
        let node = Api::<Node>::all(self.client.clone())
            .get(name)
            .await
            .map_err(self.api_error("reading"))?;
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(LEASE_NAMESPACE.into()),
                owner_references: node.metadata.uid.map(|uid| {
                    vec![OwnerReference {
                        api_version: "v1".into(),
                        kind: "Node".into(),
                        name: name.clone(),
                        uid,
                        ..Default::default()
                    }]
                }),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(name.clone()),
                lease_duration_seconds: Some(LEASE_DURATION_SECONDS),
                renew_time: Some(now),
                ..Default::default()
            }),
        };
        match leases.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
            Err(e) => Err(self.api_error("creating the lease of")(e)),
        }
    }

    /// Renew the Lease and report the status on their intervals until `shutdown`.
    pub async fn keep_alive(self: Arc<Self>, shutdown: CancellationToken) {
        let mut lease = tokio::time::interval(self.config.lease_interval);
        let mut status = tokio::time::interval(self.config.status_interval);
        for tick in [&mut lease, &mut status] {
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        }
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = lease.tick() => {
                    if let Err(error) = self.renew_lease().await {
                        tracing::warn!(%error, "lease renewal failed; retrying on the next tick");
                    }
                }
                _ = status.tick() => {
                    if let Err(error) = self.heartbeat().await {
                        tracing::warn!(%error, "node status update failed; retrying on the next tick");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> NodeConfig {
        NodeConfig {
            name: "node-a".into(),
            port: 11250,
            hostname_address: "node-a".into(),
            cpu: "4".into(),
            memory: "8Gi".into(),
            pods: "110".into(),
            kubelet_version: "v1.33.13".into(),
            extra_labels: BTreeMap::from([("zone".to_string(), "z1".to_string())]),
            lease_interval: Duration::from_secs(10),
            status_interval: Duration::from_secs(30),
        }
    }

    #[test]
    fn labels() {
        assert_eq!(parse_label("a=b").unwrap(), ("a".into(), "b".into()));
        assert_eq!(parse_label("a=").unwrap(), ("a".into(), "".into()));
        assert!(parse_label("=b").is_err());
        assert!(parse_label("ab").is_err());
        let l = config().labels();
        assert_eq!(l["kubernetes.io/hostname"], "node-a");
        assert_eq!(l["zone"], "z1");
    }

    #[test]
    fn status_deserializes_as_a_node_status() {
        // Parsing into the typed struct proves every field has the API's name and shape.
        let status: k8s_openapi::api::core::v1::NodeStatus =
            serde_json::from_value(node_status(&config(), Timestamp::now(), "b", Timestamp::now())).unwrap();
        assert_eq!(status.daemon_endpoints.unwrap().kubelet_endpoint.unwrap().port, 11250);
        let ready = status
            .conditions
            .unwrap()
            .into_iter()
            .find(|c| c.type_ == "Ready")
            .unwrap();
        assert_eq!(ready.status, "True");
        assert_eq!(status.capacity.unwrap()["pods"].0, "110");
        assert_eq!(status.node_info.unwrap().kubelet_version, "v1.33.13");
    }
}
