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
        volumes: &[],
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
        volumes: &[],
    };
    assert_eq!(choose(&input(&[])), Placement::Node("node-b".into()));
    assert_eq!(choose(&input(&excluded)), Placement::Node("node-c".into()));
    let both = vec!["node-b".to_string(), "node-c".to_string()];
    let Placement::None(reasons) = choose(&input(&both)) else {
        panic!("no node left")
    };
    assert!(reasons.contains(&("node-b".into(), Unfit::GaveUp)), "{reasons:?}");
    assert_eq!(
        Unfit::GaveUp.to_string(),
        "was given up during this migration (see its Events)"
    );
}

/// A pod labelled `labels` bound to `node`, with its own uid.
fn labelled_on(name: &str, node: &str, labels: serde_json::Value, extra: serde_json::Value) -> Pod {
    let mut p = json!({
        "metadata": { "name": name, "namespace": "shop", "uid": format!("uid-{name}"), "labels": labels },
        "spec": { "nodeName": node, "containers": [{ "name": "c" }] }
    });
    merge(&mut p, extra);
    serde_json::from_value(p).unwrap()
}

fn zoned(name: &str, zone: &str) -> Node {
    node(name, json!({ "metadata": { "labels": { "zone": zone } } }))
}

fn reason_of(placement: Placement, node: &str) -> Unfit {
    let Placement::None(reasons) = placement else {
        panic!("expected no placement, got {placement:?}");
    };
    reasons.into_iter().find(|(n, _)| n == node).expect("node listed").1
}

#[test]
fn required_pod_anti_affinity_keeps_replicas_apart_both_ways() {
    let anti = json!({ "spec": { "affinity": { "podAntiAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": [{
            "labelSelector": { "matchLabels": { "app": "db" } },
            "topologyKey": "kubernetes.io/hostname"
        }]
    } } } });
    let me = pod(json!({ "metadata": { "uid": "uid-db-0", "labels": { "app": "db" } } }));
    let mut me_anti = me.clone();
    let mut v = serde_json::to_value(&me_anti).unwrap();
    merge(&mut v, anti.clone());
    me_anti = serde_json::from_value(v).unwrap();
    let nodes = [
        node("node-a", json!({})),
        node("node-b", json!({})),
        node("node-c", json!({})),
    ];
    // node-c is busier, but node-b holds another replica.
    let pods = [
        labelled_on("db-1", "node-b", json!({ "app": "db" }), json!({})),
        running_on("node-c", "2"),
    ];
    assert_eq!(place(&me_anti, &nodes, &pods, None), Placement::Node("node-c".into()));
    // Without its own rule the pod would go to the less loaded node-b ...
    assert_eq!(place(&me, &nodes, &pods, None), Placement::Node("node-b".into()));
    // ... unless the replica there carries the rule: the scheduler enforces it both ways.
    let pods_anti = [
        labelled_on("db-1", "node-b", json!({ "app": "db" }), anti.clone()),
        running_on("node-c", "2"),
    ];
    assert_eq!(place(&me, &nodes, &pods_anti, None), Placement::Node("node-c".into()));
    assert_eq!(
        reason_of(place(&me, &nodes, &pods_anti, Some("node-b")), "node-b"),
        Unfit::PodAntiAffinity("db-1".into())
    );
}

#[test]
fn the_pods_own_source_copy_does_not_repel_it() {
    // Zone-wide anti-affinity: the source copy on node-a (zone z1) is leaving, so node-b in
    // the same zone is fine; a terminating replica does not count either.
    let anti = json!({ "metadata": { "uid": "uid-db-0", "labels": { "app": "db" } }, "spec": { "affinity": { "podAntiAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": [{
            "labelSelector": { "matchLabels": { "app": "db" } }, "topologyKey": "zone"
        }]
    } } } });
    let me = pod(anti);
    let nodes = [zoned("node-a", "z1"), zoned("node-b", "z1")];
    let source_copy = me.clone();
    let gone = labelled_on(
        "db-9",
        "node-b",
        json!({ "app": "db" }),
        json!({ "metadata": { "deletionTimestamp": "2026-11-28T08:00:00Z" } }),
    );
    assert_eq!(
        place(&me, &nodes, &[source_copy.clone(), gone], None),
        Placement::Node("node-b".into())
    );
    let live = labelled_on("db-1", "node-b", json!({ "app": "db" }), json!({}));
    assert_eq!(
        reason_of(place(&me, &nodes, &[source_copy, live], None), "node-b"),
        Unfit::PodAntiAffinity("db-1".into())
    );
}

#[test]
fn required_pod_affinity_follows_its_peer() {
    let with_cache = pod(
        json!({ "metadata": { "labels": { "app": "web" } }, "spec": { "affinity": { "podAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": [{
            "labelSelector": { "matchLabels": { "app": "cache" } }, "topologyKey": "kubernetes.io/hostname"
        }]
    } } } }),
    );
    let nodes = [
        node("node-a", json!({})),
        node("node-b", json!({})),
        node("node-c", json!({})),
    ];
    let pods = [
        labelled_on("cache-0", "node-c", json!({ "app": "cache" }), json!({})),
        running_on("node-c", "2"),
    ];
    assert_eq!(
        place(&with_cache, &nodes, &pods, None),
        Placement::Node("node-c".into())
    );
    // The peer lives in another namespace: the term (own namespace by default) finds nothing.
    let elsewhere = [labelled_on(
        "cache-0",
        "node-c",
        json!({ "app": "cache" }),
        json!({ "metadata": { "namespace": "other" } }),
    )];
    assert_eq!(
        reason_of(place(&with_cache, &nodes, &elsewhere, None), "node-b"),
        Unfit::PodAffinity
    );
    // A pod that matches its own term is the first of its group and may go anywhere.
    let self_affine = pod(
        json!({ "metadata": { "labels": { "app": "cache" } }, "spec": { "affinity": { "podAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": [{
            "labelSelector": { "matchLabels": { "app": "cache" } }, "topologyKey": "kubernetes.io/hostname"
        }]
    } } } }),
    );
    assert_eq!(place(&self_affine, &nodes, &[], None), Placement::Node("node-b".into()));
}

#[test]
fn hard_topology_spread_is_kept_and_the_drained_node_is_not_a_domain() {
    let spread = |skew: i32| {
        pod(
            json!({ "metadata": { "uid": "uid-web-0", "labels": { "app": "web" } }, "spec": { "topologySpreadConstraints": [{
            "maxSkew": skew, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "DoNotSchedule",
            "labelSelector": { "matchLabels": { "app": "web" } }
        }] } }),
        )
    };
    let nodes = [
        node("node-a", json!({ "spec": { "unschedulable": true } })),
        node("node-b", json!({})),
        node("node-c", json!({})),
        node("node-d", json!({})),
    ];
    let web = |name: &str, node: &str| labelled_on(name, node, json!({ "app": "web" }), json!({}));
    // b:2 c:1 d:1, node-a (the source, being drained) is not counted as an empty domain.
    let pods = [
        web("web-1", "node-b"),
        web("web-2", "node-b"),
        web("web-3", "node-c"),
        web("web-4", "node-d"),
        running_on("node-c", "3"),
    ];
    assert_eq!(place(&spread(1), &nodes, &pods, None), Placement::Node("node-d".into()));
    assert_eq!(
        reason_of(place(&spread(1), &nodes, &pods, Some("node-b")), "node-b"),
        Unfit::TopologySpread("kubernetes.io/hostname".into())
    );
    // A looser skew lets the least loaded node take it.
    assert_eq!(
        place(&spread(2), &nodes, &pods[..4], Some("node-b")),
        Placement::Node("node-b".into())
    );
    // ScheduleAnyway is a preference, not a rule.
    let soft = pod(
        json!({ "metadata": { "labels": { "app": "web" } }, "spec": { "topologySpreadConstraints": [{
        "maxSkew": 1, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "ScheduleAnyway",
        "labelSelector": { "matchLabels": { "app": "web" } }
    }] } }),
    );
    assert_eq!(
        place(&soft, &nodes, &pods, Some("node-b")),
        Placement::Node("node-b".into())
    );
}

#[test]
fn a_node_without_the_topology_key_cannot_take_a_spread_pod() {
    let p = pod(
        json!({ "metadata": { "labels": { "app": "web" } }, "spec": { "topologySpreadConstraints": [{
        "maxSkew": 1, "topologyKey": "zone", "whenUnsatisfiable": "DoNotSchedule",
        "labelSelector": { "matchLabels": { "app": "web" } }
    }] } }),
    );
    let nodes = [zoned("node-a", "z1"), node("node-b", json!({})), zoned("node-c", "z2")];
    assert_eq!(place(&p, &nodes, &[], None), Placement::Node("node-c".into()));
    assert_eq!(
        reason_of(place(&p, &nodes, &[], Some("node-b")), "node-b"),
        Unfit::TopologySpread("zone".into())
    );
}

#[test]
fn a_zonal_persistent_volume_keeps_the_pod_in_its_zone() {
    // An RWO disk attachable in zone "a" only (a CSI driver's topology): the pod may move to
    // another node of zone "a", never to the emptier node of zone "b", as the scheduler's
    // volume binding decides for the replacement anyway.
    let nodes = [zoned("node-a", "a"), zoned("node-b", "b"), zoned("node-c", "a")];
    let nodes_ref: Vec<&Node> = nodes.iter().collect();
    let load = [running_on("node-c", "2")];
    let load_ref: Vec<&Pod> = load.iter().collect();
    let p = pod(json!({}));
    let pv: k8s_openapi::api::core::v1::PersistentVolume = serde_json::from_value(json!({
        "metadata": { "name": "pvc-1234" },
        "spec": { "csi": { "driver": "disk.csi.example", "volumeHandle": "vol-1" },
                  "nodeAffinity": { "required": { "nodeSelectorTerms": [
                      { "matchExpressions": [{ "key": "zone", "operator": "In", "values": ["a"] }] }] } } }
    }))
    .unwrap();
    let has_agent = |_: &str| true;
    let input = |volumes| PlacementInput {
        pod: &p,
        source_node: "node-a",
        requested: None,
        nodes: &nodes_ref,
        pods: &load_ref,
        has_agent: &has_agent,
        excluded: &[],
        volumes,
    };
    assert_eq!(
        choose(&input(&[])),
        Placement::Node("node-b".into()),
        "least loaded without the volume"
    );
    let with = [pv];
    assert_eq!(choose(&input(&with)), Placement::Node("node-c".into()));
    let only_b = PlacementInput {
        requested: Some("node-b"),
        ..input(&with)
    };
    let reason = reason_of(choose(&only_b), "node-b");
    assert_eq!(reason, Unfit::VolumeAffinity("pvc-1234".into()));
    assert_eq!(
        reason.to_string(),
        "is outside the node affinity of PersistentVolume pvc-1234"
    );
}
