//! Choosing the target node: the scheduler's hard rules that matter for a single pod
//! (cordon, readiness, nodeSelector, required node affinity, taints, resource requests,
//! required pod (anti-)affinity, hard topology spread),
//! then the least loaded node. Pure: nodes and pods in, a choice or every node's reason out.

mod node_rules;
mod pod_rules;

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, NodeCondition, Pod};

use super::quantity::Resources;

/// Why a node cannot take the pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unfit {
    IsSource,
    NotFound,
    NotReady,
    Cordoned,
    NoAgent,
    NodeSelector,
    NodeAffinity,
    Taint(String),
    Insufficient(&'static str),
    /// Required pod anti-affinity (the pod's or the named pod's) rules the node out.
    PodAntiAffinity(String),
    PodAffinity,
    /// Placing the pod here would exceed `maxSkew` over this topology key.
    TopologySpread(String),
    /// This migration gave up on the node (its agent stopped answering).
    GaveUp,
    /// A PersistentVolume the pod uses is reachable only from other nodes (its node affinity).
    VolumeAffinity(String),
}

impl std::fmt::Display for Unfit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unfit::IsSource => f.write_str("is the source node"),
            Unfit::NotFound => f.write_str("does not exist"),
            Unfit::NotReady => f.write_str("is not Ready"),
            Unfit::Cordoned => f.write_str("is cordoned"),
            Unfit::NoAgent => f.write_str("runs no kube-migrate agent"),
            Unfit::NodeSelector => f.write_str("does not match the pod's nodeSelector"),
            Unfit::NodeAffinity => f.write_str("does not match the pod's required node affinity"),
            Unfit::Taint(t) => write!(f, "has untolerated taint {t}"),
            Unfit::Insufficient(r) => write!(f, "has insufficient {r}"),
            Unfit::PodAntiAffinity(p) => write!(f, "is ruled out by pod anti-affinity with pod {p}"),
            Unfit::PodAffinity => f.write_str("has no pod the pod's required pod affinity asks for"),
            Unfit::TopologySpread(k) => write!(f, "would exceed the pod's topology spread maxSkew over {k}"),
            Unfit::GaveUp => f.write_str("was given up during this migration (see its Events)"),
            Unfit::VolumeAffinity(pv) => write!(f, "is outside the node affinity of PersistentVolume {pv}"),
        }
    }
}

/// The outcome of target selection.
#[derive(Debug, Clone, PartialEq)]
pub enum Placement {
    Node(String),
    /// No node fits; the reason of every node, sorted by node name.
    None(Vec<(String, Unfit)>),
}

impl Placement {
    pub fn explain(reasons: &[(String, Unfit)]) -> String {
        if reasons.is_empty() {
            return "the cluster has no other node".into();
        }
        reasons
            .iter()
            .map(|(n, r)| format!("{n} {r}"))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// Everything placement needs.
pub struct PlacementInput<'a> {
    pub pod: &'a Pod,
    pub source_node: &'a str,
    /// A node the user named (annotation or spec); only that node is considered.
    pub requested: Option<&'a str>,
    pub nodes: &'a [&'a Node],
    /// Pods that hold resources (bound, not terminal), for the requests already on each node.
    pub pods: &'a [&'a Pod],
    /// Nodes that run an agent.
    pub has_agent: &'a dyn Fn(&str) -> bool,
    /// Nodes this migration gave up on.
    pub excluded: &'a [String],
    /// The PersistentVolumes bound to the pod's claims: a node must be in each one's required
    /// node affinity (zone, region or host), as the scheduler's volume binding checks.
    pub volumes: &'a [k8s_openapi::api::core::v1::PersistentVolume],
}

pub fn choose(input: &PlacementInput<'_>) -> Placement {
    let request = pod_requests(input.pod);
    let mut used: BTreeMap<&str, Resources> = BTreeMap::new();
    for p in input.pods {
        if let Some(node) = p.spec.as_ref().and_then(|s| s.node_name.as_deref()) {
            let entry = used.entry(node).or_default();
            entry.add(&pod_requests(p));
            entry.pods += 1.0;
        }
    }
    let candidates: Vec<&Node> = match input.requested {
        Some(name) => match input.nodes.iter().find(|n| n.metadata.name.as_deref() == Some(name)) {
            Some(n) => vec![*n],
            None => return Placement::None(vec![(name.to_string(), Unfit::NotFound)]),
        },
        None => input.nodes.to_vec(),
    };
    let rules = pod_rules::PodRules::new(input);
    let mut best: Option<(f64, &str)> = None;
    let mut reasons = Vec::new();
    for node in candidates {
        let name = node.metadata.name.as_deref().unwrap_or_default();
        match fit(input, &rules, node, &request, used.get(name)) {
            Ok(load) => {
                if best.is_none_or(|(l, n)| load < l || (load == l && name < n)) {
                    best = Some((load, name));
                }
            }
            Err(reason) => reasons.push((name.to_string(), reason)),
        }
    }
    match best {
        Some((_, name)) => Placement::Node(name.to_string()),
        None => {
            reasons.sort_by(|a, b| a.0.cmp(&b.0));
            Placement::None(reasons)
        }
    }
}

/// Why a node takes no new pod whatever the pod: cordoned (which includes every node being
/// drained) or not Ready.
pub fn node_unfit(node: &Node) -> Option<Unfit> {
    if node.spec.as_ref().and_then(|s| s.unschedulable) == Some(true) {
        return Some(Unfit::Cordoned);
    }
    let ready = ready_condition(node).is_some_and(|c| c.status == "True");
    (!ready).then_some(Unfit::NotReady)
}

/// The node's `Ready` condition, if it reports one.
pub fn ready_condition(node: &Node) -> Option<&NodeCondition> {
    node.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready")
}

/// Ok(load after placement, 0..=1+) or why not.
fn fit(
    input: &PlacementInput<'_>,
    rules: &pod_rules::PodRules<'_>,
    node: &Node,
    request: &Resources,
    used: Option<&Resources>,
) -> Result<f64, Unfit> {
    let name = node.metadata.name.as_deref().unwrap_or_default();
    if name == input.source_node {
        return Err(Unfit::IsSource);
    }
    if let Some(unfit) = node_unfit(node) {
        return Err(unfit);
    }
    if input.excluded.iter().any(|e| e == name) {
        return Err(Unfit::GaveUp);
    }
    if !(input.has_agent)(name) {
        return Err(Unfit::NoAgent);
    }
    node_rules::matches_pod(&rules.spec, node)?;
    if let Some(pv) = input.volumes.iter().find(|pv| !node_rules::volume_reachable(pv, node)) {
        return Err(Unfit::VolumeAffinity(pv.metadata.name.clone().unwrap_or_default()));
    }
    if let Some(taint) = node_rules::untolerated_taint(&rules.spec, node) {
        return Err(Unfit::Taint(taint));
    }
    rules.check(node)?;
    let allocatable = node
        .status
        .as_ref()
        .and_then(|s| s.allocatable.as_ref())
        .map(Resources::from_list)
        .unwrap_or_default();
    let mut after = used.cloned().unwrap_or_default();
    after.add(request);
    after.pods += 1.0;
    after.fits_in(&allocatable).map_err(Unfit::Insufficient)?;
    Ok(after.load(&allocatable))
}

/// Effective requests of a pod: the larger of the sum of its containers and its largest
/// init container, plus overhead, as the scheduler counts them.
pub fn pod_requests(pod: &Pod) -> Resources {
    let Some(spec) = pod.spec.as_ref() else {
        return Resources::default();
    };
    let mut sum = Resources::default();
    for c in &spec.containers {
        if let Some(r) = c.resources.as_ref().and_then(|r| r.requests.as_ref()) {
            sum.add(&Resources::from_list(r));
        }
    }
    for c in spec.init_containers.as_deref().unwrap_or_default() {
        if let Some(r) = c.resources.as_ref().and_then(|r| r.requests.as_ref()) {
            sum.max_with(&Resources::from_list(r));
        }
    }
    if let Some(o) = &spec.overhead {
        sum.add(&Resources::from_list(o));
    }
    sum
}
