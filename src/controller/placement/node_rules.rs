//! Node-level rules of the scheduler: node selector terms and taint tolerations.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, NodeSelectorRequirement, NodeSelectorTerm, PodSpec, Toleration};

use super::Unfit;

/// The pod's own node constraints: `nodeSelector` and required node affinity.
pub(super) fn matches_pod(pod: &PodSpec, node: &Node) -> Result<(), Unfit> {
    let name = node.metadata.name.as_deref().unwrap_or_default();
    let empty = BTreeMap::new();
    let labels = node.metadata.labels.as_ref().unwrap_or(&empty);
    if let Some(selector) = &pod.node_selector
        && !selector.iter().all(|(k, v)| labels.get(k) == Some(v))
    {
        return Err(Unfit::NodeSelector);
    }
    if let Some(required) = pod
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|a| a.required_during_scheduling_ignored_during_execution.as_ref())
        && !required
            .node_selector_terms
            .iter()
            .any(|t| term_matches(t, name, labels))
    {
        return Err(Unfit::NodeAffinity);
    }
    Ok(())
}

/// Whether `node` is in the required node affinity of `pv` (none: reachable from anywhere).
pub(super) fn volume_reachable(pv: &k8s_openapi::api::core::v1::PersistentVolume, node: &Node) -> bool {
    let Some(required) = pv
        .spec
        .as_ref()
        .and_then(|s| s.node_affinity.as_ref())
        .and_then(|a| a.required.as_ref())
    else {
        return true;
    };
    let name = node.metadata.name.as_deref().unwrap_or_default();
    let empty = BTreeMap::new();
    let labels = node.metadata.labels.as_ref().unwrap_or(&empty);
    required
        .node_selector_terms
        .iter()
        .any(|t| term_matches(t, name, labels))
}

/// The first `NoSchedule`/`NoExecute` taint of `node` the pod does not tolerate, as
/// `key=value:effect`.
pub(super) fn untolerated_taint(pod: &PodSpec, node: &Node) -> Option<String> {
    let tolerations = pod.tolerations.as_deref().unwrap_or_default();
    node.spec
        .as_ref()
        .and_then(|s| s.taints.as_deref())
        .unwrap_or_default()
        .iter()
        .filter(|t| t.effect != "PreferNoSchedule")
        .find(|taint| {
            !tolerations
                .iter()
                .any(|t| tolerates(t, &taint.key, taint.value.as_deref(), &taint.effect))
        })
        .map(|t| format!("{}={}:{}", t.key, t.value.as_deref().unwrap_or_default(), t.effect))
}

fn term_matches(term: &NodeSelectorTerm, name: &str, labels: &BTreeMap<String, String>) -> bool {
    let exprs = term.match_expressions.as_deref().unwrap_or_default();
    let fields = term.match_fields.as_deref().unwrap_or_default();
    if exprs.is_empty() && fields.is_empty() {
        return false; // an empty term matches nothing (as in the scheduler)
    }
    exprs
        .iter()
        .all(|r| requirement_matches(r, labels.get(&r.key).map(String::as_str)))
        && fields
            .iter()
            .all(|r| r.key == "metadata.name" && requirement_matches(r, Some(name)))
}

fn requirement_matches(r: &NodeSelectorRequirement, value: Option<&str>) -> bool {
    let values = r.values.as_deref().unwrap_or_default();
    match r.operator.as_str() {
        "In" => value.is_some_and(|v| values.iter().any(|x| x == v)),
        "NotIn" => value.is_none_or(|v| !values.iter().any(|x| x == v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        "Gt" | "Lt" => {
            let (Some(v), Some(bound)) = (
                value.and_then(|v| v.parse::<i64>().ok()),
                values.first().and_then(|b| b.parse::<i64>().ok()),
            ) else {
                return false;
            };
            if r.operator == "Gt" { v > bound } else { v < bound }
        }
        _ => false,
    }
}

fn tolerates(t: &Toleration, key: &str, value: Option<&str>, effect: &str) -> bool {
    if let Some(e) = t.effect.as_deref()
        && !e.is_empty()
        && e != effect
    {
        return false;
    }
    match t.operator.as_deref().unwrap_or("Equal") {
        "Exists" => t.key.as_deref().is_none_or(|k| k.is_empty() || k == key),
        _ => t.key.as_deref() == Some(key) && t.value.as_deref().unwrap_or("") == value.unwrap_or(""),
    }
}
