//! kube-migrate: turns `kubectl drain` into live migration for stateful pods.
//!
//! * [`api`]: the `PodMigration` resource and the annotations.
//! * [`admission`]: the eviction and pod-create webhooks (pure decisions + HTTP glue).
//! * [`controller`]: the leader-elected controller that drives migrations.
//! * [`agent`]: the node agent (kubelet checkpoint, archive transfer, checkpoint images).
//! * [`tls`], [`metrics`], [`telemetry`], [`server`]: plumbing shared by the binaries.

pub mod admission;
pub mod agent;
pub mod api;
pub mod app;
pub mod certs;
pub mod controller;
pub mod metrics;
pub mod plugin;
pub mod preflight;
pub mod replacement;
pub mod server;
pub mod telemetry;
pub mod tls;
