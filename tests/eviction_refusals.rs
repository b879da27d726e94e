//! The eviction webhook never loses state silently: evictions the API server will refuse
//! start nothing, opt-in spellings, static pods, pods that cannot move.

mod common;

use common::admission::{decide, now, pod, req};
use kube_migrate::{
    admission::eviction::{self, Decision, EvictionRequest, Snapshot},
    api,
};
use serde_json::json;

#[test]
fn an_eviction_the_api_server_will_refuse_starts_nothing() {
    let p = pod("pod-statefulset");
    let other_uid = EvictionRequest {
        precondition_uid: Some("99999999-0000-4000-8000-000000000000"),
        ..req("db-0")
    };
    assert_eq!(decide(&p, &[], other_uid).result(), "allowed_precondition_mismatch");
    let stale_rv = EvictionRequest {
        precondition_resource_version: Some("1"),
        ..req("db-0")
    };
    assert_eq!(decide(&p, &[], stale_rv).result(), "allowed_precondition_mismatch");
    // Matching preconditions change nothing.
    let uid = p.metadata.uid.clone().unwrap();
    let matching = EvictionRequest {
        precondition_uid: Some(&uid),
        ..req("db-0")
    };
    assert_eq!(decide(&p, &[], matching).result(), "started");
}

#[test]
fn opt_in_spellings_and_unknown_values_never_lose_state_silently() {
    let mut p = pod("pod-statefulset");
    for (value, expected) in [
        ("yes", "started"),
        ("1", "started"),
        ("off", "allowed_unmanaged"),
        ("maybe", "started"),
    ] {
        p.metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(api::STATEFUL.into(), value.into());
        assert_eq!(decide(&p, &[], req("db-0")).result(), expected, "{value}");
    }
    let snap = Snapshot {
        pod: Some(&p),
        pod_node_schedulable: Some(false),
        migrations: &[],
        static_on_node: &[],
        now: now(),
    };
    let warnings = eviction::warnings(Some(&p), &snap);
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("\"maybe\" is not a recognized value")),
        "{warnings:?}"
    );
}

#[test]
fn static_pods_never_start_a_migration_and_are_reported() {
    let mut p = pod("pod-statefulset");
    let annotations = p.metadata.annotations.as_mut().unwrap();
    annotations.insert("kubernetes.io/config.mirror".into(), "abc".into());
    let Decision::Allow { result, warning } = decide(&p, &[], req("db-0")) else {
        panic!("a static pod follows its on-failure policy")
    };
    assert_eq!(result, "refused_static_pod");
    assert!(warning.unwrap().contains("static (mirror) pod"));
    p.metadata
        .annotations
        .as_mut()
        .unwrap()
        .insert(api::ON_FAILURE.into(), "block".into());
    let Decision::Block { message } = decide(&p, &[], req("db-0")) else {
        panic!("block keeps refusing")
    };
    assert!(message.contains("shop/db-0 is a static (mirror) pod"), "{message}");
    // Evictions of other pods on that node name it.
    let other = pod("pod-unannotated");
    let statics = vec!["kube-system/etcd-node-a".to_string()];
    let snap = Snapshot {
        pod: Some(&other),
        pod_node_schedulable: Some(false),
        migrations: &[],
        static_on_node: &statics,
        now: now(),
    };
    let warnings = eviction::warnings(Some(&other), &snap);
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("static pod kube-system/etcd-node-a")),
        "{warnings:?}"
    );
}

#[test]
fn host_path_pods_start_a_migration_that_carries_the_refusal() {
    let mut p = pod("pod-statefulset");
    let spec = p.spec.as_mut().unwrap();
    spec.volumes
        .get_or_insert_with(Vec::new)
        .push(serde_json::from_value(json!({ "name": "data", "hostPath": { "path": "/srv/db" } })).unwrap());
    let Decision::Start { refusal, .. } = decide(&p, &[], req("db-0")) else {
        panic!("expected a start")
    };
    assert!(refusal.unwrap().contains("hostPath (/srv/db)"));
}
