//! `kubectl migrate drain`: cordon, evict, and show each pod's way off the node, with a bar
//! per running transfer on a terminal.

use std::{
    collections::{BTreeMap, BTreeSet},
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
/// 429), and show each pod's progress until the node is empty. Evictions run concurrently, as
/// kubectl drain's do: the webhook holds the eviction of a migrating pod until its state is
/// safe, and one held eviction must not keep the others (or the display) waiting.
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
    let mut evictions = tokio::task::JoinSet::new();
    let mut in_flight = BTreeSet::new();
    let mut finished: BTreeMap<String, String> = BTreeMap::new();
    loop {
        while let Some(done) = evictions.try_join_next() {
            if let Ok((key, state)) = done {
                in_flight.remove(&key);
                finished.insert(key, state);
            }
        }
        let pods = all
            .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
            .await?
            .items;
        let moving = migrations_from(&migrations, node).await?;
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
        // Answers for pods no longer listed (removed while their eviction was held) are shown
        // too; once the node is empty, the last ones are awaited so that none goes unsaid.
        let listed: BTreeSet<String> = evictable
            .iter()
            .map(|p| format!("{}/{}", p.namespace().unwrap_or_default(), p.name_any()))
            .collect();
        if listed.is_empty() {
            while let Some(done) = evictions.join_next().await {
                if let Ok((key, state)) = done {
                    finished.insert(key, state);
                }
            }
        }
        let unlisted: Vec<String> = finished.keys().filter(|k| !listed.contains(*k)).cloned().collect();
        for key in unlisted {
            let state = with_migration(finished.remove(&key).unwrap_or_default(), moving.get(&key));
            show(&mut bars, &mut shown, started, key, state);
        }
        if listed.is_empty() {
            bars.clear();
            println!("node/{node} drained in {:.1} s", started.elapsed().as_secs_f64());
            return Ok(());
        }
        // Bars of transfers that ended go away; running ones are refreshed below.
        for key in shown.keys() {
            if moving.get(key).is_none_or(|m| m.transfer.is_none()) {
                bars.transfer(key, None);
            }
        }
        for pod in evictable {
            let ns = pod.namespace().unwrap_or_default();
            let key = format!("{ns}/{}", pod.name_any());
            let mut state = if pod.metadata.deletion_timestamp.is_some() {
                "terminating".to_string()
            } else if let Some(done) = finished.remove(&key) {
                done
            } else if in_flight.contains(&key) {
                match moving.get(&key) {
                    Some(m) => format!("held by kube-migrate: {}", m.text),
                    None => "evicting".to_string(),
                }
            } else {
                let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
                let (name, task_key) = (pod.name_any(), key.clone());
                evictions.spawn(async move { (task_key, evict(&api, &name).await) });
                in_flight.insert(key.clone());
                "evicting".to_string()
            };
            state = with_migration(state, moving.get(&key));
            if let Some(transfer) = moving.get(&key).and_then(|m| m.transfer.as_ref())
                && !bars.transfer(&key, Some(transfer))
            {
                state = format!("sending {}", plugin::transfer_text(transfer));
            }
            show(&mut bars, &mut shown, started, key, state);
        }
        if started.elapsed() > Duration::from_secs(timeout) {
            return Err(PluginError::Timeout(timeout));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// An eviction that went through names the migration that moved the pod, if one did.
fn with_migration(state: String, moving: Option<&Moving>) -> String {
    match moving {
        Some(m) if state == "evicted" || state == "gone" => format!("{state}; kube-migrate: {}", m.text),
        _ => state,
    }
}

/// Print a pod's state when it changed.
fn show(bars: &mut Bars, shown: &mut BTreeMap<String, String>, started: Instant, key: String, state: String) {
    if shown.get(&key) != Some(&state) {
        bars.println(&format!("[{:6.1}s] {key}: {state}", started.elapsed().as_secs_f64()));
        shown.insert(key, state);
    }
}

/// One eviction, as the state to show: a 429's reason is kube-migrate's message.
async fn evict(api: &Api<Pod>, name: &str) -> String {
    match api.evict(name, &Default::default()).await {
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
}

/// A migration off the node, as the drain view shows it.
struct Moving {
    /// `PodMigration NAME PHASE to TARGET`.
    text: String,
    /// Its transfer, while it runs.
    transfer: Option<TransferProgress>,
}

/// The latest migration of each pod off `node`, by `namespace/pod`.
async fn migrations_from(migrations: &Api<PodMigration>, node: &str) -> Result<BTreeMap<String, Moving>, PluginError> {
    let mut listed = migrations
        .list(&ListParams::default().labels(&format!("{}={node}", api::SOURCE_NODE_LABEL)))
        .await?
        .items;
    listed.sort_by_key(|pm| pm.metadata.creation_timestamp.clone());
    Ok(listed
        .into_iter()
        .map(|pm| {
            let key = format!("{}/{}", pm.namespace().unwrap_or_default(), pm.spec.pod_name);
            let status = pm.status.clone().unwrap_or_default();
            let text = format!(
                "PodMigration {} {} to {}",
                pm.name_any(),
                status.phase,
                status.target_node.as_deref().unwrap_or("a node still to be chosen")
            );
            let transfer = status.transfer.filter(|_| status.phase == Phase::Transferring);
            (key, Moving { text, transfer })
        })
        .collect())
}
