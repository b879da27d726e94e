//! Fixtures and shorthands for the webhook decision tests.

use std::sync::Arc;

use k8s_openapi::{api::core::v1::Pod, jiff::Timestamp};
use kube_migrate::{
    admission::eviction::{self, Decision, EvictionRequest, Snapshot},
    api::{self, Phase, PodMigration, PodMigrationSpec, PodMigrationStatus, Trigger},
};

pub fn data(path: &str) -> Vec<u8> {
    std::fs::read(format!("{}/tests/data/{path}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

pub fn pod(name: &str) -> Pod {
    serde_json::from_slice(&data(&format!("objects/{name}.json"))).unwrap()
}

pub fn now() -> Timestamp {
    Timestamp::from_second(1_800_000_000).unwrap()
}

pub fn migration(pod: &Pod, phase: Phase, f: impl FnOnce(&mut PodMigrationStatus)) -> Arc<PodMigration> {
    let name = pod.metadata.name.clone().unwrap();
    let uid = pod.metadata.uid.clone().unwrap();
    let mut pm = PodMigration::new(
        &api::migration_name(&name, &uid),
        PodMigrationSpec {
            pod_name: name,
            pod_uid: uid,
            source_node: "node-a".into(),
            target_node: None,
            trigger: Trigger::Drain,
            policy: Default::default(),
            mode: Default::default(),
            restore_from: None,
        },
    );
    pm.metadata.namespace = Some("shop".into());
    pm.metadata.uid = Some("9e9e9e9e-0000-4000-8000-000000000001".into());
    let mut status = PodMigrationStatus {
        phase,
        target_node: Some("node-b".into()),
        ..Default::default()
    };
    kube_migrate::controller::state::enter(&mut status, phase, now());
    f(&mut status);
    pm.status = Some(status);
    Arc::new(pm)
}

pub fn req<'a>(name: &'a str) -> EvictionRequest<'a> {
    EvictionRequest {
        namespace: "shop",
        pod_name: name,
        dry_run: false,
        stop_source_of: None,
        precondition_uid: None,
        precondition_resource_version: None,
    }
}

pub fn decide(pod: &Pod, migrations: &[Arc<PodMigration>], r: EvictionRequest<'_>) -> Decision {
    eviction::decide(
        &r,
        &Snapshot {
            pod: Some(pod),
            pod_node_schedulable: Some(false),
            migrations,
            static_on_node: &[],
            now: now(),
        },
    )
}
