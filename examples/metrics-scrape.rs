//! Scrapes the product's own admin router (`GET /metrics`, the handler the webhook and the agent
//! serve) and prints the body, after putting one sample in every metric family so that each
//! family shows its real sample names (`_total`, `_bucket`, ...) and label names.
//!
//! scripts/check-monitoring.sh checks every metric and label named by the alert rules and the
//! Grafana dashboard against this output: `cargo run --example metrics-scrape`.
//! The label values below are placeholders; only the names matter to the check.
//!
//! `--serve ADDR [--state-lost-after SECONDS]` serves the same router on ADDR instead, for a live
//! Prometheus to scrape (scripts/monitoring-live.sh): no finished migration at first, then, after
//! SECONDS, the first `StateLost` since the start (a counter series born at 1).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::{body::Body, http::Request};
use http_body_util::BodyExt;
use kube_migrate::{
    api::Phase,
    metrics::{DecisionLabels, Metrics, NodeLabels, OperationLabels, OutcomeLabels, PhaseLabels, WebhookLabels},
    server::{Health, admin_router, serve_admin},
};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

fn state_lost(m: &Metrics) {
    m.migrations
        .get_or_create(&OutcomeLabels {
            outcome: "failed",
            reason: "StateLost".to_string(),
        })
        .inc();
}

/// One sample in every family but `migrations` (see [`state_lost`]).
fn populate(m: &Metrics) {
    m.webhook_decisions
        .get_or_create(&DecisionLabels {
            webhook: "eviction",
            result: "blocked",
        })
        .inc();
    m.webhook_latency
        .get_or_create(&WebhookLabels { webhook: "eviction" })
        .observe(0.001);
    m.migration_duration.observe(10.0);
    m.phase_duration
        .get_or_create(&PhaseLabels {
            phase: Phase::Transferring.as_str(),
        })
        .observe(1.0);
    m.downtime.observe(1.0);
    m.source_window.observe(0.1);
    m.drain_duration
        .get_or_create(&NodeLabels {
            node: "node-a".to_string(),
        })
        .observe(30.0);
    m.archive_bytes.observe(1e6);
    m.transfer_throughput.observe(1e8);
    m.set_in_flight(&[(Phase::Pending, 1)]);
    m.agent_operations
        .get_or_create(&OperationLabels {
            operation: "checkpoint",
            result: "ok",
        })
        .inc();
    m.agent_operation_duration
        .get_or_create(&PhaseLabels { phase: "checkpoint" })
        .observe(1.0);
    m.agent_bytes.get_or_create(&PhaseLabels { phase: "send" }).inc_by(1);
    m.agent_stored_bytes.set(1);
    m.gc_deleted.inc();
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let metrics = Arc::new(Metrics::new());
    populate(&metrics);
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(addr) = args.iter().position(|a| a == "--serve").and_then(|i| args.get(i + 1)) {
        let addr: SocketAddr = addr.parse().expect("--serve ADDR (host:port)");
        let after = args
            .iter()
            .position(|a| a == "--state-lost-after")
            .and_then(|i| args.get(i + 1))
            .map(|s| s.parse::<u64>().expect("--state-lost-after SECONDS"));
        if let Some(after) = after {
            let metrics = Arc::clone(&metrics);
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(after)).await;
                state_lost(&metrics);
                eprintln!("metrics-scrape: kube_migrate_migrations_total{{outcome=\"failed\",reason=\"StateLost\"}} 1");
            });
        }
        let router = admin_router(metrics, Health::default());
        serve_admin(addr, router, CancellationToken::new())
            .await
            .expect("serve");
        return;
    }
    state_lost(&metrics);

    let response = admin_router(metrics, Health::default())
        .oneshot(Request::get("/metrics").body(Body::empty()).expect("request"))
        .await
        .expect("admin router");
    assert!(response.status().is_success(), "GET /metrics: {}", response.status());
    let body = response.into_body().collect().await.expect("body").to_bytes();
    print!("{}", String::from_utf8(body.to_vec()).expect("utf-8 body"));
}
