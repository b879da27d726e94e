//! Inter-pod rules the scheduler enforces on the replacement: required pod affinity and
//! anti-affinity (both ways), and hard topology spread (`DoNotSchedule`).
//!
//! The replacement is pinned to its target by node affinity, so the scheduler still enforces
//! (anti-)affinity but, with the default `nodeAffinityPolicy: Honor`, no longer spreads it:
//! the spread is checked here, when the target is chosen, or nothing would.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::{Node, Pod, PodAffinityTerm, PodSpec, TopologySpreadConstraint},
    apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement},
};
use kube::{
    ResourceExt,
    core::{Selector, SelectorExt},
};

use super::{PlacementInput, Unfit, node_rules, node_unfit};

type Labels = BTreeMap<String, String>;

/// What the inter-pod rules need, computed once per placement: the other pods and their
/// nodes, the nodes' labels, and each hard spread constraint's pod counts per domain (they do
/// not depend on the candidate node).
pub(super) struct PodRules<'a> {
    pod: &'a Pod,
    ns: String,
    /// The pod's spec (also what the node-level rules check).
    pub(super) spec: PodSpec,
    others: Vec<(&'a Pod, &'a str)>,
    labels_of: BTreeMap<&'a str, &'a Labels>,
    spreads: Vec<Spread<'a>>,
}

/// One `DoNotSchedule` constraint, counted.
struct Spread<'a> {
    key: &'a str,
    max_skew: i32,
    counts: BTreeMap<&'a str, i32>,
    /// The smallest count over the eligible domains (0 below `minDomains`).
    min: i32,
    /// 1 when the pod matches its own selector.
    own: i32,
}

impl<'a> PodRules<'a> {
    pub(super) fn new(input: &PlacementInput<'a>) -> Self {
        let pod = input.pod;
        let spec = pod.spec.clone().unwrap_or_default();
        let others = others(input);
        let spreads = pod
            .spec
            .as_ref()
            .and_then(|s| s.topology_spread_constraints.as_deref())
            .unwrap_or_default()
            .iter()
            .filter(|c| c.when_unsatisfiable == "DoNotSchedule")
            .map(|c| Spread::new(input, c, &spec, &others))
            .collect();
        Self {
            pod,
            ns: pod.namespace().unwrap_or_default(),
            spec,
            labels_of: node_labels(input.nodes),
            others,
            spreads,
        }
    }

    pub(super) fn check(&self, node: &Node) -> Result<(), Unfit> {
        let (ns, others, labels_of) = (&self.ns, &self.others, &self.labels_of);
        let here = node.labels();
        let affinity = self.spec.affinity.as_ref();

        let anti = affinity
            .and_then(|a| a.pod_anti_affinity.as_ref())
            .and_then(|a| a.required_during_scheduling_ignored_during_execution.as_deref())
            .unwrap_or_default();
        for term in anti {
            if let Some(p) = others
                .iter()
                .find(|(p, n)| selects(term, ns, p) && same_domain(here, labels_of.get(n), &term.topology_key))
            {
                return Err(Unfit::PodAntiAffinity(p.0.name_any()));
            }
        }
        // Symmetry: an existing pod's anti-affinity keeps the replacement away too.
        for (p, n) in others {
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
                .any(|t| selects(t, &p_ns, self.pod) && same_domain(here, labels_of.get(n), &t.topology_key))
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
                .filter(|(p, _)| selects(term, ns, p))
                .map(|(_, n)| *n)
                .collect();
            // As in the scheduler: the first pod of a group that matches its own term may go
            // anywhere, or it could never start.
            if matching.is_empty() && selects(term, ns, self.pod) {
                continue;
            }
            if !matching
                .iter()
                .any(|n| same_domain(here, labels_of.get(n), &term.topology_key))
            {
                return Err(Unfit::PodAffinity);
            }
        }

        for spread in &self.spreads {
            spread.allows(node)?;
        }
        Ok(())
    }
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

impl<'a> Spread<'a> {
    /// Count the pods the constraint selects per domain of the nodes that could take the pod.
    /// Nodes that take no new pods (cordoned, which includes every node being drained, or not
    /// Ready) are left out, as `nodeTaintsPolicy: Honor` would: a drain would otherwise count
    /// the emptied node as a domain with no pods and refuse every target.
    fn new(
        input: &PlacementInput<'a>,
        c: &'a TopologySpreadConstraint,
        spec: &PodSpec,
        others: &[(&'a Pod, &'a str)],
    ) -> Self {
        let honor_taints = c.node_taints_policy.as_deref() == Some("Honor");
        let ignore_affinity = c.node_affinity_policy.as_deref() == Some("Ignore");
        let mut counts: BTreeMap<&str, i32> = BTreeMap::new();
        let mut domain_of: BTreeMap<&str, &str> = BTreeMap::new();
        for n in input.nodes {
            let name = n.metadata.name.as_deref().unwrap_or_default();
            let eligible = name != input.source_node
                && node_unfit(n).is_none()
                && (ignore_affinity || node_rules::matches_pod(spec, n).is_ok())
                && (!honor_taints || node_rules::untolerated_taint(spec, n).is_none());
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
        Self {
            key: &c.topology_key,
            max_skew: c.max_skew,
            counts,
            min,
            own: i32::from(selector.as_ref().is_some_and(|s| matches(s, input.pod.labels()))),
        }
    }

    /// `maxSkew` after placing the pod on `node`.
    fn allows(&self, node: &Node) -> Result<(), Unfit> {
        let unfit = || Unfit::TopologySpread(self.key.to_string());
        let domain = node.labels().get(self.key).ok_or_else(unfit)?;
        let here = self.counts.get(domain.as_str()).copied().unwrap_or(0);
        if here + self.own - self.min > self.max_skew {
            return Err(unfit());
        }
        Ok(())
    }
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
