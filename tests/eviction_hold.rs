//! An eviction of a migrating pod is held open until the migration's state is safe, so that
//! kubectl drain does not sleep 5 s after a 429; the hold ends within the API server's deadline.

use std::{sync::Arc, time::Duration};

use axum::{body::Body, http::Request};
use http_body_util::BodyExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::runtime::{reflector, watcher};
use kube_migrate::{
    admission::{
        eviction::Decision,
        hold::Holds,
        server::{WebhookState, router},
    },
    api::{Phase, PodMigration},
    metrics::Metrics,
};
use serde_json::Value;
use tokio::{sync::watch, time::Instant};
use tower::ServiceExt;

mod common;

use common::admission::{data, migration, pod};

struct Cluster {
    state: Arc<WebhookState>,
    pods: reflector::store::Writer<Pod>,
    migrations: reflector::store::Writer<PodMigration>,
    changed: watch::Sender<()>,
}

fn cluster(pod: Pod, m: Arc<PodMigration>, hold: Duration, at_once: usize) -> Cluster {
    kube_migrate::tls::install_crypto_provider();
    let (pods, mut pod_writer) = reflector::store::<Pod>();
    pod_writer.apply_watcher_event(&watcher::Event::Apply(pod));
    let (migration_store, mut migrations) = reflector::store::<PodMigration>();
    migrations.apply_watcher_event(&watcher::Event::Apply((*m).clone()));
    let (changed, on_change) = watch::channel(());
    let client = kube::Client::try_from(kube::Config::new("https://127.0.0.1:1".parse().unwrap())).unwrap();
    let state = Arc::new(WebhookState {
        controller_user: "system:serviceaccount:kube-migrate:kube-migrate-webhook".into(),
        client,
        pods,
        nodes: reflector::store::<Node>().0,
        migrations: migration_store,
        metrics: Arc::new(Metrics::new()),
        namespaces: reflector::store().0,
        helper_image: Default::default(),
        holds: Holds::new(hold, at_once, on_change),
    });
    Cluster {
        state,
        pods: pod_writer,
        migrations,
        changed,
    }
}

/// POST the stateful pod's eviction as the API server does, `timeout` in the query.
async fn evict(state: Arc<WebhookState>, timeout: &str) -> Value {
    let request = Request::post(format!("/validate/eviction?timeout={timeout}"))
        .body(Body::from(data("admission/eviction-stateful.json")))
        .unwrap();
    let response = router(state).oneshot(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&bytes).unwrap()
}

fn metric(state: &WebhookState, prefix: &str) -> f64 {
    let text = state.metrics.encode().unwrap();
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(start_paused = true)]
async fn a_held_eviction_is_allowed_as_soon_as_the_state_is_safe() {
    let p = pod("pod-statefulset");
    let m = migration(&p, Phase::Transferring, |_| {});
    let mut c = cluster(p.clone(), Arc::clone(&m), Duration::from_secs(10), 4);
    let started = Instant::now();
    let answer = tokio::spawn(evict(Arc::clone(&c.state), "15s"));

    // A change that does not make the state safe keeps the request held.
    tokio::time::sleep(Duration::from_millis(700)).await;
    c.changed.send_replace(());
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(!answer.is_finished(), "still held while Transferring");

    // The controller writes BuildingImage (verified on the target): the eviction goes through.
    let safe = migration(&p, Phase::BuildingImage, |_| {});
    c.migrations
        .apply_watcher_event(&watcher::Event::Apply((*safe).clone()));
    c.changed.send_replace(());
    let answer = answer.await.unwrap();
    let r = &answer["response"];
    assert_eq!(r["allowed"], true, "{answer}");
    assert_eq!(r["uid"], "6b2d2a4e-0001-4c8e-9e57-8a1f0b2c0001");
    assert!(
        r["warnings"][0].as_str().unwrap().contains("is safe on node node-b"),
        "{answer}"
    );
    assert_eq!(started.elapsed(), Duration::from_millis(1400));
    assert_eq!(
        metric(
            &c.state,
            "kube_migrate_eviction_hold_seconds_count{outcome=\"allowed_state_safe\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &c.state,
            "kube_migrate_webhook_decisions_total{webhook=\"eviction\",result=\"allowed_state_safe\"}"
        ),
        1.0
    );
}

/// The source is removed (killed, seen gone) before this replica's migration cache shows the
/// state safe: the hold goes on until it does, and the answer says where the state went.
#[tokio::test(start_paused = true)]
async fn a_source_removed_before_the_cache_shows_its_state_safe_is_still_answered_by_it() {
    let p = pod("pod-statefulset");
    let m = migration(&p, Phase::Transferring, |_| {});
    let mut c = cluster(p.clone(), m, Duration::from_secs(10), 4);
    let answer = tokio::spawn(evict(Arc::clone(&c.state), "15s"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.pods.apply_watcher_event(&watcher::Event::Delete(p.clone()));
    c.changed.send_replace(());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!answer.is_finished(), "no pod, but its migration runs: still held");
    let safe = migration(&p, Phase::BuildingImage, |_| {});
    c.migrations
        .apply_watcher_event(&watcher::Event::Apply((*safe).clone()));
    c.changed.send_replace(());
    let answer = answer.await.unwrap();
    assert_eq!(answer["response"]["allowed"], true, "{answer}");
    assert!(
        answer["response"]["warnings"][0]
            .as_str()
            .unwrap()
            .contains("is safe on node node-b"),
        "{answer}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_hold_ends_in_429_before_the_api_servers_deadline() {
    let p = pod("pod-statefulset");
    let m = migration(&p, Phase::Transferring, |_| {});
    let c = cluster(p, m, Duration::from_secs(10), 4);
    // The API server has 5 s left: the answer comes 2 s before that.
    let started = Instant::now();
    let answer = evict(Arc::clone(&c.state), "5s").await;
    assert_eq!(started.elapsed(), Duration::from_secs(3));
    let r = &answer["response"];
    assert_eq!(
        (r["allowed"].clone(), r["status"]["code"].clone()),
        (false.into(), 429.into())
    );
    assert!(
        r["status"]["message"].as_str().unwrap().contains("phase Transferring"),
        "{answer}"
    );
    assert_eq!(
        metric(
            &c.state,
            "kube_migrate_eviction_hold_seconds_count{outcome=\"expired\"}"
        ),
        1.0
    );
}

#[tokio::test(start_paused = true)]
async fn no_room_to_hold_answers_at_once() {
    let p = pod("pod-statefulset");
    let m = migration(&p, Phase::Transferring, |_| {});
    let c = cluster(p, m, Duration::from_secs(10), 1);
    let first = tokio::spawn(evict(Arc::clone(&c.state), "15s"));
    tokio::time::sleep(Duration::from_millis(10)).await;
    let started = Instant::now();
    let second = evict(Arc::clone(&c.state), "15s").await;
    assert_eq!(started.elapsed(), Duration::ZERO, "the only place is taken: no hold");
    assert_eq!(second["response"]["status"]["code"], 429);
    assert!(!first.is_finished());
    // A failed migration is answered at once by its pod's policy (here evict): nothing to await.
    let c = cluster(
        pod("pod-statefulset"),
        migration(&pod("pod-statefulset"), Phase::Failed, |_| {}),
        Duration::from_secs(10),
        4,
    );
    let started = Instant::now();
    let failed = evict(Arc::clone(&c.state), "15s").await;
    assert_eq!(started.elapsed(), Duration::ZERO);
    assert_eq!(failed["response"]["allowed"], true, "{failed}");
}

/// The source was removed while its eviction was held (the controller deletes a source its
/// agent saw killed at once): the answer still says where the state went, for the drain's
/// output. An old migration of the same name says nothing.
#[test]
fn an_eviction_of_a_pod_just_moved_says_where_its_state_went() {
    use kube_migrate::admission::eviction::{self, Snapshot};
    let p = pod("pod-statefulset");
    let decide = |migrations: &[Arc<PodMigration>]| {
        eviction::decide(
            &common::admission::req("db-0"),
            &Snapshot {
                pod: None,
                pod_node_schedulable: None,
                migrations,
                static_on_node: &[],
                now: common::admission::now(),
            },
        )
    };
    let Decision::Allow { result, warning } = decide(&[migration(&p, Phase::BuildingImage, |_| {})]) else {
        panic!("allowed")
    };
    assert_eq!(result, "allowed_state_safe");
    assert!(warning.unwrap().contains("is safe on node node-b"));
    assert_eq!(
        decide(&[migration(&p, Phase::Transferring, |_| {})]).result(),
        "allowed_no_pod"
    );
    let old = migration(&p, Phase::Succeeded, |s| {
        let long_ago = k8s_openapi::jiff::Timestamp::from_second(1_700_000_000).unwrap();
        s.phases.last_mut().unwrap().started_at = k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(long_ago);
    });
    assert_eq!(decide(&[old]).result(), "allowed_no_pod");
}
