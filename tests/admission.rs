//! The webhooks' decisions and HTTP answers, from AdmissionReview fixtures in tests/data.

use std::sync::Arc;

use axum::{body::Body, http::Request};
use http_body_util::BodyExt;
use k8s_openapi::{
    api::core::v1::{Node, Pod},
    apimachinery::pkg::apis::meta::v1::Time,
};
use kube::runtime::{reflector, watcher};
use kube_migrate::{
    admission::{
        eviction::{self, Decision, EvictionRequest, Snapshot},
        pod::{self as podmut, PodDecision},
        server::{WebhookState, router},
    },
    api::{self, ContainerCheckpoint, OwnerInfo, Phase, PodMigration, Trigger},
    metrics::Metrics,
    replacement,
};
use serde_json::{Value, json};
use tower::ServiceExt;

mod common;

use common::admission::{data, decide, migration, now, pod, req};

#[test]
fn unannotated_pods_are_evicted_at_once() {
    let p = pod("pod-unannotated");
    assert_eq!(decide(&p, &[], req("web-7d9f-abcde")).result(), "allowed_unmanaged");
}

#[test]
fn a_stateful_pod_starts_a_migration_keyed_by_its_uid() {
    let mut p = pod("pod-replicaset");
    p.metadata
        .annotations
        .as_mut()
        .unwrap()
        .insert(api::TARGET_NODE.into(), "node-c".into());
    let Decision::Start { name, spec, refusal } = decide(&p, &[], req("cache-6d5f7-x2x9q")) else {
        panic!("expected a start")
    };
    assert_eq!(refusal, None);
    assert_eq!(name, "cache-6d5f7-x2x9q-22222222");
    assert_eq!(spec.pod_uid, "22222222-2222-4333-8444-555555555555");
    assert_eq!(spec.source_node, "node-a");
    assert_eq!(spec.target_node.as_deref(), Some("node-c"));
    assert_eq!(spec.trigger, Trigger::Drain);
    assert_eq!(spec.policy.on_failure, api::OnFailure::Block);
}

#[test]
fn a_pod_that_is_not_running_has_no_state_to_save() {
    let mut p = pod("pod-statefulset");
    p.status.as_mut().unwrap().phase = Some("Pending".into());
    assert_eq!(decide(&p, &[], req("db-0")).result(), "allowed_not_running");
}

#[test]
fn dry_run_starts_nothing_and_says_what_would_happen() {
    let p = pod("pod-statefulset");
    let d = decide(
        &p,
        &[],
        EvictionRequest {
            dry_run: true,
            ..req("db-0")
        },
    );
    let Decision::Allow { result, warning } = d else {
        panic!()
    };
    assert_eq!(result, "allowed_dry_run");
    assert!(warning.unwrap().contains("would live-migrate shop/db-0"));
}

#[test]
fn retries_wait_until_the_state_is_safe_on_the_target() {
    let p = pod("pod-statefulset");
    for phase in [Phase::Pending, Phase::Checkpointing, Phase::Transferring] {
        let m = migration(&p, phase, |s| s.message = Some("sending 64 MiB".into()));
        let Decision::Wait { message } = decide(&p, &[m], req("db-0")) else {
            panic!("{phase} must wait")
        };
        assert!(message.contains(&format!("phase {phase}")), "{message}");
        assert!(
            message.contains("node-b") && message.contains("sending 64 MiB"),
            "{message}"
        );
    }
    for phase in [Phase::BuildingImage, Phase::Restoring, Phase::Succeeded] {
        let m = migration(&p, phase, |_| {});
        assert_eq!(decide(&p, &[m], req("db-0")).result(), "allowed_state_safe", "{phase}");
    }
}

#[test]
fn only_the_controllers_own_eviction_passes_once_the_source_may_stop() {
    let p = pod("pod-statefulset");
    let stopping = migration(&p, Phase::Checkpointing, |s| {
        s.source_stop_requested_at = Some(Time(now()))
    });
    let ours = EvictionRequest {
        stop_source_of: Some("db-0-0c9a8d74"),
        ..req("db-0")
    };
    assert_eq!(
        decide(&p, std::slice::from_ref(&stopping), ours.clone()).result(),
        "allowed_source_stop"
    );
    // kubectl's retry at the same moment keeps waiting: the state is not on the target yet.
    assert_eq!(decide(&p, &[stopping], req("db-0")).result(), "waiting");
    // The annotation alone is not enough.
    let not_yet = migration(&p, Phase::Checkpointing, |_| {});
    assert_eq!(decide(&p, &[not_yet], ours).result(), "waiting");
}

#[test]
fn failures_follow_the_pods_current_policy() {
    let mut p = pod("pod-replicaset");
    let failed = migration(&p, Phase::Failed, |s| {
        s.message = Some("no eligible target node".into())
    });
    let Decision::Block { message } = decide(&p, std::slice::from_ref(&failed), req("cache-6d5f7-x2x9q")) else {
        panic!()
    };
    assert!(
        message.contains("no eligible target node") && message.contains("migrate.io/on-failure=evict"),
        "{message}"
    );
    // The operator re-annotates to unblock the drain.
    p.metadata
        .annotations
        .as_mut()
        .unwrap()
        .insert(api::ON_FAILURE.into(), "evict".into());
    assert_eq!(
        decide(&p, &[failed], req("cache-6d5f7-x2x9q")).result(),
        "allowed_failed"
    );
    // A failure after the source stopped never blocks.
    let mut blocked = pod("pod-replicaset");
    blocked
        .metadata
        .annotations
        .as_mut()
        .unwrap()
        .insert(api::ON_FAILURE.into(), "block".into());
    let late = migration(&blocked, Phase::Failed, |s| {
        s.source_stop_requested_at = Some(Time(now()))
    });
    assert_eq!(
        decide(&blocked, &[late], req("cache-6d5f7-x2x9q")).result(),
        "allowed_failed"
    );
}

#[test]
fn a_drain_retry_never_evicts_the_restored_statefulset_pod() {
    let old = pod("pod-statefulset");
    let m = migration(&old, Phase::Restoring, |_| {});
    let mut replacement = pod("pod-statefulset");
    replacement.metadata.uid = Some("0d0d0d0d-9cb7-44dd-b98e-09fd62def2f4".into());
    replacement.spec.as_mut().unwrap().node_name = Some("node-b".into());
    replacement
        .metadata
        .annotations
        .as_mut()
        .unwrap()
        .insert(api::RESTORE_OF.into(), m.metadata.name.clone().unwrap());
    let snap = |schedulable| Snapshot {
        pod: Some(&replacement),
        pod_node_schedulable: Some(schedulable),
        migrations: std::slice::from_ref(&m),
        static_on_node: &[],
        now: now(),
    };
    let Decision::Gone { message } = eviction::decide(&req("db-0"), &snap(true)) else {
        panic!("expected NotFound")
    };
    assert!(message.starts_with("pods \"db-0\" not found"), "{message}");
    // Draining the replacement's own (cordoned) node is a genuine eviction: migrate again.
    assert_eq!(eviction::decide(&req("db-0"), &snap(false)).result(), "started");
}

fn state(pods: &[Pod], migrations: &[Arc<PodMigration>]) -> Arc<WebhookState> {
    kube_migrate::tls::install_crypto_provider();
    let (pod_store, mut pod_writer) = reflector::store::<Pod>();
    for p in pods {
        pod_writer.apply_watcher_event(&watcher::Event::Apply(p.clone()));
    }
    let (node_store, _) = reflector::store::<Node>();
    let (pm_store, mut pm_writer) = reflector::store::<PodMigration>();
    for m in migrations {
        pm_writer.apply_watcher_event(&watcher::Event::Apply((**m).clone()));
    }
    // Unreachable API server: these tests must not need it.
    let client = kube::Client::try_from(kube::Config::new("https://127.0.0.1:1".parse().unwrap())).unwrap();
    Arc::new(WebhookState {
        controller_user: CONTROLLER.into(),
        client,
        pods: pod_store,
        nodes: node_store,
        migrations: pm_store,
        metrics: Arc::new(Metrics::new()),
        namespaces: reflector::store().0,
        helper_image: Default::default(),
        holds: kube_migrate::admission::hold::Holds::off(),
    })
}

const CONTROLLER: &str = "system:serviceaccount:kube-migrate:kube-migrate-webhook";

async fn post(state: Arc<WebhookState>, path: &str, body: Vec<u8>) -> Value {
    let response = router(state)
        .oneshot(Request::post(path).body(Body::from(body)).unwrap())
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        200,
        "the API server needs a 200 with an AdmissionReview"
    );
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let answer: Value = serde_json::from_slice(&bytes).expect("answer is JSON");
    // The API server rejects an answer that is not an admission.k8s.io/v1 AdmissionReview.
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1", "{answer}");
    assert_eq!(answer["kind"], "AdmissionReview", "{answer}");
    answer
}

#[tokio::test]
async fn malformed_reviews_get_a_well_formed_denial() {
    let cases = [
        ("malformed-not-json.txt", "", "not JSON"),
        (
            "malformed-wrong-kind.json",
            "",
            "not an admission.k8s.io/v1 AdmissionReview",
        ),
        ("malformed-no-request.json", "", "has no request"),
        (
            "malformed-bad-operation.json",
            "6b2d2a4e-0007-4c8e-9e57-8a1f0b2c0007",
            "EXPLODE",
        ),
    ];
    for (file, uid, needle) in cases {
        let answer = post(
            state(&[], &[]),
            "/validate/eviction",
            data(&format!("admission/{file}")),
        )
        .await;
        assert_eq!(answer["kind"], "AdmissionReview", "{file}");
        assert_eq!(answer["apiVersion"], "admission.k8s.io/v1", "{file}");
        let response = &answer["response"];
        assert_eq!(response["allowed"], false, "{file}");
        assert_eq!(response["uid"], uid, "{file}: uid recovered when present");
        assert_eq!(response["status"]["code"], 400, "{file}");
        assert!(
            response["status"]["message"].as_str().unwrap().contains(needle),
            "{file}: {response}"
        );
    }
}

#[tokio::test]
async fn an_eviction_of_a_migrating_pod_is_answered_429_too_many_requests() {
    let p = pod("pod-statefulset");
    let m = migration(&p, Phase::Transferring, |_| {});
    let answer = post(
        state(&[p], &[m]),
        "/validate/eviction",
        data("admission/eviction-stateful.json"),
    )
    .await;
    let r = &answer["response"];
    assert_eq!(r["uid"], "6b2d2a4e-0001-4c8e-9e57-8a1f0b2c0001");
    assert_eq!(r["allowed"], false);
    assert_eq!(r["status"]["code"], 429);
    assert_eq!(r["status"]["reason"], "TooManyRequests");
    assert!(
        r["status"].get("details").is_none(),
        "no retryAfterSeconds: client-go would retry inside one attempt"
    );
}

#[tokio::test]
async fn both_dry_run_flags_are_honoured_over_http() {
    for file in ["eviction-dry-run-request.json", "eviction-dry-run-delete-options.json"] {
        // No migration exists and the API server is unreachable: a start would fail loudly.
        let answer = post(
            state(&[pod("pod-statefulset")], &[]),
            "/validate/eviction",
            data(&format!("admission/{file}")),
        )
        .await;
        assert_eq!(answer["response"]["allowed"], true, "{file}");
        assert!(
            answer["response"]["warnings"][0].as_str().unwrap().contains("dry run"),
            "{file}"
        );
    }
}

#[tokio::test]
async fn unannotated_pods_pass_over_http() {
    let answer = post(
        state(&[pod("pod-unannotated")], &[]),
        "/validate/eviction",
        data("admission/eviction-unannotated.json"),
    )
    .await;
    assert_eq!(answer["response"]["allowed"], true);
    assert_eq!(answer["response"]["uid"], "6b2d2a4e-0002-4c8e-9e57-8a1f0b2c0002");
}

fn patched(answer: &Value, original: &Value) -> Value {
    let r = &answer["response"];
    assert_eq!(r["allowed"], true);
    assert_eq!(r["patchType"], "JSONPatch");
    // kube-core serializes the patch bytes as a JSON array of numbers, which the API
    // server's decoder accepts for a []byte field.
    let bytes: Vec<u8> = serde_json::from_value(r["patch"].clone()).expect("patch bytes");
    let patch: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
    let mut doc = original.clone();
    json_patch::patch(&mut doc, &patch).unwrap();
    doc
}

#[tokio::test]
async fn a_statefulset_replacement_is_gated_pinned_and_swapped() {
    let old = pod("pod-statefulset");
    let m = migration(&old, Phase::Restoring, |s| {
        s.owner = Some(OwnerInfo {
            api_version: "apps/v1".into(),
            kind: "StatefulSet".into(),
            name: "db".into(),
            uid: "5f1e0000-0000-4000-8000-00000000aaaa".into(),
        });
        s.containers = vec![ContainerCheckpoint {
            name: "app".into(),
            image: Some("127.0.0.1:5443/kube-migrate/x:app".into()),
            ..Default::default()
        }];
    });
    let review: Value = serde_json::from_slice(&data("admission/pod-create-statefulset.json")).unwrap();
    let answer = post(
        state(&[], std::slice::from_ref(&m)),
        "/mutate/pod",
        data("admission/pod-create-statefulset.json"),
    )
    .await;
    let pod = patched(&answer, &review["request"]["object"]);
    assert_eq!(pod["metadata"]["annotations"][api::RESTORE_OF], json!(m.metadata.name));
    assert_eq!(pod["spec"]["schedulingGates"], json!([{ "name": api::RESTORE_GATE }]));
    assert_eq!(
        pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"],
        json!([{ "matchFields": [{ "key": "metadata.name", "operator": "In", "values": ["node-b"] }] }])
    );
    assert_eq!(
        pod["spec"]["containers"][0]["image"],
        "127.0.0.1:5443/kube-migrate/x:app"
    );
}

#[tokio::test]
async fn unrelated_pods_pass_untouched() {
    let old = pod("pod-statefulset");
    let m = migration(&old, Phase::Restoring, |_| {});
    let answer = post(
        state(&[], &[m]),
        "/mutate/pod",
        data("admission/pod-create-unrelated.json"),
    )
    .await;
    assert_eq!(answer["response"]["allowed"], true);
    assert!(answer["response"].get("patch").is_none());
}

fn rs_owner() -> OwnerInfo {
    OwnerInfo {
        api_version: "apps/v1".into(),
        kind: "ReplicaSet".into(),
        name: "cache-6d5f7".into(),
        uid: "5f1e0000-0000-4000-8000-00000000bbbb".into(),
    }
}

#[test]
fn replicaset_replacements_bind_when_unambiguous_and_gate_otherwise() {
    let review: Value = serde_json::from_slice(&data("admission/pod-create-replicaset.json")).unwrap();
    let new: Pod = serde_json::from_value(review["request"]["object"].clone()).unwrap();
    let a = pod("pod-replicaset");
    let mut b = pod("pod-replicaset");
    b.metadata.name = Some("cache-6d5f7-zzzzz".into());
    b.metadata.uid = Some("44444444-2222-4333-8444-555555555555".into());
    let ma = migration(&a, Phase::Transferring, |s| s.owner = Some(rs_owner()));
    let mb = migration(&b, Phase::Checkpointing, |s| s.owner = Some(rs_owner()));
    assert_eq!(
        podmut::decide(&new, std::slice::from_ref(&ma)),
        PodDecision::Restore {
            migration: ma.metadata.name.clone().unwrap()
        }
    );
    let PodDecision::GateForOwner { owner_uid, candidates } = podmut::decide(&new, &[ma.clone(), mb]) else {
        panic!()
    };
    assert_eq!(owner_uid, rs_owner().uid);
    assert_eq!(candidates.len(), 2);
    // A migration that already has its replacement is not a candidate.
    let bound = migration(&a, Phase::Restoring, |s| {
        s.owner = Some(rs_owner());
        s.replacement = Some(api::PodRef {
            name: "cache-6d5f7-aaaaa".into(),
            uid: None,
        });
    });
    assert_eq!(podmut::decide(&new, &[bound]), PodDecision::Untouched);
    // Nor is a finished one.
    let done = migration(&a, Phase::Succeeded, |s| s.owner = Some(rs_owner()));
    assert_eq!(podmut::decide(&new, &[done]), PodDecision::Untouched);
}

#[test]
fn a_bare_pod_is_recreated_under_its_name() {
    let review: Value = serde_json::from_slice(&data("admission/pod-create-bare.json")).unwrap();
    let new: Pod = serde_json::from_value(review["request"]["object"].clone()).unwrap();
    let old = pod("pod-bare-two-containers");
    let m = migration(&old, Phase::Restoring, |_| {});
    assert_eq!(
        podmut::decide(&new, std::slice::from_ref(&m)),
        PodDecision::Restore {
            migration: m.metadata.name.clone().unwrap()
        }
    );
}

#[test]
fn pinning_narrows_existing_affinity_and_is_idempotent() {
    let mut p = pod("pod-statefulset");
    p.spec.as_mut().unwrap().affinity = Some(
        serde_json::from_value(json!({
            "nodeAffinity": { "requiredDuringSchedulingIgnoredDuringExecution": { "nodeSelectorTerms": [
                { "matchExpressions": [{ "key": "disk", "operator": "In", "values": ["ssd"] }] },
                { "matchExpressions": [{ "key": "zone", "operator": "Exists" }] }
            ]}}
        }))
        .unwrap(),
    );
    let m = migration(&p, Phase::Restoring, |_| {});
    let mut once = p.clone();
    replacement::apply_restore(&mut once, &m);
    let mut twice = once.clone();
    replacement::apply_restore(&mut twice, &m);
    assert_eq!(once, twice);
    let terms = &once
        .spec
        .as_ref()
        .unwrap()
        .affinity
        .as_ref()
        .unwrap()
        .node_affinity
        .as_ref()
        .unwrap()
        .required_during_scheduling_ignored_during_execution
        .as_ref()
        .unwrap()
        .node_selector_terms;
    assert_eq!(terms.len(), 2);
    for t in terms {
        assert_eq!(
            t.match_expressions.as_ref().unwrap().len(),
            1,
            "existing requirements kept"
        );
        assert_eq!(
            t.match_fields.as_ref().unwrap()[0].values.as_ref().unwrap(),
            &["node-b".to_string()]
        );
    }
    assert!(replacement::is_gated(&once));
    replacement::remove_gate(&mut once);
    assert!(!replacement::is_gated(&once));
}

#[test]
fn a_stored_checkpoint_never_lets_a_drain_through_or_gates_new_pods() {
    let p = pod("pod-replicaset");
    let mut backup = (*migration(&p, Phase::Succeeded, |s| s.owner = Some(rs_owner()))).clone();
    backup.spec.mode = api::Mode::Checkpoint;
    let backup = Arc::new(backup);
    assert_eq!(
        decide(&p, std::slice::from_ref(&backup), req("cache-6d5f7-x2x9q")).result(),
        "started"
    );
    let mut running = (*migration(&p, Phase::Checkpointing, |s| s.owner = Some(rs_owner()))).clone();
    running.spec.mode = api::Mode::Checkpoint;
    let review: Value = serde_json::from_slice(&data("admission/pod-create-replicaset.json")).unwrap();
    let new: Pod = serde_json::from_value(review["request"]["object"].clone()).unwrap();
    assert_eq!(podmut::decide(&new, &[Arc::new(running)]), PodDecision::Untouched);
}

#[test]
fn a_restored_pod_remembers_what_it_really_runs() {
    let mut p = pod("pod-statefulset");
    let m = migration(&p, Phase::Restoring, |s| {
        s.containers = vec![ContainerCheckpoint {
            name: "app".into(),
            image: Some("127.0.0.1:5443/kube-migrate/x:app".into()),
            ..Default::default()
        }];
    });
    let original = p.clone();
    replacement::apply_restore(&mut p, &m);
    replacement::add_pull_secrets(&mut p, [m.metadata.name.as_deref().unwrap_or_default()]);
    replacement::remove_gate(&mut p);
    assert_eq!(
        p.spec.as_ref().unwrap().containers[0].image.as_deref(),
        Some("127.0.0.1:5443/kube-migrate/x:app")
    );
    assert_eq!(api::original_images(&p)["app"], "registry.local/counter:1");
    // Swapping again (a retry) keeps the first original, not the checkpoint image.
    replacement::apply_restore(&mut p, &m);
    assert_eq!(api::original_images(&p)["app"], "registry.local/counter:1");
    // What a later migration or backup recreates is the pod as its owner meant it.
    let clean = replacement::without_restore(&p);
    assert_eq!(clean.spec, original.spec);
    assert_eq!(clean.metadata.annotations, original.metadata.annotations);
}

#[tokio::test]
async fn the_stop_source_mark_is_honoured_from_the_controller_only() {
    let p = pod("pod-statefulset");
    let m = migration(&p, Phase::Checkpointing, |s| {
        s.source_stop_requested_at = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now()));
    });
    let mut review: Value = serde_json::from_slice(&data("admission/eviction-controller-stop.json")).unwrap();
    // A user who can evict forges the controller's mark: the migration is under way, so 429.
    let forged = post(
        state(std::slice::from_ref(&p), std::slice::from_ref(&m)),
        "/validate/eviction",
        serde_json::to_vec(&review).unwrap(),
    )
    .await;
    assert_eq!(review["request"]["userInfo"]["username"], "kubernetes-admin");
    assert_eq!(forged["response"]["allowed"], false, "{forged}");
    assert_eq!(forged["response"]["status"]["code"], 429, "{forged}");
    // The same eviction from the controller's identity stops the source.
    review["request"]["userInfo"]["username"] = CONTROLLER.into();
    let ours = post(
        state(&[p], &[m]),
        "/validate/eviction",
        serde_json::to_vec(&review).unwrap(),
    )
    .await;
    assert_eq!(ours["response"]["allowed"], true, "{ours}");
}
