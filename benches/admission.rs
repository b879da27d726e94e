//! Admission benchmark: latency (p50/p99/max) and throughput of the eviction webhook over
//! HTTPS on loopback, for "allowed" (unannotated pod) and "migrating" (429) decisions, with a
//! watch cache of 10,000 pods; and the memory that cache costs.
//!
//!   cargo bench --bench admission                  (full: 10 s per case)
//!   KM_BENCH_SECONDS=2 cargo bench --bench admission   (short, as CI runs it)

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::runtime::{reflector, watcher};
use kube_migrate::{
    admission::server::{WebhookState, router},
    api::{Phase, PodMigration, PodMigrationSpec, PodMigrationStatus, Trigger},
    certs,
    metrics::Metrics,
    server::serve_tls,
    tls::{CertReloader, client_config, install_crypto_provider, server_config},
};
use serde_json::json;
use tokio_util::sync::CancellationToken;

const PODS: usize = 10_000;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn pod(i: usize, annotated: bool) -> Pod {
    let mut annotations = serde_json::Map::new();
    if annotated {
        annotations.insert("migrate.io/stateful".into(), json!("true"));
    }
    serde_json::from_value(json!({
        "metadata": {
            "name": format!("pod-{i}"), "namespace": format!("ns-{}", i % 50), "uid": format!("00000000-0000-4000-8000-{i:012}"),
            "labels": { "app": format!("app-{}", i % 200), "pod-template-hash": "6d5f7c9b8" },
            "annotations": annotations,
            "ownerReferences": [{ "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("app-{}-6d5f7c9b8", i % 200), "uid": format!("10000000-0000-4000-8000-{:012}", i % 200), "controller": true }]
        },
        "spec": {
            "nodeName": format!("node-{}", i % 20),
            "containers": [{ "name": "app", "image": "registry.local/app:1", "resources": { "requests": { "cpu": "100m", "memory": "128Mi" } },
                             "env": [{ "name": "A", "value": "b" }], "ports": [{ "containerPort": 8080 }] }]
        },
        "status": { "phase": "Running", "podIP": "10.0.0.1", "conditions": [{ "type": "Ready", "status": "True" }] }
    }))
    .unwrap()
}

fn review(uid: usize, pod_index: usize) -> Vec<u8> {
    let name = format!("pod-{pod_index}");
    let ns = format!("ns-{}", pod_index % 50);
    serde_json::to_vec(&json!({
        "kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1",
        "request": {
            "uid": format!("r-{uid}"), "kind": { "group": "policy", "version": "v1", "kind": "Eviction" },
            "resource": { "group": "", "version": "v1", "resource": "pods" }, "subResource": "eviction",
            "name": name, "namespace": ns, "operation": "CREATE",
            "userInfo": { "username": "admin" },
            "object": { "apiVersion": "policy/v1", "kind": "Eviction", "metadata": { "name": name, "namespace": ns } },
            "dryRun": false
        }
    }))
    .unwrap()
}

async fn run_case(
    name: &str,
    addr: std::net::SocketAddr,
    tls: rustls::ClientConfig,
    pick: fn(usize) -> usize,
    expect_allowed: bool,
    seconds: u64,
    connections: usize,
) {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for c in 0..connections {
        let connector = connector.clone();
        tasks.push(tokio::spawn(async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            tcp.set_nodelay(true).unwrap();
            let stream = connector.connect("127.0.0.1".try_into().unwrap(), tcp).await.unwrap();
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .unwrap();
            tokio::spawn(conn);
            let mut latencies = Vec::new();
            let mut i = c * 1_000_000;
            while Instant::now() < deadline {
                i += 1;
                let body = Bytes::from(review(i, pick(i)));
                let req = Request::post("/validate/eviction")
                    .header("content-type", "application/json")
                    .body(Full::new(body))
                    .unwrap();
                let t = Instant::now();
                let resp = sender.send_request(req).await.unwrap();
                let bytes = resp.into_body().collect().await.unwrap().to_bytes();
                latencies.push(t.elapsed());
                let answer: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
                assert_eq!(answer["response"]["allowed"], expect_allowed, "{answer}");
            }
            latencies
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort();
    let pct = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)];
    println!(
        "{name:<28} {:>9} requests  {:>8.0} decisions/s  p50 {:>7.3} ms  p99 {:>7.3} ms  max {:>7.3} ms  ({connections} connections)",
        all.len(),
        all.len() as f64 / seconds as f64,
        pct(0.50).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
        all.last().unwrap().as_secs_f64() * 1e3
    );
}

fn main() {
    install_crypto_provider();
    let seconds: u64 = std::env::var("KM_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let dir = tempfile::tempdir().unwrap();
        certs::issue(
            dir.path(),
            &certs::Request {
                extra_sans: vec!["127.0.0.1".into()],
                days: 1,
                ..Default::default()
            },
        )
        .unwrap();

        let before = rss_kib();
        let (pods, mut writer) = reflector::store::<Pod>();
        for i in 0..PODS {
            // Every 10th pod opted in; managedFields are dropped as in the real cache.
            writer.apply_watcher_event(&watcher::Event::Apply(pod(i, i % 10 == 0)));
        }
        let after = rss_kib();
        println!(
            "watch cache: {PODS} pods, RSS +{:.1} MiB ({:.2} KiB per pod)",
            (after - before) as f64 / 1024.0,
            (after - before) as f64 / PODS as f64
        );

        let (migrations, mut mw) = reflector::store::<PodMigration>();
        for i in (0..PODS).step_by(10) {
            let mut pm = PodMigration::new(
                &format!("pod-{i}-m"),
                PodMigrationSpec {
                    pod_name: format!("pod-{i}"),
                    pod_uid: format!("00000000-0000-4000-8000-{i:012}"),
                    source_node: format!("node-{}", i % 20),
                    target_node: None,
                    trigger: Trigger::Drain,
                    policy: Default::default(),
                    mode: Default::default(),
                    restore_from: None,
                },
            );
            pm.metadata.namespace = Some(format!("ns-{}", i % 50));
            pm.status = Some(PodMigrationStatus {
                phase: Phase::Transferring,
                target_node: Some("node-x".into()),
                ..Default::default()
            });
            mw.apply_watcher_event(&watcher::Event::Apply(pm));
        }
        let (nodes, _) = reflector::store::<Node>();
        let client = kube::Client::try_from(kube::Config::new("https://127.0.0.1:1".parse().unwrap())).unwrap();
        let state = Arc::new(WebhookState {
            controller_user: "system:serviceaccount:kube-migrate:kube-migrate-webhook".into(),
            client,
            pods,
            nodes,
            migrations,
            metrics: Arc::new(Metrics::new()),
            namespaces: reflector::store().0,
            helper_image: Default::default(),
            holds: kube_migrate::admission::hold::Holds::off(),
        });

        let shutdown = CancellationToken::new();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let certs = CertReloader::new(dir.path().join("webhook.crt"), dir.path().join("webhook.key")).unwrap();
        tokio::spawn(serve_tls(
            listener,
            server_config(certs, None).unwrap(),
            router(state),
            shutdown.clone(),
        ));
        let tls = client_config(&dir.path().join("ca.crt"), None).unwrap();

        // Warm up, then measure.
        run_case("warm-up", addr, tls.clone(), |i| (i % PODS) | 1, true, 1, 4).await;
        run_case(
            "allowed (unannotated)",
            addr,
            tls.clone(),
            |i| (i % PODS) | 1,
            true,
            seconds,
            16,
        )
        .await;
        run_case(
            "migrating (429, cached PM)",
            addr,
            tls.clone(),
            |i| (i * 10) % PODS,
            false,
            seconds,
            16,
        )
        .await;
        run_case("allowed, 1 connection", addr, tls, |i| (i % PODS) | 1, true, seconds, 1).await;
        shutdown.cancel();
    });
}
