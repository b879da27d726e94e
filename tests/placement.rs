//! Target selection: the scheduler's hard rules that matter, then the least loaded node.

use k8s_openapi::api::core::v1::{Node, Pod};
use kube_migrate::controller::placement::{Placement, PlacementInput, Unfit, choose};
use serde_json::json;

fn node(name: &str, extra: serde_json::Value) -> Node {
    let mut n = json!({
        "metadata": { "name": name, "labels": { "kubernetes.io/hostname": name } },
        "spec": {},
        "status": {
            "allocatable": { "cpu": "4", "memory": "8Gi", "pods": "110" },
            "conditions": [{ "type": "Ready", "status": "True" }]
        }
    });
    merge(&mut n, extra);
    serde_json::from_value(n).unwrap()
}

fn merge(a: &mut serde_json::Value, b: serde_json::Value) {
    match (a, b) {
        (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k).or_insert(serde_json::Value::Null), v);
            }
        }
        (a, b) => *a = b,
    }
}

fn pod(extra: serde_json::Value) -> Pod {
    let mut p = json!({
        "metadata": { "name": "db-0", "namespace": "shop" },
        "spec": { "nodeName": "node-a", "containers": [{ "name": "app", "resources": { "requests": { "cpu": "1", "memory": "1Gi" } } }] }
    });
    merge(&mut p, extra);
    serde_json::from_value(p).unwrap()
}

fn running_on(node: &str, cpu: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": { "name": format!("load-{node}-{cpu}") },
        "spec": { "nodeName": node, "containers": [{ "name": "c", "resources": { "requests": { "cpu": cpu, "memory": "100Mi" } } }] }
    }))
    .unwrap()
}

fn place(p: &Pod, nodes: &[Node], pods: &[Pod], requested: Option<&str>) -> Placement {
    let nodes: Vec<&Node> = nodes.iter().collect();
    let pods: Vec<&Pod> = pods.iter().collect();
    let has_agent = |n: &str| n != "node-noagent";
    choose(&PlacementInput {
        pod: p,
        source_node: "node-a",
        requested,
        nodes: &nodes,
        pods: &pods,
        has_agent: &has_agent,
        excluded: &[],
    })
}

#[test]
fn picks_the_least_loaded_fitting_node() {
    let nodes = [
        node("node-a", json!({})),
        node("node-b", json!({})),
        node("node-c", json!({})),
    ];
    let pods = [running_on("node-b", "2"), running_on("node-c", "500m")];
    assert_eq!(
        place(&pod(json!({})), &nodes, &pods, None),
        Placement::Node("node-c".into())
    );
}

#[test]
fn every_rule_excludes_with_a_reason() {
    let nodes = [
        node("node-a", json!({})),
        node("node-cordoned", json!({ "spec": { "unschedulable": true } })),
        node(
            "node-notready",
            json!({ "status": { "conditions": [{ "type": "Ready", "status": "False" }] } }),
        ),
        node("node-noagent", json!({})),
        node(
            "node-tainted",
            json!({ "spec": { "taints": [{ "key": "gpu", "value": "yes", "effect": "NoSchedule" }] } }),
        ),
        node("node-small", json!({ "status": { "allocatable": { "cpu": "500m" } } })),
        node("node-wrongzone", json!({ "metadata": { "labels": { "zone": "b" } } })),
    ];
    let p = pod(json!({ "spec": { "nodeSelector": { "kubernetes.io/hostname": "node-wrongzone", "zone": "a" } } }));
    let Placement::None(reasons) = place(&p, &nodes, &[], None) else {
        panic!("nothing fits")
    };
    let got: Vec<(&str, &Unfit)> = reasons.iter().map(|(n, r)| (n.as_str(), r)).collect();
    assert_eq!(
        got,
        [
            ("node-a", &Unfit::IsSource),
            ("node-cordoned", &Unfit::Cordoned),
            ("node-noagent", &Unfit::NoAgent),
            ("node-notready", &Unfit::NotReady),
            ("node-small", &Unfit::NodeSelector),
            ("node-tainted", &Unfit::NodeSelector),
            ("node-wrongzone", &Unfit::NodeSelector),
        ]
    );
    let text = Placement::explain(&reasons);
    assert!(text.contains("node-cordoned is cordoned"), "{text}");
}

#[test]
fn taints_tolerations_resources_and_affinity() {
    let tainted = node(
        "node-t",
        json!({ "spec": { "taints": [{ "key": "gpu", "value": "yes", "effect": "NoSchedule" }] } }),
    );
    let small = node("node-s", json!({ "status": { "allocatable": { "cpu": "500m" } } }));
    let nodes = [node("node-a", json!({})), tainted.clone(), small.clone()];
    let Placement::None(reasons) = place(&pod(json!({})), &nodes, &[], None) else {
        panic!()
    };
    assert!(reasons.contains(&("node-t".into(), Unfit::Taint("gpu=yes:NoSchedule".into()))));
    assert!(reasons.contains(&("node-s".into(), Unfit::Insufficient("cpu"))));

    let tolerant =
        pod(json!({ "spec": { "tolerations": [{ "key": "gpu", "operator": "Exists", "effect": "NoSchedule" }] } }));
    assert_eq!(place(&tolerant, &nodes, &[], None), Placement::Node("node-t".into()));

    let affine = pod(
        json!({ "spec": { "affinity": { "nodeAffinity": { "requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{ "matchExpressions": [{ "key": "kubernetes.io/hostname", "operator": "NotIn", "values": ["node-t"] }] }]
    }}}, "tolerations": [{ "operator": "Exists" }] } }),
    );
    let Placement::None(reasons) = place(&affine, &nodes, &[], None) else {
        panic!()
    };
    assert!(reasons.contains(&("node-t".into(), Unfit::NodeAffinity)));
}

#[test]
fn a_requested_node_is_the_only_candidate() {
    let nodes = [
        node("node-a", json!({})),
        node("node-b", json!({})),
        node("node-c", json!({ "spec": { "unschedulable": true } })),
    ];
    assert_eq!(
        place(&pod(json!({})), &nodes, &[running_on("node-b", "3")], Some("node-b")),
        Placement::Node("node-b".into())
    );
    assert_eq!(
        place(&pod(json!({})), &nodes, &[], Some("node-c")),
        Placement::None(vec![("node-c".into(), Unfit::Cordoned)])
    );
    assert_eq!(
        place(&pod(json!({})), &nodes, &[], Some("node-x")),
        Placement::None(vec![("node-x".into(), Unfit::NotFound)])
    );
}

#[test]
fn pods_without_requests_spread_by_count() {
    // A burst of best-effort pods: each in-flight migration is placed (reserved) on its
    // target, and the next one goes elsewhere instead of to the first node by name.
    let nodes = [
        node("node-a", json!({})),
        node("node-b", json!({})),
        node("node-c", json!({})),
    ];
    let besteffort = pod(json!({ "spec": { "containers": [{ "name": "app", "resources": {} }] } }));
    assert_eq!(place(&besteffort, &nodes, &[], None), Placement::Node("node-b".into()));
    let mut reserved = besteffort.clone();
    reserved.spec.as_mut().unwrap().node_name = Some("node-b".into());
    assert_eq!(
        place(&besteffort, &nodes, std::slice::from_ref(&reserved), None),
        Placement::Node("node-c".into())
    );
}

#[test]
fn a_node_the_migration_gave_up_on_is_never_chosen_again() {
    let nodes = [
        node("node-a", json!({})),
        node("node-b", json!({})),
        node("node-c", json!({})),
    ];
    let nodes_ref: Vec<&Node> = nodes.iter().collect();
    let p = pod(json!({}));
    let has_agent = |_: &str| true;
    let excluded = vec!["node-b".to_string()];
    let input = |excluded| PlacementInput {
        pod: &p,
        source_node: "node-a",
        requested: None,
        nodes: &nodes_ref,
        pods: &[],
        has_agent: &has_agent,
        excluded,
    };
    assert_eq!(choose(&input(&[])), Placement::Node("node-b".into()));
    assert_eq!(choose(&input(&excluded)), Placement::Node("node-c".into()));
    let both = vec!["node-b".to_string(), "node-c".to_string()];
    let Placement::None(reasons) = choose(&input(&both)) else {
        panic!("no node left")
    };
    assert!(reasons.contains(&("node-b".into(), Unfit::GaveUp)), "{reasons:?}");
    assert_eq!(Unfit::GaveUp.to_string(), "stopped answering during this migration");
}
