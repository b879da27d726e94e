//! Scrapes the product's own admin router (`GET /metrics`, the handler the webhook and the agent
//! serve) and prints the body, after putting one sample in every metric family so that each
//! family shows its real sample names (`_total`, `_bucket`, ...) and label names.
//!
//! scripts/check-monitoring.sh checks every metric and label named by the alert rules and the
//! Grafana dashboard against this output: `cargo run --example metrics-scrape`.
//! The label values below are placeholders; only the names matter to the check.

use std::sync::Arc;

use axum::{body::Body, http::Request};
use http_body_util::BodyExt;
use kube_migrate::{
    api::Phase,
    metrics::{DecisionLabels, Metrics, NodeLabels, OperationLabels, OutcomeLabels, PhaseLabels, WebhookLabels},
    server::{Health, admin_router},
};
use tower::ServiceExt;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let metrics = Arc::new(Metrics::new());
    let m = &metrics;
    m.webhook_decisions
        .get_or_create(&DecisionLabels {
            webhook: "eviction",
            result: "blocked",
        })
        .inc();
    m.webhook_latency
        .get_or_create(&WebhookLabels { webhook: "eviction" })
        .observe(0.001);
    m.migrations
        .get_or_create(&OutcomeLabels {
            outcome: "failed",
            reason: "StateLost".to_string(),
        })
        .inc();
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

    let response = admin_router(metrics, Health::default())
        .oneshot(Request::get("/metrics").body(Body::empty()).expect("request"))
        .await
        .expect("admin router");
    assert!(response.status().is_success(), "GET /metrics: {}", response.status());
    let body = response.into_body().collect().await.expect("body").to_bytes();
    print!("{}", String::from_utf8(body.to_vec()).expect("utf-8 body"));
}
