//! The reconciler: one step of a PodMigration's life per call, state always in its status.

use std::{sync::Arc, time::Duration};

use futures::StreamExt;
use k8s_openapi::{
    api::{
        core::v1::{Node, ObjectReference, Pod},
        discovery::v1::EndpointSlice,
        policy::v1::PodDisruptionBudget,
    },
    apimachinery::pkg::apis::meta::v1::Time,
    jiff::Timestamp,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
    runtime::{
        Controller,
        controller::Action,
        events::{Event, EventType, Recorder},
        finalizer::{self, finalizer},
        reflector::{ObjectRef, Store},
        watcher,
    },
};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::instrument;

use super::{
    agents,
    placement::{self, Placement, PlacementInput},
    state::{self, CONDITION_DEGRADED, CONDITION_QUEUED, CONDITION_SOURCE_STOPPED},
};
use crate::{
    admission::{eviction::STOP_SOURCE_OF, pod as podmut},
    agent::{
        api::{ArchiveRef, CheckpointRequest, ImageRequest, PushRequest},
        client::{AgentClient, ClientError},
    },
    api::{self, ContainerCheckpoint, Mode, OwnerInfo, Phase, PodMigration, PodMigrationStatus, PodRef, Trigger},
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
}

impl Error {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube_api",
            Error::Finalizer(_) => "finalizer",
            Error::Agent(e) => e.metric_label(),
            Error::Json(_) => "json",
            Error::Missing(_) => "invalid_object",
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
    /// Retries of transient failures before the source stopped.
    pub max_attempts: u32,
    /// How long after the source stopped the controller keeps retrying before it gives up
    /// and lets the replacement start fresh.
    pub restore_deadline: Duration,
    /// Dial agents at this host instead of their EndpointSlice address (see
    /// [`agents::endpoint_for`]).
    pub agent_address_override: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            max_per_node: 2,
            max_total: 10,
            checkpoint_timeout: Duration::from_secs(300),
            source_grace_period_seconds: 1,
            max_attempts: 3,
            restore_deadline: Duration::from_secs(600),
            agent_address_override: None,
        }
    }
}

pub struct Context {
    pub client: Client,
    pub pods: Store<Pod>,
    pub nodes: Store<Node>,
    pub agents: Store<EndpointSlice>,
    pub migrations: Store<PodMigration>,
    pub agent_client: AgentClient,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub config: Config,
    /// Drains already observed in the drain-duration metric: (node, first creation second).
    pub drains_recorded: std::sync::Mutex<std::collections::HashSet<(String, i64)>>,
}

/// Run the controller until `shutdown`.
pub async fn run(
    client: Client,
    shared: impl FnOnce(Store<PodMigration>) -> Arc<Context>,
    shutdown: CancellationToken,
) {
    let api = Api::<PodMigration>::all(client);
    let controller = Controller::new(api, watcher::Config::default().any_semantic());
    let ctx = shared(controller.store());
    controller
        .graceful_shutdown_on(async move { shutdown.cancelled().await })
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!(%error, "reconcile failed");
            }
        })
        .await;
}

fn error_policy(pm: Arc<PodMigration>, error: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!(name = %pm.name_any(), %error, reason = error.metric_label(), "reconcile error");
    ctx.metrics
        .agent_operations
        .get_or_create(&crate::metrics::OperationLabels {
            operation: "reconcile",
            result: error.metric_label(),
        })
        .inc();
    Action::requeue(Duration::from_secs(5))
}

#[instrument(skip_all, fields(migration = %pm.name_any(), namespace = pm.namespace().unwrap_or_default(), phase = %pm.phase()))]
async fn reconcile(pm: Arc<PodMigration>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = pm.namespace().ok_or(Error::Missing("namespace"))?;
    let api: Api<PodMigration> = Api::namespaced(ctx.client.clone(), &ns);
    ctx.update_in_flight();
    finalizer(&api, api::FINALIZER, pm, |event| async {
        match event {
            finalizer::Event::Apply(pm) => apply(&pm, &ctx).await,
            finalizer::Event::Cleanup(pm) => cleanup(&pm, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

impl Context {
    fn update_in_flight(&self) {
        let all = self.migrations.state();
        let counts: Vec<(Phase, i64)> = Phase::ALL
            .iter()
            .filter(|p| !p.is_terminal())
            .map(|p| (*p, all.iter().filter(|m| m.phase() == *p).count() as i64))
            .collect();
        self.metrics.set_in_flight(&counts);
    }

    fn agent(&self, node: &str) -> Option<String> {
        agents::endpoint_for(&self.agents, node, self.config.agent_address_override.as_deref())
    }

    fn pod(&self, ns: &str, name: &str) -> Option<Arc<Pod>> {
        self.pods.get(&ObjectRef::new(name).within(ns))
    }

    /// The pod this PodMigration is about, if it still exists (same name *and* UID).
    fn source_pod(&self, pm: &PodMigration) -> Option<Arc<Pod>> {
        self.pod(&pm.namespace().unwrap_or_default(), &pm.spec.pod_name)
            .filter(|p| p.metadata.uid.as_deref() == Some(pm.spec.pod_uid.as_str()))
    }

    async fn write_status(&self, pm: &PodMigration, status: &PodMigrationStatus) -> Result<(), Error> {
        let api: Api<PodMigration> = Api::namespaced(self.client.clone(), &pm.namespace().unwrap_or_default());
        let patch = json!({ "apiVersion": "migrate.io/v1alpha1", "kind": "PodMigration", "status": status });
        api.patch_status(
            &pm.name_any(),
            &PatchParams::apply(api::FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
        Ok(())
    }

    /// Publish an Event on the PodMigration and on the pod it migrates.
    async fn event(&self, pm: &PodMigration, type_: EventType, reason: &str, note: String) {
        let event = Event {
            type_,
            reason: reason.to_string(),
            note: Some(note),
            action: "Migrate".to_string(),
            secondary: None,
        };
        let pod_ref = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: Some(pm.spec.pod_name.clone()),
            namespace: pm.namespace(),
            uid: Some(pm.spec.pod_uid.clone()),
            ..Default::default()
        };
        for reference in [pm.object_ref(&()), pod_ref] {
            if let Err(error) = self.recorder.publish(&event, &reference).await {
                tracing::warn!(%error, reason, "could not publish event");
            }
        }
    }

    /// Record a phase change's metrics.
    fn observe(&self, pm: &PodMigration, closed: Option<(Phase, f64)>, status: &PodMigrationStatus) {
        if let Some((phase, seconds)) = closed {
            self.metrics
                .phase_duration
                .get_or_create(&PhaseLabels { phase: phase.as_str() })
                .observe(seconds);
        }
        if !status.phase.is_terminal() || closed.is_none() {
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
                .observe(seconds_between(&created.0, &now));
        }
        if let Some(downtime) = status.downtime_seconds {
            self.metrics.downtime.observe(downtime);
        }
    }

    /// Once every drain migration of a node has finished, observe how long the drain took
    /// (first intercepted eviction to last migration finished), once per drain. Called from
    /// terminal reconciles, which run after the cache holds the terminal status.
    fn observe_drain(&self, node: &str) {
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
}

fn seconds_between(a: &Timestamp, b: &Timestamp) -> f64 {
    (b.as_millisecond() - a.as_millisecond()) as f64 / 1000.0
}

/// One step; writes the status when it changed.
async fn apply(pm: &PodMigration, ctx: &Context) -> Result<Action, Error> {
    let mut status = pm.status.clone().unwrap_or_default();
    let before = status.clone();
    let action = if pm.status.is_none() || status.phases.is_empty() {
        let closed = state::enter(&mut status, Phase::Pending, Timestamp::now());
        ctx.observe(pm, closed, &status);
        Ok(Action::requeue(Duration::ZERO))
    } else {
        match status.phase {
            Phase::Pending => match pm.spec.mode {
                Mode::Migrate => pending(pm, &mut status, ctx).await,
                Mode::Checkpoint => pending_checkpoint(pm, &mut status, ctx).await,
                Mode::Restore => pending_restore(pm, &mut status, ctx).await,
            },
            Phase::Checkpointing => checkpointing(pm, &mut status, ctx).await,
            Phase::Transferring => transferring(pm, &mut status, ctx).await,
            Phase::BuildingImage => building(pm, &mut status, ctx).await,
            Phase::Restoring => restoring(pm, &mut status, ctx).await,
            Phase::Succeeded | Phase::Failed => finished(pm, &mut status, ctx).await,
        }
    };
    if status != before {
        ctx.write_status(pm, &status).await?;
    }
    action
}

/// Move to `phase`, with metrics and an Event.
async fn transition(pm: &PodMigration, status: &mut PodMigrationStatus, ctx: &Context, phase: Phase, note: String) {
    let closed = state::enter(status, phase, Timestamp::now());
    status.message = Some(note.clone());
    ctx.observe(pm, closed, status);
    ctx.event(pm, EventType::Normal, phase.as_str(), note).await;
}

async fn fail(
    pm: &PodMigration,
    status: &mut PodMigrationStatus,
    ctx: &Context,
    reason: &str,
    message: String,
) -> Action {
    tracing::warn!(reason, %message, "migration failed");
    let closed = state::fail(status, reason, message.clone(), Timestamp::now());
    ctx.observe(pm, closed, status);
    ctx.event(pm, EventType::Warning, reason, message).await;
    Action::requeue(Duration::ZERO)
}

async fn pending(pm: &PodMigration, status: &mut PodMigrationStatus, ctx: &Context) -> Result<Action, Error> {
    let ns = pm.namespace().unwrap_or_default();
    let now = Timestamp::now();
    let Some(pod) = ctx.source_pod(pm) else {
        return Ok(fail(
            pm,
            status,
            ctx,
            "PodGone",
            format!("pod {ns}/{} vanished before the checkpoint", pm.spec.pod_name),
        )
        .await);
    };
    if pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) != Some(pm.spec.source_node.as_str()) {
        return Ok(fail(
            pm,
            status,
            ctx,
            "PodMoved",
            format!("pod is no longer on node {}", pm.spec.source_node),
        )
        .await);
    }

    // Concurrency limits: drain starts every eviction at once.
    let all = ctx.migrations.state();
    let active: Vec<_> = all.iter().filter(|m| m.phase().is_active()).collect();
    let on_node = active
        .iter()
        .filter(|m| m.spec.source_node == pm.spec.source_node)
        .count();
    if on_node >= ctx.config.max_per_node || active.len() >= ctx.config.max_total {
        let msg = format!(
            "queued: {on_node}/{} active on node {}, {}/{} in the cluster",
            ctx.config.max_per_node,
            pm.spec.source_node,
            active.len(),
            ctx.config.max_total
        );
        state::set_condition(status, CONDITION_QUEUED, true, "ConcurrencyLimit", &msg, now);
        status.message = Some(msg);
        return Ok(Action::requeue(Duration::from_secs(2)));
    }

    // A PodDisruptionBudget is the operator's availability contract, and a migration has
    // downtime between stop and restore: wait, as a plain drain would.
    if let Some(msg) = pdb_blocks(ctx, &ns, &pod).await? {
        state::set_condition(status, CONDITION_QUEUED, true, "PodDisruptionBudget", &msg, now);
        status.message = Some(msg);
        return Ok(Action::requeue(Duration::from_secs(5)));
    }

    let Some(_source_agent) = ctx.agent(&pm.spec.source_node) else {
        return Ok(fail(
            pm,
            status,
            ctx,
            "NoAgent",
            format!("no kube-migrate agent runs on source node {}", pm.spec.source_node),
        )
        .await);
    };
    let requested = pm
        .spec
        .target_node
        .clone()
        .or_else(|| api::requested_target(&pod).map(str::to_string));
    let target = match target_or_reason(ctx, &pod, &pm.spec.source_node, requested.as_deref()) {
        Ok(n) => n,
        Err(reason) => return Ok(fail(pm, status, ctx, "NoTarget", reason).await),
    };

    status.target_node = Some(target.clone());
    status.owner = controller_owner(&pod);
    if status.owner.is_none() {
        status.pod_template = Some(pod_template(&pod)?);
    }
    status.containers = containers_of(&pod);
    state::set_condition(status, CONDITION_QUEUED, false, "Started", "", now);
    transition(
        pm,
        status,
        ctx,
        Phase::Checkpointing,
        format!("checkpointing {} for node {target}", pm.spec.pod_name),
    )
    .await;
    Ok(Action::requeue(Duration::ZERO))
}

async fn pdb_blocks(ctx: &Context, ns: &str, pod: &Pod) -> Result<Option<String>, Error> {
    let api: Api<PodDisruptionBudget> = Api::namespaced(ctx.client.clone(), ns);
    let labels = pod.labels();
    for pdb in api.list(&ListParams::default()).await? {
        let Some(selector) = pdb.spec.as_ref().and_then(|s| s.selector.as_ref()) else {
            continue;
        };
        let matches = selector
            .match_labels
            .as_ref()
            .is_none_or(|m| m.iter().all(|(k, v)| labels.get(k) == Some(v)))
            && selector
                .match_expressions
                .as_deref()
                .unwrap_or_default()
                .iter()
                .all(|e| {
                    let value = labels.get(&e.key);
                    let values = e.values.as_deref().unwrap_or_default();
                    match e.operator.as_str() {
                        "In" => value.is_some_and(|v| values.contains(v)),
                        "NotIn" => value.is_none_or(|v| !values.contains(v)),
                        "Exists" => value.is_some(),
                        "DoesNotExist" => value.is_none(),
                        _ => false,
                    }
                });
        let allowed = pdb.status.as_ref().map_or(0, |s| s.disruptions_allowed);
        if matches && allowed < 1 {
            return Ok(Some(format!(
                "waiting for PodDisruptionBudget {} (0 disruptions allowed); kube-migrate never overrides a PDB",
                pdb.name_any()
            )));
        }
    }
    Ok(None)
}

/// The chosen node, or the message of a `NoTarget` failure naming every node's reason.
fn target_or_reason(ctx: &Context, pod: &Pod, source: &str, requested: Option<&str>) -> Result<String, String> {
    match choose_target(ctx, pod, source, requested) {
        Placement::Node(n) => Ok(n),
        Placement::None(reasons) => Err(format!("no eligible target node: {}", Placement::explain(&reasons))),
    }
}

fn choose_target(ctx: &Context, pod: &Pod, source: &str, requested: Option<&str>) -> Placement {
    let nodes = ctx.nodes.state();
    let node_refs: Vec<&Node> = nodes.iter().map(AsRef::as_ref).collect();
    let pods = ctx.pods.state();
    let bound: Vec<&Pod> = pods
        .iter()
        .map(AsRef::as_ref)
        .filter(|p| {
            let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
            !matches!(phase, Some("Succeeded" | "Failed"))
        })
        .collect();
    let has_agent = |node: &str| ctx.agent(node).is_some();
    placement::choose(&PlacementInput {
        pod,
        source_node: source,
        requested,
        nodes: &node_refs,
        pods: &bound,
        has_agent: &has_agent,
    })
}

fn controller_owner(pod: &Pod) -> Option<OwnerInfo> {
    pod.metadata
        .owner_references
        .as_ref()?
        .iter()
        .find(|o| o.controller == Some(true))
        .map(|o| OwnerInfo {
            api_version: o.api_version.clone(),
            kind: o.kind.clone(),
            name: o.name.clone(),
            uid: o.uid.clone(),
        })
}

/// What it takes to recreate a bare pod: its metadata (name, labels, annotations) and spec
/// without the fields the API server or the scheduler own.
fn pod_template(pod: &Pod) -> Result<serde_json::Value, Error> {
    let pod = &podmut::without_restore(pod);
    let mut spec = pod.spec.clone().unwrap_or_default();
    spec.node_name = None;
    let template = Pod {
        metadata: kube::api::ObjectMeta {
            name: pod.metadata.name.clone(),
            namespace: pod.metadata.namespace.clone(),
            labels: pod.metadata.labels.clone(),
            annotations: pod.metadata.annotations.clone(),
            ..Default::default()
        },
        spec: Some(spec),
        status: None,
    };
    Ok(serde_json::to_value(template)?)
}

async fn checkpointing(pm: &PodMigration, status: &mut PodMigrationStatus, ctx: &Context) -> Result<Action, Error> {
    let ns = pm.namespace().unwrap_or_default();
    let id = pm.uid().ok_or(Error::Missing("uid"))?;
    if status.source_stop_requested_at.is_none() {
        let Some(source) = ctx.agent(&pm.spec.source_node) else {
            return rollback(
                pm,
                status,
                ctx,
                "NoAgent",
                format!("the agent of node {} disappeared", pm.spec.source_node),
            )
            .await;
        };
        let pod_alive = ctx.source_pod(pm).is_some();
        if !pod_alive {
            return rollback(
                pm,
                status,
                ctx,
                "PodGone",
                "the pod vanished before it was stopped".into(),
            )
            .await;
        }
        let request = CheckpointRequest {
            namespace: ns.clone(),
            pod: pm.spec.pod_name.clone(),
            containers: status.containers.iter().map(|c| c.name.clone()).collect(),
            timeout_seconds: ctx.config.checkpoint_timeout.as_secs(),
        };
        let answer = match ctx.agent_client.checkpoint(&source, &id, &request).await {
            Ok(a) => a,
            Err(e) if e.retryable() && status.attempts + 1 < ctx.config.max_attempts => {
                status.attempts += 1;
                status.message = Some(format!("checkpoint attempt {} failed, retrying: {e}", status.attempts));
                return Ok(Action::requeue(state::backoff(status.attempts)));
            }
            Err(e) => return rollback(pm, status, ctx, "CheckpointFailed", e.to_string()).await,
        };
        for archive in answer.archives {
            if let Some(c) = status.containers.iter_mut().find(|c| c.name == archive.container) {
                c.archive = Some(archive.path);
                c.digest = Some(archive.digest);
                c.size_bytes = Some(archive.size_bytes);
            }
        }
        if let Some(missing) = status.containers.iter().find(|c| c.digest.is_none()) {
            return rollback(
                pm,
                status,
                ctx,
                "CheckpointFailed",
                format!("no archive for container {}", missing.name),
            )
            .await;
        }
        if pm.spec.mode == Mode::Checkpoint {
            // A backup: the pod keeps running; the image is built where the archives are.
            let bytes: u64 = status.containers.iter().filter_map(|c| c.size_bytes).sum();
            transition(
                pm,
                status,
                ctx,
                Phase::BuildingImage,
                format!("checkpoint taken ({}); building the image", human_bytes(bytes)),
            )
            .await;
            return Ok(Action::requeue(Duration::ZERO));
        }
        // Persist before evicting: the webhook lets our eviction through only once it sees this.
        status.source_stop_requested_at = Some(Time(Timestamp::now()));
        status.message = Some("checkpoint taken; stopping the source pod".into());
        ctx.write_status(pm, status).await?;
    }
    match evict_source(ctx, pm).await {
        Ok(()) => {}
        Err(kube::Error::Api(e)) if e.code == 429 => {
            // A PodDisruptionBudget refused: the source keeps running, so the checkpoint is
            // stale. Drop it and start over from Pending.
            release_archives(ctx, pm, status).await;
            status.source_stop_requested_at = None;
            for c in &mut status.containers {
                c.archive = None;
                c.digest = None;
                c.size_bytes = None;
            }
            status.archives_released = false;
            transition(
                pm,
                status,
                ctx,
                Phase::Pending,
                format!("the source stop was refused ({}); retrying", e.message),
            )
            .await;
            return Ok(Action::requeue(Duration::from_secs(5)));
        }
        Err(e) => {
            status.message = Some(format!("stopping the source pod failed, retrying: {e}"));
            return Ok(Action::requeue(Duration::from_secs(2)));
        }
    }
    let now = Timestamp::now();
    status.source_stopped_at = Some(Time(now));
    state::set_condition(
        status,
        CONDITION_SOURCE_STOPPED,
        true,
        "Evicted",
        "the source pod was evicted after the checkpoint",
        now,
    );
    let bytes: u64 = status.containers.iter().filter_map(|c| c.size_bytes).sum();
    transition(
        pm,
        status,
        ctx,
        Phase::Transferring,
        format!(
            "source stopped; sending {} to {}",
            human_bytes(bytes),
            pm.target_node().unwrap_or("?")
        ),
    )
    .await;
    Ok(Action::requeue(Duration::ZERO))
}

/// A backup of a running pod: checkpoint it where it runs and keep the image there.
async fn pending_checkpoint(
    pm: &PodMigration,
    status: &mut PodMigrationStatus,
    ctx: &Context,
) -> Result<Action, Error> {
    let ns = pm.namespace().unwrap_or_default();
    let Some(pod) = ctx.source_pod(pm) else {
        return Ok(fail(
            pm,
            status,
            ctx,
            "PodGone",
            format!("pod {ns}/{} not found", pm.spec.pod_name),
        )
        .await);
    };
    if ctx.agent(&pm.spec.source_node).is_none() {
        return Ok(fail(
            pm,
            status,
            ctx,
            "NoAgent",
            format!("no kube-migrate agent runs on node {}", pm.spec.source_node),
        )
        .await);
    }
    status.target_node = Some(pm.spec.source_node.clone());
    status.owner = controller_owner(&pod);
    status.pod_template = Some(pod_template(&pod)?);
    status.containers = containers_of(&pod);
    transition(
        pm,
        status,
        ctx,
        Phase::Checkpointing,
        format!("checkpointing {} (it keeps running)", pm.spec.pod_name),
    )
    .await;
    Ok(Action::requeue(Duration::ZERO))
}

/// Start a new pod from a stored checkpoint.
async fn pending_restore(pm: &PodMigration, status: &mut PodMigrationStatus, ctx: &Context) -> Result<Action, Error> {
    let ns = pm.namespace().unwrap_or_default();
    let api: Api<PodMigration> = Api::namespaced(ctx.client.clone(), &ns);
    let from = pm.spec.restore_from.clone().unwrap_or_default();
    let checkpoint = api
        .get_opt(&from)
        .await?
        .filter(|c| c.spec.mode == Mode::Checkpoint && c.phase() == Phase::Succeeded);
    let Some(checkpoint) = checkpoint else {
        return Ok(fail(
            pm,
            status,
            ctx,
            "CheckpointNotFound",
            format!("no stored checkpoint named {from} in {ns}"),
        )
        .await);
    };
    let stored = checkpoint.status.clone().unwrap_or_default();
    if ctx.pod(&ns, &pm.spec.pod_name).is_some() {
        return Ok(fail(
            pm,
            status,
            ctx,
            "PodExists",
            format!(
                "pod {ns}/{} already exists; restore under another name",
                pm.spec.pod_name
            ),
        )
        .await);
    }
    let Some(mut template) = stored
        .pod_template
        .clone()
        .and_then(|t| serde_json::from_value::<Pod>(t).ok())
    else {
        return Ok(fail(
            pm,
            status,
            ctx,
            "CheckpointNotFound",
            format!("checkpoint {from} has no pod template"),
        )
        .await);
    };
    template.metadata.name = Some(pm.spec.pod_name.clone());
    // A copy must not be adopted by the ReplicaSet or StatefulSet of the original.
    if let Some(labels) = template.metadata.labels.as_mut() {
        for key in [
            "pod-template-hash",
            "controller-revision-hash",
            "statefulset.kubernetes.io/pod-name",
        ] {
            labels.remove(key);
        }
    }
    let held_on = stored
        .target_node
        .clone()
        .unwrap_or_else(|| checkpoint.spec.source_node.clone());
    let target = match target_or_reason(ctx, &template, "", pm.spec.target_node.as_deref()) {
        Ok(n) => n,
        Err(reason) => return Ok(fail(pm, status, ctx, "NoTarget", reason).await),
    };
    status.pod_template = Some(serde_json::to_value(&template)?);
    status.source_id = checkpoint.uid();
    status.target_node = Some(target.clone());
    status.containers = stored
        .containers
        .iter()
        .map(|c| ContainerCheckpoint {
            image: None,
            ..c.clone()
        })
        .collect();
    if target == held_on {
        // The image is already where it must run.
        status.containers = stored.containers.clone();
        transition(
            pm,
            status,
            ctx,
            Phase::Restoring,
            format!("restoring {} on {target} from {from}", pm.spec.pod_name),
        )
        .await;
    } else {
        transition(
            pm,
            status,
            ctx,
            Phase::Transferring,
            format!("sending checkpoint {from} from {held_on} to {target}"),
        )
        .await;
    }
    Ok(Action::requeue(Duration::ZERO))
}

fn containers_of(pod: &Pod) -> Vec<ContainerCheckpoint> {
    pod.spec
        .as_ref()
        .map(|s| {
            s.containers
                .iter()
                .map(|c| ContainerCheckpoint {
                    name: c.name.clone(),
                    base_image: c.image.clone(),
                    ..Default::default()
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Evict the source pod through the Eviction API (so PodDisruptionBudgets hold), marked as
/// ours for the webhook, with a short grace period and the pod's UID as precondition.
async fn evict_source(ctx: &Context, pm: &PodMigration) -> Result<(), kube::Error> {
    let ns = pm.namespace().unwrap_or_default();
    let body = json!({
        "apiVersion": "policy/v1",
        "kind": "Eviction",
        "metadata": {
            "name": pm.spec.pod_name,
            "namespace": ns,
            "annotations": { STOP_SOURCE_OF: pm.name_any() },
        },
        "deleteOptions": {
            "gracePeriodSeconds": ctx.config.source_grace_period_seconds,
            "preconditions": { "uid": pm.spec.pod_uid },
        },
    });
    let url = format!("/api/v1/namespaces/{ns}/pods/{}/eviction", pm.spec.pod_name);
    let request = http::Request::post(url)
        .header("content-type", "application/json")
        .body(serde_json::to_vec(&body).map_err(kube::Error::SerdeError)?)
        .map_err(kube::Error::HttpError)?;
    match ctx.client.request::<serde_json::Value>(request).await {
        Ok(_) => Ok(()),
        // Already gone, or a different pod now holds the name: the source is stopped.
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(()),
        Err(e) => Err(e),
    }
}

async fn rollback(
    pm: &PodMigration,
    status: &mut PodMigrationStatus,
    ctx: &Context,
    reason: &str,
    message: String,
) -> Result<Action, Error> {
    release_archives(ctx, pm, status).await;
    Ok(fail(
        pm,
        status,
        ctx,
        reason,
        format!("{message}; rolled back, the source pod was not touched"),
    )
    .await)
}

async fn transferring(pm: &PodMigration, status: &mut PodMigrationStatus, ctx: &Context) -> Result<Action, Error> {
    let id = pm.uid().ok_or(Error::Missing("uid"))?;
    let Some(source) = ctx.agent(&pm.spec.source_node) else {
        return retry_after_stop(
            pm,
            status,
            ctx,
            format!("the agent of source node {} is unreachable", pm.spec.source_node),
        )
        .await;
    };
    let target = match ensure_target(pm, status, ctx).await {
        Some(t) => t,
        None => {
            return retry_after_stop(pm, status, ctx, "no node can take the pod right now".into()).await;
        }
    };
    let Some(target_agent) = ctx.agent(&target) else {
        return retry_after_stop(pm, status, ctx, format!("no agent on target node {target}")).await;
    };
    let request = PushRequest {
        target: target_agent,
        archives: archive_refs(status),
        target_id: Some(id.clone()),
    };
    let source_id = status.source_id.clone().unwrap_or_else(|| id.clone());
    match ctx.agent_client.push(&source, &source_id, &request).await {
        Ok(answer) => {
            status.transferred_bytes = Some(answer.bytes);
            let rate = if answer.seconds > 0.0 {
                answer.bytes as f64 / answer.seconds
            } else {
                0.0
            };
            transition(
                pm,
                status,
                ctx,
                Phase::BuildingImage,
                format!(
                    "{} verified on {target} ({}/s); building the checkpoint image",
                    human_bytes(answer.bytes),
                    human_bytes(rate as u64)
                ),
            )
            .await;
            Ok(Action::requeue(Duration::ZERO))
        }
        Err(e) => retry_after_stop(pm, status, ctx, format!("transfer to {target} failed: {e}")).await,
    }
}

/// The target chosen in Pending, or a new one if it vanished or became unfit since.
async fn ensure_target(pm: &PodMigration, status: &mut PodMigrationStatus, ctx: &Context) -> Option<String> {
    let current = status.target_node.clone()?;
    let node_ok = ctx.nodes.get(&ObjectRef::new(&current)).is_some_and(|n| {
        n.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
    });
    if node_ok && ctx.agent(&current).is_some() {
        return Some(current);
    }
    // Re-place using the pod as it was (template for bare pods, or the original spec shape).
    let pod: Pod = match &status.pod_template {
        Some(t) => serde_json::from_value(t.clone()).ok()?,
        None => Pod::default(),
    };
    match choose_target(ctx, &pod, &pm.spec.source_node, pm.spec.target_node.as_deref()) {
        Placement::Node(n) => {
            ctx.event(
                pm,
                EventType::Warning,
                "TargetChanged",
                format!("target {current} is gone or unfit; using {n}"),
            )
            .await;
            status.target_node = Some(n.clone());
            Some(n)
        }
        Placement::None(_) => None,
    }
}

fn archive_refs(status: &PodMigrationStatus) -> Vec<ArchiveRef> {
    status
        .containers
        .iter()
        .map(|c| ArchiveRef {
            container: c.name.clone(),
            digest: c.digest.clone().unwrap_or_default(),
            size_bytes: c.size_bytes.unwrap_or(0),
        })
        .collect()
}

/// After the source stopped, failures are retried with backoff until the restore deadline;
/// then the replacement starts from its original image, so the workload runs again.
async fn retry_after_stop(
    pm: &PodMigration,
    status: &mut PodMigrationStatus,
    ctx: &Context,
    message: String,
) -> Result<Action, Error> {
    let now = Timestamp::now();
    if pm.spec.mode != Mode::Migrate && status.attempts + 1 >= ctx.config.max_attempts {
        // Backups and restores stop nothing: give up cleanly, the checkpoint stays.
        return Ok(fail(pm, status, ctx, "Unavailable", message).await);
    }
    let stopped = status.source_stopped_at.as_ref().map_or(now, |t| t.0);
    if seconds_between(&stopped, &now) > ctx.config.restore_deadline.as_secs_f64() {
        start_fresh(pm, status, ctx).await?;
        return Ok(fail(
            pm,
            status,
            ctx,
            "StateLost",
            format!("{message}; gave up after the restore deadline, the replacement starts from its original image"),
        )
        .await);
    }
    status.attempts += 1;
    state::set_condition(status, CONDITION_DEGRADED, true, "Retrying", &message, now);
    status.message = Some(format!("{message} (attempt {}, retrying)", status.attempts));
    ctx.event(pm, EventType::Warning, "Retrying", message).await;
    Ok(Action::requeue(state::backoff(status.attempts)))
}

async fn building(pm: &PodMigration, status: &mut PodMigrationStatus, ctx: &Context) -> Result<Action, Error> {
    let id = pm.uid().ok_or(Error::Missing("uid"))?;
    let target = status.target_node.clone().ok_or(Error::Missing("status.targetNode"))?;
    let Some(agent) = ctx.agent(&target) else {
        return retry_after_stop(pm, status, ctx, format!("no agent on target node {target}")).await;
    };
    let request = ImageRequest {
        namespace: pm.namespace().unwrap_or_default(),
        pod: pm.spec.pod_name.clone(),
        archives: archive_refs(status),
    };
    match ctx.agent_client.build_image(&agent, &id, &request).await {
        Ok(answer) => {
            for image in answer.images {
                if let Some(c) = status.containers.iter_mut().find(|c| c.name == image.container) {
                    c.image = Some(image.image);
                }
            }
            if pm.spec.mode == Mode::Checkpoint {
                let message = format!(
                    "checkpoint stored on {target}; restore it with: kubectl migrate restore {}",
                    pm.name_any()
                );
                let closed = state::succeed(status, message.clone(), Timestamp::now());
                ctx.observe(pm, closed, status);
                ctx.event(pm, EventType::Normal, "CheckpointStored", message).await;
                return Ok(Action::requeue(Duration::ZERO));
            }
            transition(
                pm,
                status,
                ctx,
                Phase::Restoring,
                format!("checkpoint image ready on {target}; restoring"),
            )
            .await;
            Ok(Action::requeue(Duration::ZERO))
        }
        Err(e) => retry_after_stop(pm, status, ctx, format!("image build on {target} failed: {e}")).await,
    }
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Why a released replacement is not coming up, if it looks stuck.
fn restore_trouble(pod: &Pod) -> Option<String> {
    let status = pod.status.as_ref()?;
    if status.phase.as_deref() == Some("Failed") {
        return Some(format!(
            "replacement pod failed: {}",
            status.message.clone().unwrap_or_default()
        ));
    }
    status
        .container_statuses
        .as_deref()
        .unwrap_or_default()
        .iter()
        .find_map(|c| {
            let waiting = c.state.as_ref()?.waiting.as_ref()?;
            let reason = waiting.reason.as_deref()?;
            matches!(
                reason,
                "CrashLoopBackOff" | "ErrImagePull" | "ImagePullBackOff" | "CreateContainerError" | "RunContainerError"
            )
            .then(|| {
                format!(
                    "container {}: {reason}: {}",
                    c.name,
                    waiting.message.clone().unwrap_or_default()
                )
            })
        })
}

async fn restoring(pm: &PodMigration, status: &mut PodMigrationStatus, ctx: &Context) -> Result<Action, Error> {
    let ns = pm.namespace().unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let Some(replacement) = find_replacement(pm, status, ctx, &pods).await? else {
        status.message = Some("waiting for the replacement pod".into());
        return Ok(Action::requeue(Duration::from_secs(1)));
    };
    if podmut::is_gated(&replacement) {
        let mut desired = (*replacement).clone();
        let view = PodMigration {
            status: Some(status.clone()),
            ..pm.clone()
        };
        podmut::apply_restore(&mut desired, &view);
        podmut::remove_gate(&mut desired);
        patch_pod(&pods, &replacement, &desired).await?;
        status.replacement = Some(PodRef {
            name: replacement.name_any(),
            uid: replacement.uid(),
        });
        ctx.event(
            pm,
            EventType::Normal,
            "Released",
            format!(
                "released {} onto {}",
                replacement.name_any(),
                pm.target_node().unwrap_or("?")
            ),
        )
        .await;
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    status.replacement = Some(PodRef {
        name: replacement.name_any(),
        uid: replacement.uid(),
    });
    if is_ready(&replacement) {
        let now = Timestamp::now();
        if let Some(stopped) = &status.source_stopped_at {
            status.downtime_seconds = Some((seconds_between(&stopped.0, &now) * 1000.0).round() / 1000.0);
        }
        let message = format!(
            "{} restored on {} (downtime {:.1}s)",
            replacement.name_any(),
            pm.target_node().unwrap_or("?"),
            status.downtime_seconds.unwrap_or_default()
        );
        let closed = state::succeed(status, message.clone(), now);
        ctx.observe(pm, closed, status);
        ctx.event(pm, EventType::Normal, "Succeeded", message).await;
        return Ok(Action::requeue(Duration::ZERO));
    }
    if let Some(trouble) = restore_trouble(&replacement) {
        return retry_after_stop(pm, status, ctx, trouble).await;
    }
    status.message = Some(format!("waiting for {} to become Ready", replacement.name_any()));
    Ok(Action::requeue(Duration::from_secs(1)))
}

/// The pod that restores this migration: bound by annotation, or gated for the owner and
/// bound now, or (bare pod) created now.
async fn find_replacement(
    pm: &PodMigration,
    status: &PodMigrationStatus,
    ctx: &Context,
    pods: &Api<Pod>,
) -> Result<Option<Arc<Pod>>, Error> {
    let ns = pm.namespace().unwrap_or_default();
    let name = pm.name_any();
    let mut bound: Vec<Arc<Pod>> = ctx
        .pods
        .state()
        .into_iter()
        .filter(|p| {
            p.namespace().as_deref() == Some(&ns)
                && api::restore_of(p) == Some(&name)
                && p.uid().as_deref() != Some(&pm.spec.pod_uid)
        })
        .collect();
    bound.sort_by_key(|p| p.metadata.creation_timestamp.clone());
    if let Some(first) = bound.first() {
        // Two replacements claimed one migration (webhook replicas raced): the later ones
        // never ran; deleting them lets their controller recreate them for another migration.
        for extra in bound.iter().skip(1).filter(|p| podmut::is_gated(p)) {
            let _ = pods.delete(&extra.name_any(), &DeleteParams::default()).await;
        }
        return Ok(Some(Arc::clone(first)));
    }
    match &status.owner {
        Some(owner) => {
            let mut gated: Vec<Arc<Pod>> = ctx
                .pods
                .state()
                .into_iter()
                .filter(|p| {
                    p.namespace().as_deref() == Some(&ns)
                        && p.annotations().get(api::RESTORE_OWNER) == Some(&owner.uid)
                        && api::restore_of(p).is_none()
                })
                .collect();
            gated.sort_by_key(|p| p.metadata.creation_timestamp.clone());
            let Some(pod) = gated.first() else {
                return Ok(None);
            };
            let mut desired = (**pod).clone();
            let view = PodMigration {
                status: Some(status.clone()),
                ..pm.clone()
            };
            podmut::apply_restore(&mut desired, &view);
            patch_pod(pods, pod, &desired).await?;
            Ok(None) // seen bound on the next round, from the cache
        }
        None => {
            // A bare pod: recreate it under its name once the old one is gone.
            if let Some(old) = ctx.pod(&ns, &pm.spec.pod_name)
                && old.uid().as_deref() == Some(&pm.spec.pod_uid)
            {
                return Ok(None);
            }
            let template = status
                .pod_template
                .clone()
                .ok_or(Error::Missing("status.podTemplate"))?;
            let mut pod: Pod = serde_json::from_value(template)?;
            let view = PodMigration {
                status: Some(status.clone()),
                ..pm.clone()
            };
            podmut::apply_restore(&mut pod, &view);
            match pods
                .create(
                    &PostParams {
                        field_manager: Some(api::FIELD_MANAGER.into()),
                        ..Default::default()
                    },
                    &pod,
                )
                .await
            {
                Ok(created) => Ok(Some(Arc::new(created))),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(None),
                Err(e) => Err(e.into()),
            }
        }
    }
}

/// JSON-patch `current` into `desired`, guarded by the resourceVersion we read.
async fn patch_pod(pods: &Api<Pod>, current: &Pod, desired: &Pod) -> Result<(), Error> {
    let diff = podmut::patch(current, desired)?;
    if diff.0.is_empty() {
        return Ok(());
    }
    let mut ops =
        vec![json!({ "op": "test", "path": "/metadata/resourceVersion", "value": current.resource_version() })];
    ops.extend(serde_json::to_value(&diff)?.as_array().cloned().unwrap_or_default());
    let patch: json_patch::Patch = serde_json::from_value(serde_json::Value::Array(ops))?;
    pods.patch(&current.name_any(), &PatchParams::default(), &Patch::<()>::Json(patch))
        .await?;
    Ok(())
}

/// Give up on the checkpoint: let the replacement run its original image, so the workload
/// runs again (its state is lost, which the Failed status and a Warning Event say).
async fn start_fresh(pm: &PodMigration, status: &mut PodMigrationStatus, ctx: &Context) -> Result<(), Error> {
    let ns = pm.namespace().unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let originals: Vec<(String, Option<String>)> = status
        .containers
        .iter()
        .map(|c| (c.name.clone(), c.base_image.clone()))
        .collect();
    let fresh = |pod: &mut Pod| {
        podmut::remove_gate(pod);
        if let Some(spec) = pod.spec.as_mut() {
            for c in &mut spec.containers {
                if let Some((_, Some(image))) = originals.iter().find(|(n, _)| *n == c.name) {
                    c.image = Some(image.clone());
                }
            }
        }
    };
    let name = pm.name_any();
    let candidates: Vec<Arc<Pod>> = ctx
        .pods
        .state()
        .into_iter()
        .filter(|p| p.namespace().as_deref() == Some(&ns) && api::restore_of(p) == Some(&name))
        .collect();
    if candidates.is_empty()
        && status.owner.is_none()
        && ctx.pod(&ns, &pm.spec.pod_name).is_none()
        && let Some(template) = status.pod_template.clone()
    {
        let mut pod: Pod = serde_json::from_value(template)?;
        fresh(&mut pod);
        pods.create(&PostParams::default(), &pod).await?;
    }
    for pod in candidates {
        let mut desired = (*pod).clone();
        fresh(&mut desired);
        patch_pod(&pods, &pod, &desired).await?;
    }
    Ok(())
}

async fn finished(pm: &PodMigration, status: &mut PodMigrationStatus, ctx: &Context) -> Result<Action, Error> {
    if pm.spec.trigger == Trigger::Drain {
        ctx.observe_drain(&pm.spec.source_node);
    }
    // A stored checkpoint is kept until its PodMigration is deleted (finalizer cleanup).
    let keep = pm.spec.mode == Mode::Checkpoint && status.phase == Phase::Succeeded;
    if !status.archives_released && !keep {
        release_archives(ctx, pm, status).await;
    }
    Ok(Action::await_change())
}

/// Tell the agents to drop what they no longer need: the source's archives always; the
/// target's image only when the migration failed (a restored container that restarts is
/// created from the image again).
async fn release_archives(ctx: &Context, pm: &PodMigration, status: &mut PodMigrationStatus) {
    let Some(id) = pm.uid() else { return };
    let mut nodes = vec![pm.spec.source_node.clone()];
    if status.phase == Phase::Failed
        && let Some(t) = status.target_node.clone()
    {
        nodes.push(t);
    }
    for node in nodes {
        if let Some(agent) = ctx.agent(&node)
            && let Err(error) = ctx.agent_client.delete(&agent, &id).await
        {
            tracing::warn!(%error, node, "could not release archives (the agent's garbage collection will)");
        }
    }
    status.archives_released = true;
}

/// The PodMigration is being deleted: drop everything on every node involved.
async fn cleanup(pm: &PodMigration, ctx: &Context) -> Result<Action, Error> {
    let Some(id) = pm.uid() else {
        return Ok(Action::await_change());
    };
    let mut nodes = vec![pm.spec.source_node.clone()];
    nodes.extend(pm.target_node().map(str::to_string));
    for node in nodes {
        if let Some(agent) = ctx.agent(&node)
            && let Err(error) = ctx.agent_client.delete(&agent, &id).await
        {
            tracing::warn!(%error, node, "cleanup on agent failed (its garbage collection will finish it)");
        }
    }
    Ok(Action::await_change())
}

pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}
