//! The eviction webhook's scope: only namespaces labelled `migrate.io/opted-in=true` send
//! their evictions to kube-migrate, so an outage of kube-migrate blocks evictions there and
//! nowhere else. kube-migrate labels a namespace when it first sees an opted-in pod in it:
//! the pod webhook at the pod's creation (before it can run, so before any eviction), and
//! the leader from its pod cache for pods annotated after their creation.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{
    Api, Client, ResourceExt,
    api::{Patch, PatchParams},
    runtime::reflector::{ObjectRef, Store},
};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::api;

/// Make sure `ns` carries the label. The namespace watch cache says whether it does (a cache,
/// not a set of names: a namespace deleted and re-created under the same name is a new object
/// without the label); one merge patch when it does not.
pub async fn ensure(client: &Client, namespaces: &Store<Namespace>, ns: &str) -> Result<(), kube::Error> {
    let labelled = namespaces
        .get(&ObjectRef::new(ns))
        .is_some_and(|n| n.labels().get(api::NAMESPACE_LABEL).map(String::as_str) == Some("true"));
    if labelled {
        return Ok(());
    }
    let api: Api<Namespace> = Api::all(client.clone());
    let patch = json!({ "metadata": { "labels": { api::NAMESPACE_LABEL: "true" } } });
    api.patch(ns, &PatchParams::default(), &Patch::Merge(&patch)).await?;
    tracing::info!(
        namespace = ns,
        label = api::NAMESPACE_LABEL,
        "namespace labelled: it holds an opted-in pod"
    );
    Ok(())
}

/// Namespaces of opted-in pods in `pods`, sorted.
pub fn opted_in_namespaces<'a>(pods: impl Iterator<Item = &'a Pod>) -> Vec<String> {
    let mut out: Vec<String> = pods
        .filter(|p| api::is_stateful(p))
        .filter_map(|p| p.namespace())
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Label, every few seconds, the namespace of every opted-in pod in the cache (pods that
/// were annotated after their creation, or created while no webhook answered).
pub async fn keep_labelled(
    client: Client,
    pods: Store<Pod>,
    namespaces: Store<Namespace>,
    shutdown: CancellationToken,
) {
    let _ = tokio::join!(pods.wait_until_ready(), namespaces.wait_until_ready());
    loop {
        let state = pods.state();
        for ns in opted_in_namespaces(state.iter().map(AsRef::as_ref)) {
            if let Err(error) = ensure(&client, &namespaces, &ns).await {
                tracing::warn!(%error, namespace = ns, "could not label namespace; retrying");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn only_namespaces_with_opted_in_pods_are_selected() {
        let pod = |ns: &str, value: Option<&str>| -> Pod {
            let annotations = value.map(|v| json!({ api::STATEFUL: v })).unwrap_or(json!({}));
            serde_json::from_value(json!({ "metadata": { "name": "p", "namespace": ns, "annotations": annotations } }))
                .unwrap()
        };
        let pods = [
            pod("shop", Some("true")),
            pod("shop", Some("yes")),
            pod("web", None),
            pod("batch", Some("false")),
            pod("odd", Some("maybe")),
        ];
        assert_eq!(opted_in_namespaces(pods.iter()), ["odd", "shop"]);
    }
}
