//! Prometheus metrics: one registry, one struct of metric families, shared by reference.

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::api::Phase;

/// A step of a migration's timeline (a fixed set: `PodMigrationStatus::timeline`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StepLabels {
    pub step: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub webhook: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WebhookLabels {
    pub webhook: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HoldLabels {
    /// The answer the hold ended with (a decision result), or `expired`.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeLabels {
    pub node: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabels {
    pub operation: &'static str,
    pub result: &'static str,
}

fn seconds_buckets() -> impl Iterator<Item = f64> {
    [
        0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
    ]
    .into_iter()
}

fn latency_buckets() -> impl Iterator<Item = f64> {
    [
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, 1.0,
    ]
    .into_iter()
}

/// Every metric kube-migrate exports (prefix `kube_migrate_`).
pub struct Metrics {
    registry: Registry,
    pub webhook_decisions: Family<DecisionLabels, Counter>,
    pub webhook_latency: Family<WebhookLabels, Histogram>,
    pub eviction_hold: Family<HoldLabels, Histogram>,
    pub migrations: Family<OutcomeLabels, Counter>,
    pub migration_duration: Histogram,
    pub phase_duration: Family<PhaseLabels, Histogram>,
    pub downtime: Histogram,
    pub step: Family<StepLabels, Histogram>,
    pub source_window: Histogram,
    pub drain_duration: Family<NodeLabels, Histogram>,
    pub archive_bytes: Histogram,
    pub transfer_throughput: Histogram,
    pub in_flight: Family<PhaseLabels, Gauge>,
    pub agent_operations: Family<OperationLabels, Counter>,
    pub agent_operation_duration: Family<PhaseLabels, Histogram>,
    pub agent_bytes: Family<PhaseLabels, Counter>,
    pub agent_stored_bytes: Gauge,
    pub gc_deleted: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("kube_migrate");
        let webhook_decisions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "webhook_decisions",
            "Admission decisions by webhook and result",
            webhook_decisions.clone(),
        );
        let webhook_latency =
            Family::<WebhookLabels, Histogram>::new_with_constructor(|| Histogram::new(latency_buckets()));
        registry.register(
            "webhook_latency_seconds",
            "Time to decide an AdmissionReview (an eviction's hold excluded)",
            webhook_latency.clone(),
        );
        let eviction_hold = Family::<HoldLabels, Histogram>::new_with_constructor(|| Histogram::new(seconds_buckets()));
        registry.register(
            "eviction_hold_seconds",
            "How long an eviction was held open waiting for its migration's state to be safe",
            eviction_hold.clone(),
        );
        let migrations = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "migrations",
            "Finished migrations by outcome and reason",
            migrations.clone(),
        );
        let migration_duration = Histogram::new(seconds_buckets());
        registry.register(
            "migration_duration_seconds",
            "From PodMigration creation to a terminal phase",
            migration_duration.clone(),
        );
        let phase_duration =
            Family::<PhaseLabels, Histogram>::new_with_constructor(|| Histogram::new(seconds_buckets()));
        registry.register(
            "phase_duration_seconds",
            "Duration of each migration phase",
            phase_duration.clone(),
        );
        let downtime = Histogram::new(seconds_buckets());
        registry.register(
            "downtime_seconds",
            "From the source's freeze (or its stop, where it could not be frozen) to the replacement being Ready",
            downtime.clone(),
        );
        let step = Family::<StepLabels, Histogram>::new_with_constructor(|| Histogram::new(seconds_buckets()));
        registry.register(
            "step_seconds",
            "Seconds from the source's freeze to each step of a successful migration (status.timeline): where the downtime goes",
            step.clone(),
        );
        let source_window = Histogram::new(seconds_buckets());
        registry.register(
            "source_window_seconds",
            "From the end of the checkpoint to the source's last container stopping: what the source did then is not in the checkpoint (goal 0)",
            source_window.clone(),
        );
        let drain_duration =
            Family::<NodeLabels, Histogram>::new_with_constructor(|| Histogram::new(seconds_buckets()));
        registry.register(
            "drain_duration_seconds",
            "Per drained node: first intercepted eviction to the last of its migrations finished",
            drain_duration.clone(),
        );
        let archive_bytes = Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
            1024.0 * 1024.0,
            4.0,
            10,
        ));
        registry.register("archive_bytes", "Size of checkpoint archives", archive_bytes.clone());
        let transfer_throughput = Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
            1024.0 * 1024.0,
            2.0,
            14,
        ));
        registry.register(
            "transfer_throughput_bytes_per_second",
            "Agent-to-agent archive transfer throughput",
            transfer_throughput.clone(),
        );
        let in_flight = Family::<PhaseLabels, Gauge>::default();
        registry.register(
            "migrations_in_flight",
            "Migrations currently in each non-terminal phase",
            in_flight.clone(),
        );
        let agent_operations = Family::<OperationLabels, Counter>::default();
        registry.register(
            "agent_operations",
            "Agent operations by result",
            agent_operations.clone(),
        );
        let agent_operation_duration =
            Family::<PhaseLabels, Histogram>::new_with_constructor(|| Histogram::new(seconds_buckets()));
        registry.register(
            "agent_operation_duration_seconds",
            "Agent operation duration (checkpoint, send, receive, image)",
            agent_operation_duration.clone(),
        );
        let agent_bytes = Family::<PhaseLabels, Counter>::default();
        registry.register(
            "agent_bytes",
            "Bytes checkpointed, sent and received by the agent",
            agent_bytes.clone(),
        );
        let agent_stored_bytes = Gauge::default();
        registry.register(
            "agent_stored_bytes",
            "Bytes of archives and images the agent keeps",
            agent_stored_bytes.clone(),
        );
        let gc_deleted = Counter::default();
        registry.register(
            "agent_gc_deleted",
            "Stale migration directories removed by garbage collection",
            gc_deleted.clone(),
        );
        Self {
            registry,
            webhook_decisions,
            webhook_latency,
            eviction_hold,
            migrations,
            migration_duration,
            phase_duration,
            downtime,
            step,
            source_window,
            drain_duration,
            archive_bytes,
            transfer_throughput,
            in_flight,
            agent_operations,
            agent_operation_duration,
            agent_bytes,
            agent_stored_bytes,
            gc_deleted,
        }
    }

    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        encode(&mut out, &self.registry)?;
        Ok(out)
    }

    pub fn set_in_flight(&self, counts: &[(Phase, i64)]) {
        for (phase, n) in counts {
            self.in_flight
                .get_or_create(&PhaseLabels { phase: phase.as_str() })
                .set(*n);
        }
    }
}
