//! Inter-pod rules the scheduler enforces on the replacement: required pod affinity and
//! anti-affinity (both ways), and hard topology spread (`DoNotSchedule`).
//!
//! The replacement is pinned to its target by node affinity, so the scheduler still enforces
//! (anti-)affinity but, with the default `nodeAffinityPolicy: Honor`, no longer spreads it:
//! the spread is checked here, when the target is chosen, or nothing would.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::{Node, Pod, PodAffinityTerm, TopologySpreadConstraint},
    apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement},
};
use kube::{
    ResourceExt,
    core::{Selector, SelectorExt},
};

use super::{PlacementInput, Unfit, node_rules, node_unfit};

type Labels = BTreeMap<String, String>;

pub(super) fn check(input: &PlacementInput<'_>, node: &Node) -> Result<(), Unfit> {
    let others = others(input);
    let labels_of = node_labels(input.nodes);
    let here = node.labels();
    let spec = input.pod.spec.clone().unwrap_or_default();
    let ns = input.pod.namespace().unwrap_or_default();
    let affinity = spec.affinity.as_ref();

    let anti = affinity
        .and_then(|a| a.pod_anti_affinity.as_ref())
        .and_then(|a| a.required_during_scheduling_ignored_during_execution.as_deref())
        .unwrap_or_default();
    for term in anti {
        if let Some(p) = others
            .iter()
            .find(|(p, n)| selects(term, &ns, p) && same_domain(here, labels_of.get(n), &term.topology_key))
        {
            return Err(Unfit::PodAntiAffinity(p.0.name_any()));
        }
    }
    // Symmetry: an existing pod's anti-affinity keeps the replacement away too.
    for (p, n) in &others {
        let terms = p
            .spec
            .as_ref()
            .and_then(|s| s.affinity.as_ref())
            .and_then(|a| a.pod_anti_affinity.as_ref())
            .and_then(|a| a.required_during_scheduling_ignored_during_execution.as_deref())
            .unwrap_or_default();
        let p_ns = p.namespace().unwrap_or_default();
        if terms
            .iter()
            .any(|t| selects(t, &p_ns, input.pod) && same_domain(here, labels_of.get(n), &t.topology_key))
        {
            return Err(Unfit::PodAntiAffinity(p.name_any()));
        }
    }

    let required = affinity
        .and_then(|a| a.pod_affinity.as_ref())
        .and_then(|a| a.required_during_scheduling_ignored_during_execution.as_deref())
        .unwrap_or_default();
    for term in required {
        let matching: Vec<&str> = others
            .iter()
            .filter(|(p, _)| selects(term, &ns, p))
            .map(|(_, n)| *n)
            .collect();
        // As in the scheduler: the first pod of a group that matches its own term may go
        // anywhere, or it could never start.
        if matching.is_empty() && selects(term, &ns, input.pod) {
            continue;
        }
        if !matching
            .iter()
            .any(|n| same_domain(here, labels_of.get(n), &term.topology_key))
        {
            return Err(Unfit::PodAffinity);
        }
    }

    for c in spec.topology_spread_constraints.as_deref().unwrap_or_default() {
        if c.when_unsatisfiable == "DoNotSchedule" {
            spread_allows(input, c, node, &others)?;
        }
    }
    Ok(())
}

/// The other pods and their nodes: bound, not terminating, not the pod being placed (its
/// source copy is leaving).
fn others<'a>(input: &PlacementInput<'a>) -> Vec<(&'a Pod, &'a str)> {
    let me = input.pod.metadata.uid.as_deref();
    input
        .pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| me.is_none() || p.metadata.uid.as_deref() != me)
        .filter_map(|p| Some((*p, p.spec.as_ref()?.node_name.as_deref()?)))
        .collect()
}

fn node_labels<'a>(nodes: &[&'a Node]) -> BTreeMap<&'a str, &'a Labels> {
    nodes
        .iter()
        .filter_map(|n| Some((n.metadata.name.as_deref()?, n.metadata.labels.as_ref()?)))
        .collect()
}

/// Two nodes share a topology domain when both carry `key` with the same value.
fn same_domain(a: &Labels, b: Option<&&Labels>, key: &str) -> bool {
    match (a.get(key), b.and_then(|b| b.get(key))) {
        (Some(x), Some(y)) => x == y,
        _ => false,
    }
}

/// Does `term` of a pod in `owner_ns` select `pod`? A nil label selector selects nothing.
/// A non-empty `namespaceSelector` is taken to select every namespace: placement has no
/// namespace labels, and for anti-affinity that errs on the safe side.
fn selects(term: &PodAffinityTerm, owner_ns: &str, pod: &Pod) -> bool {
    let pod_ns = pod.namespace().unwrap_or_default();
    let in_namespace = match (&term.namespaces, &term.namespace_selector) {
        (_, Some(_)) => true,
        (Some(list), None) if !list.is_empty() => list.contains(&pod_ns),
        _ => pod_ns == owner_ns,
    };
    in_namespace && term.label_selector.as_ref().is_some_and(|s| matches(s, pod.labels()))
}

fn matches(selector: &LabelSelector, labels: &Labels) -> bool {
    Selector::try_from(selector.clone()).is_ok_and(|s| s.matches(labels))
}

/// `maxSkew` after placing the pod on `node`, over the domains of the nodes that could take
/// it. Nodes that take no new pods (cordoned, which includes every node being drained, or not
/// Ready) are left out, as `nodeTaintsPolicy: Honor` would: a drain would otherwise count the
/// emptied node as a domain with no pods and refuse every target.
fn spread_allows(
    input: &PlacementInput<'_>,
    c: &TopologySpreadConstraint,
    node: &Node,
    others: &[(&Pod, &str)],
) -> Result<(), Unfit> {
    let unfit = || Unfit::TopologySpread(c.topology_key.clone());
    let Some(domain) = node.labels().get(&c.topology_key) else {
        return Err(unfit());
    };
    let spec = input.pod.spec.clone().unwrap_or_default();
    let honor_taints = c.node_taints_policy.as_deref() == Some("Honor");
    let ignore_affinity = c.node_affinity_policy.as_deref() == Some("Ignore");
    let mut counts: BTreeMap<&str, i32> = BTreeMap::new();
    let mut domain_of: BTreeMap<&str, &str> = BTreeMap::new();
    for n in input.nodes {
        let name = n.metadata.name.as_deref().unwrap_or_default();
        let eligible = name != input.source_node
            && node_unfit(n).is_none()
            && (ignore_affinity || node_rules::matches_pod(&spec, n).is_ok())
            && (!honor_taints || node_rules::untolerated_taint(&spec, n).is_none());
        if let (true, Some(d)) = (eligible, n.labels().get(&c.topology_key)) {
            counts.entry(d.as_str()).or_default();
            domain_of.insert(name, d.as_str());
        }
    }
    let selector = spread_selector(c, input.pod);
    let ns = input.pod.namespace().unwrap_or_default();
    for (p, n) in others {
        if p.namespace().unwrap_or_default() == ns
            && selector.as_ref().is_some_and(|s| matches(s, p.labels()))
            && let Some(count) = domain_of.get(n).and_then(|d| counts.get_mut(d))
        {
            *count += 1;
        }
    }
    let min_domains = c.min_domains.unwrap_or(1).max(1) as usize;
    let min = if counts.len() < min_domains {
        0
    } else {
        counts.values().copied().min().unwrap_or(0)
    };
    let own = i32::from(selector.as_ref().is_some_and(|s| matches(s, input.pod.labels())));
    let here = counts.get(domain.as_str()).copied().unwrap_or(0);
    if here + own - min > c.max_skew {
        return Err(unfit());
    }
    Ok(())
}

/// The constraint's selector with its `matchLabelKeys` bound to the pod's own values.
fn spread_selector(c: &TopologySpreadConstraint, pod: &Pod) -> Option<LabelSelector> {
    let mut selector = c.label_selector.clone()?;
    for key in c.match_label_keys.as_deref().unwrap_or_default() {
        if let Some(value) = pod.labels().get(key) {
            selector
                .match_expressions
                .get_or_insert_with(Vec::new)
                .push(LabelSelectorRequirement {
                    key: key.clone(),
                    operator: "In".into(),
                    values: Some(vec![value.clone()]),
                });
        }
    }
    Some(selector)
}
