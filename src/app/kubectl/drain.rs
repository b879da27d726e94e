//! `kubectl migrate drain`: cordon, evict, and show each pod's way off the node, with a bar
//! per running transfer on a terminal.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::{
    Api, Client, ResourceExt,
    api::{ListParams, Patch, PatchParams},
};

use super::bars::Bars;
use crate::{
    api::{self, Phase, PodMigration, TransferProgress},
    plugin::{self, PluginError},
};

/// Cordon, evict everything but DaemonSet and mirror pods (retrying while the webhook answers
/// 429), and show each pod's progress until the node is empty.
pub async fn drain(client: &Client, node: &str, timeout: u64) -> Result<(), PluginError> {
    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .patch(
            node,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({ "spec": { "unschedulable": true } })),
        )
        .await?;
    println!("node/{node} cordoned");
    let started = Instant::now();
    let all: Api<Pod> = Api::all(client.clone());
    let mut shown: BTreeMap<String, String> = BTreeMap::new();
    let mut statics_reported = false;
    let mut bars = Bars::new();
    let migrations: Api<PodMigration> = Api::all(client.clone());
    loop {
        let pods = all
            .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
            .await?
            .items;
        let transfers = transfers_from(&migrations, node).await?;
        if !statics_reported {
            // kubectl drain skips static pods without a word; an opted-in one keeps its state
            // on this node, and the operator must hear it.
            for p in pods
                .iter()
                .filter(|p| crate::preflight::is_mirror(p) && crate::api::is_stateful(p))
            {
                bars.println(&format!(
                    "not migrated: {}/{}: {}",
                    p.namespace().unwrap_or_default(),
                    p.name_any(),
                    crate::preflight::Refusal::StaticPod(p.name_any())
                ));
            }
            statics_reported = true;
        }
        let evictable: Vec<&Pod> = pods
            .iter()
            .filter(|p| !p.owner_references().iter().any(|o| o.kind == "DaemonSet"))
            .filter(|p| !p.annotations().contains_key("kubernetes.io/config.mirror"))
            .filter(|p| {
                !matches!(
                    p.status.as_ref().and_then(|s| s.phase.as_deref()),
                    Some("Succeeded" | "Failed")
                )
            })
            .collect();
        if evictable.is_empty() {
            bars.clear();
            println!("node/{node} drained in {:.1} s", started.elapsed().as_secs_f64());
            return Ok(());
        }
        // Bars of transfers that ended go away; running ones are refreshed below.
        for key in shown.keys() {
            if !transfers.contains_key(key) {
                bars.transfer(key, None);
            }
        }
        for pod in evictable {
            let ns = pod.namespace().unwrap_or_default();
            let key = format!("{ns}/{}", pod.name_any());
            let state = if pod.metadata.deletion_timestamp.is_some() {
                "terminating".to_string()
            } else {
                let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
                match api.evict(&pod.name_any(), &Default::default()).await {
                    Ok(_) => "evicted".to_string(),
                    Err(kube::Error::Api(e)) if e.code == 429 => e
                        .message
                        .rsplit("denied the request: ")
                        .next()
                        .unwrap_or(&e.message)
                        .to_string(),
                    Err(kube::Error::Api(e)) if e.code == 404 => "gone".to_string(),
                    Err(e) => format!("error: {e}"),
                }
            };
            let mut state = state;
            if let Some(transfer) = transfers.get(&key)
                && !bars.transfer(&key, Some(transfer))
            {
                state = format!("sending {}", plugin::transfer_text(transfer));
            }
            if shown.get(&key) != Some(&state) {
                bars.println(&format!("[{:6.1}s] {key}: {state}", started.elapsed().as_secs_f64()));
                shown.insert(key, state);
            }
        }
        if started.elapsed() > Duration::from_secs(timeout) {
            return Err(PluginError::Timeout(timeout));
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Running transfers of migrations off `node`, by `namespace/pod`.
async fn transfers_from(
    migrations: &Api<PodMigration>,
    node: &str,
) -> Result<BTreeMap<String, TransferProgress>, PluginError> {
    let listed = migrations
        .list(&ListParams::default().labels(&format!("{}={node}", api::SOURCE_NODE_LABEL)))
        .await?;
    Ok(listed
        .items
        .into_iter()
        .filter_map(|pm| {
            let status = pm.status?;
            let transfer = status.transfer.filter(|_| status.phase == Phase::Transferring)?;
            Some((
                format!("{}/{}", pm.metadata.namespace.unwrap_or_default(), pm.spec.pod_name),
                transfer,
            ))
        })
        .collect())
}
