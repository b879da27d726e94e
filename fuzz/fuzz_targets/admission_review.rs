//! AdmissionReview bodies: `admission::review::parse`, then every decision the webhooks make
//! without a cluster, on what the body holds.
//!
//! Input: an HTTP request body as the API server would send it. The cluster's side (the pod
//! an eviction names, the namespace's PodMigrations) comes from the body too: the pod is the
//! request's `object` when it is a Pod, else its `oldObject`; migrations are made for that
//! pod in a phase, mode and shape picked from the request uid (a string the fuzzer controls).
//!
//! Checked beyond "no panic":
//! * every answer (allow, deny, invalid) serialises, and carries the request uid;
//! * the eviction and pod decisions are deterministic; a started migration is named and
//!   specified for the pod it starts for;
//! * a pod mutation's JSON patch, applied to the pod, gives exactly the mutated pod, and
//!   `apply_restore` is idempotent as documented.
#![no_main]

use std::sync::Arc;

use k8s_openapi::{
    api::{core::v1::Pod, policy::v1::Eviction},
    jiff::Timestamp,
};
use kube::core::{DynamicObject, admission::AdmissionRequest};
use kube_migrate::{
    admission::{
        eviction::{self, Decision, EvictionRequest, Snapshot},
        pod::{self, PodDecision},
        review,
    },
    api::{self, Mode, OwnerInfo, Phase, PodMigration, PodMigrationSpec, PodMigrationStatus, PodRef, Trigger},
    controller::state,
    preflight,
};
use libfuzzer_sys::fuzz_target;

fn now() -> Timestamp {
    Timestamp::from_second(1_800_000_000).expect("fixed time")
}

fn typed<T: serde::de::DeserializeOwned>(object: &DynamicObject) -> Option<T> {
    serde_json::to_value(object)
        .ok()
        .and_then(|v| serde_json::from_value(v).ok())
}

/// Migrations of `pod` in a shape picked by `sel`.
fn migrations(pod: &Pod, sel: u64) -> Vec<Arc<PodMigration>> {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let pick = |n: u64, shift: u32| (sel >> shift) % n;
    let phase = Phase::ALL[pick(7, 0) as usize];
    let mode = [Mode::Migrate, Mode::Checkpoint, Mode::Restore][pick(3, 3) as usize];
    let owner = pod::controller_uid(pod).filter(|_| pick(2, 5) == 0).map(|o| OwnerInfo {
        api_version: "apps/v1".into(),
        kind: ["ReplicaSet", "StatefulSet"][pick(2, 6) as usize].into(),
        name: "owner".into(),
        uid: o.to_string(),
    });
    let mut out = Vec::new();
    for i in 0..=pick(3, 7) {
        let pod_uid = if i == 0 { uid.clone() } else { format!("{uid}-{i}") };
        let mut pm = PodMigration::new(
            &api::migration_name(&name, &pod_uid),
            PodMigrationSpec {
                pod_name: name.clone(),
                pod_uid,
                source_node: "node-a".into(),
                target_node: None,
                trigger: Trigger::Drain,
                policy: Default::default(),
                mode,
                restore_from: None,
            },
        );
        pm.metadata.namespace = pod.metadata.namespace.clone();
        let mut status = PodMigrationStatus {
            owner: owner.clone(),
            target_node: (pick(2, 9) == 0).then(|| "node-b".into()),
            message: (pick(2, 10) == 0).then(|| "something happened".into()),
            ..Default::default()
        };
        state::enter(&mut status, phase, now());
        if pick(2, 11) == 0 {
            status.source_stop_requested_at = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now()));
        }
        if pick(2, 12) == 0 {
            status.replacement = Some(PodRef {
                name: "replacement".into(),
                uid: None,
            });
        }
        if pick(2, 13) == 0 {
            status.containers = pod
                .spec
                .iter()
                .flat_map(|s| &s.containers)
                .map(|c| api::ContainerCheckpoint {
                    name: c.name.clone(),
                    image: Some(format!("localhost/kube-migrate/x:{}", c.name)),
                    ..Default::default()
                })
                .collect();
        }
        pm.status = Some(status);
        out.push(Arc::new(pm));
    }
    // The name a restored pod would carry, so that stale-retry answers are reachable.
    if let Some(restore_of) = api::restore_of(pod)
        && pick(2, 14) == 0
        && let Some(first) = out.first()
    {
        let mut m = (**first).clone();
        m.metadata.name = Some(restore_of.to_string());
        m.spec.pod_uid = format!("{}-old", m.spec.pod_uid);
        out.push(Arc::new(m));
    }
    out
}

fn answer_ok(request: &AdmissionRequest<DynamicObject>, response: kube::core::admission::AdmissionResponse) {
    assert_eq!(response.uid, request.uid);
    let review = response.into_review();
    serde_json::to_vec(&review).expect("answer serialises");
}

fn check_pod_decisions(request: &AdmissionRequest<DynamicObject>, pod: &Pod, ms: &[Arc<PodMigration>]) {
    let _ = preflight::check_pod(pod);
    let _ = preflight::warnings(pod);
    let _ = preflight::empty_dir_mounts(pod);
    let _ = (
        api::stateful_warning(pod),
        api::on_failure(pod),
        api::requested_target(pod),
    );
    let _ = api::original_images(pod);

    let decision = pod::decide(pod, ms);
    assert_eq!(decision, pod::decide(pod, ms), "pod decision is not deterministic");
    let mut mutated = pod.clone();
    match &decision {
        PodDecision::Untouched => return,
        PodDecision::Restore { migration } => {
            let m = ms
                .iter()
                .find(|m| m.metadata.name.as_deref() == Some(migration))
                .expect("restore names a migration it was given");
            pod::apply_restore(&mut mutated, m);
            let once = mutated.clone();
            pod::apply_restore(&mut mutated, m);
            assert_eq!(once, mutated, "apply_restore is not idempotent");
            pod::add_pull_secrets(&mut mutated, [migration.as_str()]);
        }
        PodDecision::GateForOwner { owner_uid, candidates } => {
            pod::gate_for_owner(&mut mutated, owner_uid);
            pod::add_pull_secrets(&mut mutated, candidates.iter().map(String::as_str));
        }
    }
    pod::add_restore_helper(&mut mutated, "localhost/kube-migrate/agent:fuzz");
    let patch = pod::patch(pod, &mutated).expect("patch");
    let mut doc = serde_json::to_value(pod).expect("pod as JSON");
    json_patch::patch(&mut doc, &patch).expect("patch applies to the pod it was made from");
    assert_eq!(doc, serde_json::to_value(&mutated).expect("mutated as JSON"));
    let response = review::allow(request, None)
        .with_patch(patch)
        .expect("patch serialises");
    answer_ok(request, response);
}

fn check_eviction(request: &AdmissionRequest<DynamicObject>, pod: Option<&Pod>, ms: &[Arc<PodMigration>]) {
    let eviction: Option<Eviction> = request.object.as_ref().and_then(typed);
    let options = eviction.as_ref().and_then(|e| e.delete_options.as_ref());
    let preconditions = options.and_then(|o| o.preconditions.as_ref());
    let req = EvictionRequest {
        namespace: request.namespace.as_deref().unwrap_or_default(),
        pod_name: &request.name,
        dry_run: request.dry_run || options.and_then(|o| o.dry_run.as_ref()).is_some_and(|d| !d.is_empty()),
        stop_source_of: eviction
            .as_ref()
            .and_then(|e| e.metadata.annotations.as_ref())
            .and_then(|a| a.get(api::STOP_SOURCE_OF))
            .map(String::as_str),
        precondition_uid: preconditions.and_then(|p| p.uid.as_deref()),
        precondition_resource_version: preconditions.and_then(|p| p.resource_version.as_deref()),
    };
    let static_on_node = vec![format!("kube-system/{}", request.name)];
    let snap = Snapshot {
        pod,
        pod_node_schedulable: [None, Some(true), Some(false)][request.uid.len() % 3],
        migrations: ms,
        static_on_node: if request.uid.len().is_multiple_of(5) {
            &static_on_node
        } else {
            &[]
        },
        now: now(),
    };
    let decision = eviction::decide(&req, &snap);
    assert_eq!(
        decision,
        eviction::decide(&req, &snap),
        "eviction decision is not deterministic"
    );
    let _ = decision.result();
    let _ = eviction::warnings(pod, &snap);
    let response = match decision {
        Decision::Allow { warning, .. } => review::allow(request, warning),
        Decision::Start { name, spec, .. } => {
            let pod = pod.expect("a migration starts only for a pod");
            let uid = pod.metadata.uid.as_deref().unwrap_or_default();
            assert_eq!(spec.pod_uid, uid);
            assert_eq!(spec.pod_name, request.name);
            assert_eq!(name, api::migration_name(&request.name, uid));
            assert!(api::is_stateful(pod), "a migration starts only for an opted-in pod");
            review::deny(request, 429, "TooManyRequests", name)
        }
        Decision::Wait { message } | Decision::Block { message } => {
            review::deny(request, 429, "TooManyRequests", message)
        }
        Decision::Gone { message } => review::deny(request, 404, "NotFound", message),
    };
    answer_ok(request, response);
}

fuzz_target!(|body: &[u8]| {
    let request = match review::parse(body) {
        Ok(r) => r,
        Err((error, uid)) => {
            let _ = error.metric_label();
            serde_json::to_vec(&review::invalid(uid, &error)).expect("invalid answer serialises");
            return;
        }
    };
    assert!(!request.uid.is_empty());
    let object_pod: Option<Pod> = request.object.as_ref().and_then(typed);
    let old_pod: Option<Pod> = request.old_object.as_ref().and_then(typed);
    let pod = object_pod.as_ref().or(old_pod.as_ref());
    let sel = request
        .uid
        .bytes()
        .fold(0u64, |a, b| a.wrapping_mul(31).wrapping_add(u64::from(b)));
    let ms = pod.map(|p| migrations(p, sel)).unwrap_or_default();
    if let Some(p) = object_pod.as_ref() {
        check_pod_decisions(&request, p, &ms);
    }
    check_eviction(&request, pod, &ms);
});
