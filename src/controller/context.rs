//! What every phase step shares: the controller's configuration, its caches and clients, the
//! concurrency slots, and the I/O helpers (status writes, Events, metrics).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use k8s_openapi::{
    api::{
        core::v1::{Node, ObjectReference, Pod},
        discovery::v1::EndpointSlice,
    },
    jiff::Timestamp,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{Patch, PatchParams},
    runtime::{
        finalizer,
        reflector::{ObjectRef, Store},
    },
};
use serde_json::json;

use super::{
    agents, decide,
    events::{self, EventType},
    state,
};
use crate::{
    agent::client::{AgentClient, ClientError},
    api::{self, Phase, PodMigration, PodMigrationStatus},
    metrics::{Metrics, NodeLabels, OutcomeLabels, PhaseLabels},
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<finalizer::Error<Error>>),
    #[error("agent: {0}")]
    Agent(#[from] ClientError),
    #[error("serialization: {0}")]
    Json(#[from] serde_json::Error),
    #[error("PodMigration without {0}")]
    Missing(&'static str),
    /// The status changed under us (another writer, or a stale cache): re-read and retry.
    #[error("PodMigration {0} changed since it was read")]
    Conflict(String),
    #[error("reading the pull credential key: {0}")]
    PullKey(String),
}

impl Error {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube_api",
            Error::Finalizer(e) => match e.as_ref() {
                finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => e.metric_label(),
                _ => "finalizer",
            },
            Error::Agent(e) => e.metric_label(),
            Error::Json(_) => "json",
            Error::Missing(_) => "invalid_object",
            Error::Conflict(_) => "conflict",
            Error::PullKey(_) => "pull_key",
        }
    }

    /// A conflict is expected (stale cache right after our own write): retry at once.
    pub fn is_conflict(&self) -> bool {
        match self {
            Error::Conflict(_) => true,
            Error::Finalizer(e) => matches!(
                e.as_ref(),
                finalizer::Error::ApplyFailed(Error::Conflict(_)) | finalizer::Error::CleanupFailed(Error::Conflict(_))
            ),
            _ => false,
        }
    }
}

/// Tunables (flags of the webhook binary).
#[derive(Clone, Debug)]
pub struct Config {
    /// Active migrations per source node.
    pub max_per_node: usize,
    /// Active migrations in the cluster.
    pub max_total: usize,
    pub checkpoint_timeout: Duration,
    /// Grace period of the source pod's deletion after the checkpoint: the shorter, the less
    /// the source can diverge from the checkpoint.
    pub source_grace_period_seconds: i64,
    /// Freeze the source's containers before their checkpoint and keep them frozen until the
    /// state is verified on the target (where the node's agent can: see `agent::source`).
    pub freeze_source: bool,
    /// Retries of transient failures before the source stopped.
    pub max_attempts: u32,
    /// How long after the source stopped the controller keeps retrying before it gives up
    /// and lets the replacement start fresh.
    pub restore_deadline: Duration,
    /// Upper bound of each phase (see [`decide::Deadlines`]).
    pub deadlines: decide::Deadlines,
    /// Dial agents at this host instead of their EndpointSlice address (see
    /// [`agents::endpoint_for`]).
    pub agent_address_override: Option<String>,
    /// Key of the per-migration pull credentials (see [`super::pull`]); the controller's own
    /// TLS key. None: images are built without a credential, and no runtime may pull them.
    pub pull_key_file: Option<std::path::PathBuf>,
    /// Compression and pace of archives between agents (slow links).
    pub transfer: crate::agent::api::TransferOptions,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            max_per_node: 8,
            max_total: 10,
            checkpoint_timeout: Duration::from_secs(300),
            source_grace_period_seconds: 1,
            freeze_source: true,
            max_attempts: 3,
            restore_deadline: Duration::from_secs(600),
            deadlines: decide::Deadlines::default(),
            agent_address_override: None,
            pull_key_file: None,
            transfer: Default::default(),
        }
    }
}

/// Migrations admitted past `Pending` by this leader, keyed by `namespace/name`. The informer
/// cache lags our own writes, so a burst of migrations created at once would all pass a
/// cache-only check; admission is decided under this lock against the cache *and* this set.
/// Likewise, `done` holds migrations this leader moved out of an active phase (written, not
/// yet in the cache): their slots are free at once, so the queued ones woken then get them.
#[derive(Default)]
pub struct Slots {
    admitted: BTreeMap<String, decide::Slot>,
    done: BTreeSet<String>,
}

pub struct Context {
    pub client: Client,
    pub pods: Store<Pod>,
    pub nodes: Store<Node>,
    pub agents: Store<EndpointSlice>,
    pub migrations: Store<PodMigration>,
    pub agent_client: AgentClient,
    pub recorder: Arc<events::Recorder>,
    pub metrics: Arc<Metrics>,
    pub config: Config,
    /// Image of the restore init container of replacements with emptyDirs.
    pub helper_image: crate::replacement::HelperImage,
    /// Drains already observed in the drain-duration metric: (node, first creation second).
    pub drains_recorded: Mutex<HashSet<(String, i64)>>,
    pub slots: Mutex<Slots>,
    /// Resource versions this controller wrote in the middle of a step (transfer progress),
    /// by migration UID: a reconcile handed one of them works from an object that the same
    /// step's own final write has superseded.
    pub progress_writes: Mutex<ProgressWrites>,
}

/// Resource versions written in the middle of steps, by migration UID (see
/// [`Context::progress_writes`]).
#[derive(Debug, Default)]
pub struct ProgressWrites(HashMap<String, HashSet<String>>);

impl ProgressWrites {
    pub fn note(&mut self, uid: &str, rv: &str) {
        self.0.entry(uid.to_string()).or_default().insert(rv.to_string());
    }

    /// Whether version `rv` of migration `uid` was written mid-step. A version that was not
    /// forgets the others: the cache never goes back to them.
    pub fn superseded(&mut self, uid: &str, rv: &str) -> bool {
        if self.0.get(uid).is_some_and(|w| w.contains(rv)) {
            return true;
        }
        self.0.remove(uid);
        false
    }
}

pub fn key(pm: &PodMigration) -> String {
    format!("{}/{}", pm.namespace().unwrap_or_default(), pm.name_any())
}

impl Context {
    pub fn update_in_flight(&self) {
        let all = self.migrations.state();
        let counts: Vec<(Phase, i64)> = Phase::ALL
            .iter()
            .filter(|p| !p.is_terminal())
            .map(|p| (*p, all.iter().filter(|m| m.phase() == *p).count() as i64))
            .collect();
        self.metrics.set_in_flight(&counts);
    }

    pub fn agent(&self, node: &str) -> Option<String> {
        agents::endpoint_for(&self.agents, node, self.config.agent_address_override.as_deref())
    }

    pub fn pod(&self, ns: &str, name: &str) -> Option<Arc<Pod>> {
        self.pods.get(&ObjectRef::new(name).within(ns))
    }

    /// The pod this PodMigration is about, if it still exists (same name *and* UID).
    pub fn source_pod(&self, pm: &PodMigration) -> Option<Arc<Pod>> {
        self.pod(&pm.namespace().unwrap_or_default(), &pm.spec.pod_name)
            .filter(|p| p.metadata.uid.as_deref() == Some(pm.spec.pod_uid.as_str()))
    }

    /// Slots held right now: active migrations in the cache plus those admitted by this
    /// leader whose write the cache has not shown yet. Admitted entries leave once the cache
    /// shows them (active or finished) or they are released.
    pub fn held_slots(&self, slots: &mut Slots) -> Vec<decide::Slot> {
        let all = self.migrations.state();
        slots
            .done
            .retain(|k| all.iter().any(|m| key(m) == *k && m.phase().is_active()));
        let mut held: BTreeMap<String, decide::Slot> = BTreeMap::new();
        for m in &all {
            if m.phase().is_active() && !slots.done.contains(&key(m)) {
                held.insert(key(m), decide::Slot::of(m, self.source_pod(m)));
            }
        }
        slots.admitted.retain(|k, _| {
            all.iter()
                .find(|m| key(m) == *k)
                .is_some_and(|m| m.phase() == Phase::Pending)
        });
        for (k, slot) in &slots.admitted {
            held.entry(k.clone()).or_insert_with(|| slot.clone());
        }
        held.into_values().collect()
    }

    /// Admit `pm` (choose its target) atomically with the limit check.
    pub fn admit(
        &self,
        pm: &PodMigration,
        choose: impl FnOnce(&[decide::Slot]) -> Result<String, String>,
    ) -> Result<Result<String, String>, decide::Queued> {
        let mut slots = self.slots.lock().expect("slots poisoned");
        let held = self.held_slots(&mut slots);
        decide::concurrency_gate(
            &held,
            &key(pm),
            &pm.spec.source_node,
            self.config.max_per_node,
            self.config.max_total,
        )?;
        let chosen = choose(&held);
        if let Ok(target) = &chosen {
            slots.admitted.insert(
                key(pm),
                decide::Slot {
                    key: key(pm),
                    source_node: pm.spec.source_node.clone(),
                    target_node: Some(target.clone()),
                    pod: self.source_pod(pm),
                },
            );
        }
        Ok(chosen)
    }

    /// `pm`'s write took it out of an active phase: its slot is free before the cache says so.
    pub fn slot_done(&self, pm: &PodMigration) {
        self.slots.lock().expect("slots poisoned").done.insert(key(pm));
    }

    /// Forget an admission (the migration went back to Pending or failed before its write).
    pub fn release_slot(&self, pm: &PodMigration) {
        self.slots.lock().expect("slots poisoned").admitted.remove(&key(pm));
    }

    /// Whether `pm` is a version written in the middle of a step, since superseded (see
    /// [`Self::progress_writes`]). A newer version forgets them: the cache never goes back.
    pub fn superseded(&self, pm: &PodMigration) -> bool {
        let (Some(uid), Some(rv)) = (pm.uid(), pm.resource_version()) else {
            return false;
        };
        let mut writes = self.progress_writes.lock().expect("progress writes poisoned");
        writes.superseded(&uid, &rv)
    }

    /// Write the status in the middle of a step (progress) and move `pm` to the version
    /// written, so the step's final write stays conditional on everything but our own writes.
    pub async fn write_progress(&self, pm: &mut PodMigration, status: &PodMigrationStatus) -> Result<(), Error> {
        let rv = self.write_status(pm, status).await?;
        if let Some(uid) = pm.uid() {
            let mut writes = self.progress_writes.lock().expect("progress writes poisoned");
            writes.note(&uid, &rv);
        }
        pm.metadata.resource_version = Some(rv);
        Ok(())
    }

    /// Write the status with server-side apply, conditional on the resourceVersion we read:
    /// a reconcile that worked from a stale object fails with [`Error::Conflict`] instead of
    /// moving the migration backwards. Returns the resourceVersion written.
    pub async fn write_status(&self, pm: &PodMigration, status: &PodMigrationStatus) -> Result<String, Error> {
        let api: Api<PodMigration> = Api::namespaced(self.client.clone(), &pm.namespace().unwrap_or_default());
        let patch = json!({
            "apiVersion": "migrate.io/v1alpha1",
            "kind": "PodMigration",
            "metadata": { "resourceVersion": pm.resource_version() },
            "status": status,
        });
        match api
            .patch_status(
                &pm.name_any(),
                &PatchParams::apply(api::FIELD_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await
        {
            Ok(written) => Ok(written.resource_version().unwrap_or_default()),
            Err(kube::Error::Api(e)) if e.code == 409 => Err(Error::Conflict(pm.name_any())),
            Err(e) => Err(e.into()),
        }
    }

    /// Publish an Event on the PodMigration and on the pod it migrates.
    pub async fn event(&self, pm: &PodMigration, type_: EventType, reason: &str, note: String) {
        let pod_ref = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: Some(pm.spec.pod_name.clone()),
            namespace: pm.namespace(),
            uid: Some(pm.spec.pod_uid.clone()),
            ..Default::default()
        };
        for reference in [pm.object_ref(&()), pod_ref] {
            if let Err(error) = self.recorder.publish(&reference, type_, reason, &note).await {
                tracing::warn!(%error, reason, "could not publish event");
            }
        }
    }

    /// Zero series for what the dashboard counts with `increase()`, which misses the first
    /// sample of a series born non-zero: the common outcomes, and a drain duration per node
    /// known. Reasons of rarer failures (preflight refusals) still appear at their first use;
    /// the alert rules handle new series themselves.
    pub fn initialise_series(&self) {
        const FAILURES: [&str; 7] = [
            "NoTarget",
            "CheckpointFailed",
            "PodGone",
            "Unavailable",
            "DeadlineExceeded",
            "StateLost",
            "ArchiveCorrupt",
        ];
        let outcomes = std::iter::once(("succeeded", "none")).chain(FAILURES.map(|r| ("failed", r)));
        for (outcome, reason) in outcomes {
            let _ = self.metrics.migrations.get_or_create(&OutcomeLabels {
                outcome,
                reason: reason.into(),
            });
        }
        for node in self.nodes.state() {
            let _ = self
                .metrics
                .drain_duration
                .get_or_create(&NodeLabels { node: node.name_any() });
        }
    }

    /// Record the metrics of a step whose status was written (phases it finished, the
    /// migration's end): called after the write, so a step done again after a conflict counts once.
    pub fn observe(&self, pm: &PodMigration, before: &PodMigrationStatus, status: &PodMigrationStatus) {
        let (closed, ended) = state::finished_in_step(before, status);
        for (phase, seconds) in closed {
            self.metrics
                .phase_duration
                .get_or_create(&PhaseLabels { phase: phase.as_str() })
                .observe(seconds);
        }
        if !ended {
            return;
        }
        let outcome = if status.phase == Phase::Succeeded {
            "succeeded"
        } else {
            "failed"
        };
        let reason = status.reason.clone().unwrap_or_else(|| "none".into());
        self.metrics
            .migrations
            .get_or_create(&OutcomeLabels { outcome, reason })
            .inc();
        let now = Timestamp::now();
        if let Some(created) = pm.metadata.creation_timestamp.as_ref() {
            self.metrics
                .migration_duration
                .observe(decide::seconds_between(&created.0, &now));
        }
        if let Some(downtime) = status.downtime_seconds {
            self.metrics.downtime.observe(downtime);
        }
        if status.phase == Phase::Succeeded
            && let Some(frozen) = status
                .timeline
                .iter()
                .find(|t| t.step == crate::api::Step::Frozen.as_str())
        {
            for t in status
                .timeline
                .iter()
                // Seconds after the freeze: `queued` came before it.
                .filter(|t| t.step != crate::api::Step::Frozen.as_str() && t.step != crate::api::Step::Queued.as_str())
            {
                self.metrics
                    .step
                    .get_or_create(&crate::metrics::StepLabels { step: t.step.clone() })
                    .observe(decide::seconds_between(&frozen.at.0, &t.at.0).max(0.0));
            }
        }
        if let Some(window) = status.source_window_seconds {
            self.metrics.source_window.observe(window);
        }
    }

    /// Once every drain migration of a node has finished, observe how long the drain took
    /// (first intercepted eviction to last migration finished), once per drain. Called from
    /// terminal reconciles, which run after the cache holds the terminal status.
    pub fn observe_drain(&self, node: &str) {
        let all = self.migrations.state();
        let Some((started, seconds)) = state::drain_episode(all.iter().map(AsRef::as_ref), node, Timestamp::now())
        else {
            return;
        };
        let mut recorded = self.drains_recorded.lock().expect("drain set poisoned");
        if recorded.insert((node.to_string(), started)) {
            self.metrics
                .drain_duration
                .get_or_create(&NodeLabels { node: node.to_string() })
                .observe(seconds);
        }
    }

    /// Event type helper so phases need not import kube's event types.
    pub async fn warn(&self, pm: &PodMigration, reason: &str, note: String) {
        self.event(pm, EventType::Warning, reason, note).await;
    }

    pub async fn normal(&self, pm: &PodMigration, reason: &str, note: String) {
        self.event(pm, EventType::Normal, reason, note).await;
    }
}

#[cfg(test)]
mod tests {
    use super::ProgressWrites;

    #[test]
    fn versions_written_mid_step_are_stale_until_a_newer_one_is_seen() {
        let mut writes = ProgressWrites::default();
        assert!(!writes.superseded("m", "10"), "nothing written: nothing stale");
        // A step wrote progress as versions 11 and 12, then its final write made 13.
        writes.note("m", "11");
        writes.note("m", "12");
        writes.note("other", "20");
        assert!(writes.superseded("m", "12"), "a queued reconcile of a progress version");
        assert!(writes.superseded("m", "11"));
        assert!(!writes.superseded("m", "13"), "the final write is acted on");
        // Seen 13: the cache never hands out 11 or 12 again, so they are forgotten...
        assert!(!writes.superseded("m", "12"));
        // ... and other migrations keep theirs.
        assert!(writes.superseded("other", "20"));
    }
}
