//! HTTP handlers of the two webhooks. They read the cluster from watch caches and answer in
//! a few milliseconds; the only API call on the hot path is creating a PodMigration.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{Json, Router, body::Bytes, extract::State, http::Uri, routing::post};
use k8s_openapi::{
    api::{
        core::v1::{Node, Pod},
        policy::v1::Eviction,
    },
    jiff::Timestamp,
};
use kube::{
    Api, Client, ResourceExt,
    api::{ObjectMeta, PostParams},
    core::{
        DynamicObject,
        admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation},
    },
    runtime::reflector::{ObjectRef, Store},
};
use tracing::{Span, instrument};

use super::{
    eviction::{self, Decision, EvictionRequest, STOP_SOURCE_OF, Snapshot},
    hold::{self, Holds},
    pod::{self as podmut, PodDecision},
    review,
};
use crate::{
    api::{self, PodMigration},
    metrics::{DecisionLabels, HoldLabels, Metrics, WebhookLabels},
};

pub struct WebhookState {
    /// The username the controller acts as (its own evictions carry `STOP_SOURCE_OF`).
    pub controller_user: String,
    pub client: Client,
    pub pods: Store<Pod>,
    pub nodes: Store<Node>,
    pub migrations: Store<PodMigration>,
    pub metrics: Arc<Metrics>,
    /// Namespaces (for the `migrate.io/opted-in` label of the eviction webhook's selector).
    pub namespaces: Store<k8s_openapi::api::core::v1::Namespace>,
    /// Image of the restore init container added to replacements with emptyDirs.
    pub helper_image: crate::replacement::HelperImage,
    /// Evictions held open until their migration's state is safe.
    pub holds: Holds,
}

pub fn router(state: Arc<WebhookState>) -> Router {
    Router::new()
        .route("/validate/eviction", post(validate_eviction))
        .route("/mutate/pod", post(mutate_pod))
        .with_state(state)
}

type Review = Json<AdmissionReview<DynamicObject>>;

impl WebhookState {
    fn record(&self, webhook: &'static str, result: &'static str, started: Instant) {
        self.record_held(webhook, result, started, Duration::ZERO);
    }

    /// Record a decision; `held` (time spent waiting for a migration) is not decision latency.
    fn record_held(&self, webhook: &'static str, result: &'static str, started: Instant, held: Duration) {
        self.metrics
            .webhook_decisions
            .get_or_create(&DecisionLabels { webhook, result })
            .inc();
        self.metrics
            .webhook_latency
            .get_or_create(&WebhookLabels { webhook })
            .observe(started.elapsed().saturating_sub(held).as_secs_f64());
    }

    /// Parse a body, or the well-formed denial to send back (recorded in the metrics).
    fn parse(
        &self,
        webhook: &'static str,
        body: &[u8],
        started: Instant,
    ) -> Result<AdmissionRequest<DynamicObject>, Box<Review>> {
        review::parse(body).map_err(|(error, uid)| {
            tracing::warn!(%error, webhook, "malformed AdmissionReview");
            self.record(webhook, error.metric_label(), started);
            Box::new(Json(review::invalid(uid, &error)))
        })
    }

    /// Opted-in static pods bound to `node`, other than `except`, as `namespace/name`.
    fn opted_in_static_pods(&self, node: &str, except: Option<&Pod>) -> Vec<String> {
        let except = except.and_then(|p| p.metadata.uid.clone());
        let mut names: Vec<String> = self
            .pods
            .state_filter(|p| {
                p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node)
                    && crate::preflight::is_mirror(p)
                    && api::is_stateful(p)
                    && p.metadata.uid != except
            })
            .iter()
            .map(|p| format!("{}/{}", p.namespace().unwrap_or_default(), p.name_any()))
            .collect();
        names.sort();
        names
    }

    /// A migration of the requested pod runs and has not made its state safe yet (as far as
    /// this replica's cache shows).
    fn migrating(&self, req: &EvictionRequest<'_>) -> bool {
        self.migrations_of(req.namespace, Some(req.pod_name))
            .iter()
            .any(|m| m.spec.mode == api::Mode::Migrate && !m.phase().is_terminal() && !m.state_is_safe())
    }

    fn migrations_of(&self, namespace: &str, pod_name: Option<&str>) -> Vec<Arc<PodMigration>> {
        self.migrations.state_filter(|m| {
            m.metadata.namespace.as_deref() == Some(namespace) && pod_name.is_none_or(|n| m.spec.pod_name == n)
        })
    }

    /// The pod from the cache; on a miss (a pod created a moment ago) from the API server.
    async fn pod(&self, namespace: &str, name: &str) -> Option<Arc<Pod>> {
        if let Some(pod) = self.pods.get(&ObjectRef::new(name).within(namespace)) {
            return Some(pod);
        }
        let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        match tokio::time::timeout(std::time::Duration::from_secs(2), api.get_opt(name)).await {
            Ok(Ok(pod)) => pod.map(Arc::new),
            Ok(Err(error)) => {
                tracing::warn!(%error, "pod lookup failed");
                None
            }
            Err(_) => None,
        }
    }
}

#[instrument(skip_all, fields(uid, namespace, pod, decision))]
async fn validate_eviction(State(state): State<Arc<WebhookState>>, uri: Uri, body: Bytes) -> Review {
    let started = Instant::now();
    let request = match state.parse("eviction", &body, started) {
        Ok(r) => r,
        Err(answer) => return *answer,
    };
    let span = Span::current();
    span.record("uid", request.uid.as_str());
    span.record("namespace", request.namespace.as_deref().unwrap_or_default());
    span.record("pod", request.name.as_str());
    let budget = hold::budget(state.holds.max, uri.query());
    let (result, response, held) = eviction_response(&state, &request, budget).await;
    span.record("decision", result);
    state.record_held("eviction", result, started, held);
    tracing::info!(
        allowed = response.allowed,
        code = response.result.code,
        held_ms = held.as_millis() as u64,
        "eviction decided"
    );
    Json(response.into_review())
}

/// A decision label and the answer that goes with it.
type Answer = (&'static str, AdmissionResponse);

/// A 400 denial for a request that is well-formed JSON but not what the webhook handles.
fn malformed(request: &AdmissionRequest<DynamicObject>, message: String) -> Answer {
    (
        "malformed_review",
        review::deny(request, 400, "BadRequest", format!("kube-migrate: {message}")),
    )
}

/// The request's object as a typed resource, or why it is not one.
fn typed<T: serde::de::DeserializeOwned>(object: &DynamicObject, what: &str) -> Result<T, String> {
    serde_json::to_value(object)
        .and_then(serde_json::from_value)
        .map_err(|e| format!("object is not {what}: {e}"))
}

fn is_eviction(request: &AdmissionRequest<DynamicObject>) -> bool {
    request.resource.resource == "pods"
        && request.sub_resource.as_deref() == Some("eviction")
        && request.operation == Operation::Create
}

/// The answer to an eviction, its metric label, and how long it was held.
async fn eviction_response(
    state: &WebhookState,
    request: &AdmissionRequest<DynamicObject>,
    budget: Duration,
) -> (&'static str, AdmissionResponse, Duration) {
    if !is_eviction(request) {
        let msg = format!(
            "kube-migrate: /validate/eviction got {:?} {}/{:?}; only pods/eviction CREATE is handled, allowed unchanged",
            request.operation, request.resource.resource, request.sub_resource
        );
        return ("unexpected_request", review::allow(request, Some(msg)), Duration::ZERO);
    }
    let unheld = |(result, response): Answer| (result, response, Duration::ZERO);
    let Some(namespace) = request.namespace.as_deref() else {
        return unheld(malformed(request, "eviction request without namespace".into()));
    };
    let eviction: Option<Eviction> = match request.object.as_ref().map(|o| typed(o, "an Eviction")) {
        Some(Ok(e)) => Some(e),
        Some(Err(why)) => return unheld(malformed(request, why)),
        None => None,
    };
    let object_dry_run = eviction
        .as_ref()
        .and_then(|e| e.delete_options.as_ref())
        .and_then(|o| o.dry_run.as_ref())
        .is_some_and(|d| !d.is_empty());
    let marked = eviction
        .as_ref()
        .and_then(|e| e.metadata.annotations.as_ref())
        .and_then(|a| a.get(STOP_SOURCE_OF))
        .cloned();
    // The mark lets an eviction through: honoured from the controller's identity only, or
    // anyone able to evict could stop an opted-in pod without migrating it.
    let user = request.user_info.username.as_deref().unwrap_or_default();
    let stop_source_of = marked.filter(|m| {
        let ours = user == state.controller_user;
        if !ours {
            tracing::warn!(%user, migration = %m, "ignoring {STOP_SOURCE_OF} on an eviction not made by the controller");
        }
        ours
    });
    let preconditions = eviction
        .as_ref()
        .and_then(|e| e.delete_options.as_ref())
        .and_then(|o| o.preconditions.as_ref());
    let req = EvictionRequest {
        namespace,
        pod_name: &request.name,
        dry_run: request.dry_run || object_dry_run,
        stop_source_of: stop_source_of.as_deref(),
        precondition_uid: preconditions.and_then(|p| p.uid.as_deref()),
        precondition_resource_version: preconditions.and_then(|p| p.resource_version.as_deref()),
    };
    let (decision, warnings) = decide_now(state, &req).await;
    // A migration is (now) running: answer 429 at once, or hold the request until its state is
    // safe (then the eviction goes through and the drain moves on without its 5 s retry).
    let (result, message) = match decision {
        Decision::Start { name, spec, refusal } => match start(state, namespace, &name, spec).await {
            Ok(_) if refusal.is_some() => {
                let message = format!(
                    "kube-migrate cannot migrate {namespace}/{}: {}; recorded in PodMigration {name}, \
                     the next retry follows the pod's {}",
                    request.name,
                    refusal.unwrap_or_default(),
                    api::ON_FAILURE
                );
                let response = with_warnings(too_many(request, message), warnings);
                return ("started", response, Duration::ZERO);
            }
            Ok(target) => (
                "started",
                format!(
                    "kube-migrate started live migration {name} of {namespace}/{} to {target}; \
                     the eviction is allowed once the state is safe on the target",
                    request.name
                ),
            ),
            Err(e) => {
                let (code, reason, message) = if e.is_permanent() {
                    (
                        500,
                        "InternalError",
                        format!("kube-migrate could not start the migration: {e}"),
                    )
                } else {
                    (
                        429,
                        "TooManyRequests",
                        format!("kube-migrate could not start the migration yet ({e}); retrying"),
                    )
                };
                return ("error", review::deny(request, code, reason, message), Duration::ZERO);
            }
        },
        Decision::Wait { message } => ("waiting", message),
        other => return (other.result(), answer(request, other, warnings), Duration::ZERO),
    };
    let Some(mut hold) = state.holds.acquire(budget) else {
        let response = with_warnings(too_many(request, message), warnings);
        return (result, response, Duration::ZERO);
    };
    let held_since = Instant::now();
    let mut message = message;
    let (outcome, result, response) = loop {
        if !hold.next_change().await {
            let response = with_warnings(too_many(request, message), warnings);
            break ("expired", result, response);
        }
        match decide_now(state, &req).await {
            (Decision::Wait { message: now }, _) => message = now,
            // The cache has not seen the migration this request created yet.
            (Decision::Start { .. }, _) => {}
            // The source is gone (removed once killed) before this replica's migration cache
            // showed the state safe (two watches): the migration's next event says where.
            (
                Decision::Allow {
                    result: "allowed_no_pod",
                    ..
                },
                _,
            ) if state.migrating(&req) => {}
            (decision, warnings) => {
                let result = decision.result();
                break (result, result, answer(request, decision, warnings));
            }
        }
    };
    let held = held_since.elapsed();
    state
        .metrics
        .eviction_hold
        .get_or_create(&HoldLabels { outcome })
        .observe(held.as_secs_f64());
    (result, response, held)
}

/// Decide on what the caches hold now; the warnings go with an Allow or Start answer.
async fn decide_now(state: &WebhookState, req: &EvictionRequest<'_>) -> (Decision, Vec<String>) {
    let pod = state.pod(req.namespace, req.pod_name).await;
    let pod_node_schedulable = pod
        .as_ref()
        .and_then(|p| p.spec.as_ref())
        .and_then(|s| s.node_name.as_deref())
        .and_then(|n| state.nodes.get(&ObjectRef::new(n)))
        .map(|n| n.spec.as_ref().and_then(|s| s.unschedulable) != Some(true));
    let migrations = state.migrations_of(req.namespace, Some(req.pod_name));
    let static_on_node = pod
        .as_ref()
        .and_then(|p| p.spec.as_ref())
        .and_then(|s| s.node_name.as_deref())
        .map(|node| state.opted_in_static_pods(node, pod.as_deref()))
        .unwrap_or_default();
    let snapshot = Snapshot {
        pod: pod.as_deref(),
        pod_node_schedulable,
        migrations: &migrations,
        static_on_node: &static_on_node,
        now: Timestamp::now(),
    };
    let decision = eviction::decide(req, &snapshot);
    let warnings = match &decision {
        Decision::Allow { .. } | Decision::Start { .. } => eviction::warnings(pod.as_deref(), &snapshot),
        _ => Vec::new(),
    };
    (decision, warnings)
}

/// The answer to a decision that needs no API call.
fn answer(request: &AdmissionRequest<DynamicObject>, decision: Decision, warnings: Vec<String>) -> AdmissionResponse {
    let response = match decision {
        Decision::Allow { warning, .. } => review::allow(request, warning),
        Decision::Wait { message } | Decision::Block { message } => too_many(request, message),
        Decision::Gone { message } => review::deny(request, 404, "NotFound", message),
        Decision::Start { name, .. } => {
            too_many(request, format!("kube-migrate is starting migration {name}; retrying"))
        }
    };
    with_warnings(response, warnings)
}

/// 429: kubectl drain retries the eviction (in 5 s).
fn too_many(request: &AdmissionRequest<DynamicObject>, message: String) -> AdmissionResponse {
    review::deny(request, 429, "TooManyRequests", message)
}

fn with_warnings(mut response: AdmissionResponse, warnings: Vec<String>) -> AdmissionResponse {
    if !warnings.is_empty() {
        response.warnings.get_or_insert_with(Vec::new).extend(warnings);
    }
    response
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct StartError(kube::Error);

impl StartError {
    /// Errors that retrying will not fix (CRD missing, RBAC): fail the drain loudly instead.
    fn is_permanent(&self) -> bool {
        matches!(&self.0, kube::Error::Api(e) if matches!(e.code, 400 | 403 | 404 | 422))
    }
}

/// Create the PodMigration (idempotent: the name is derived from the pod UID).
async fn start(
    state: &WebhookState,
    namespace: &str,
    name: &str,
    spec: api::PodMigrationSpec,
) -> Result<String, StartError> {
    let target = spec
        .target_node
        .clone()
        .unwrap_or_else(|| "a node chosen by the controller".into());
    let pm = PodMigration {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            labels: Some(
                [
                    (api::POD_UID_LABEL.to_string(), spec.pod_uid.clone()),
                    (api::SOURCE_NODE_LABEL.to_string(), spec.source_node.clone()),
                ]
                .into(),
            ),
            ..Default::default()
        },
        spec,
        status: None,
    };
    let api: Api<PodMigration> = Api::namespaced(state.client.clone(), namespace);
    let params = PostParams {
        field_manager: Some(api::FIELD_MANAGER.into()),
        ..Default::default()
    };
    match api.create(&params, &pm).await {
        Ok(_) => {
            tracing::info!(migration = name, "migration started");
            Ok(target)
        }
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(target),
        Err(e) => Err(StartError(e)),
    }
}

#[instrument(skip_all, fields(uid, namespace, pod, decision))]
async fn mutate_pod(State(state): State<Arc<WebhookState>>, body: Bytes) -> Review {
    let started = Instant::now();
    let request = match state.parse("pod", &body, started) {
        Ok(r) => r,
        Err(answer) => return *answer,
    };
    // An opted-in pod's namespace must be in the eviction webhook's scope before the pod can
    // run (so before any eviction of it): label it now, once per namespace.
    if !request.dry_run
        && let Some(ns) = request.namespace.as_deref()
        && request
            .object
            .as_ref()
            .and_then(|o| typed::<Pod>(o, "a Pod").ok())
            .is_some_and(|p| api::is_stateful(&p))
        && let Err(error) = super::namespaces::ensure(&state.client, &state.namespaces, ns).await
    {
        tracing::warn!(%error, namespace = ns, "could not label the namespace of an opted-in pod; the leader retries");
    }
    let (result, response) = pod_response(&state, &request);
    let span = Span::current();
    span.record("uid", request.uid.as_str());
    span.record("namespace", request.namespace.as_deref().unwrap_or_default());
    span.record("decision", result);
    state.record("pod", result, started);
    Json(response.into_review())
}

/// A replacement with emptyDirs gets the restore init container now or never (init
/// containers are immutable). Without its image the controller replaces the pod later.
fn add_helper(state: &WebhookState, pod: &mut Pod) {
    match state.helper_image.get() {
        Some(image) => podmut::add_restore_helper(pod, &image),
        None if !crate::replacement::empty_dirs(pod).is_empty() => {
            tracing::warn!("no image for the restore init container (agent DaemonSet not seen yet)");
        }
        None => {}
    }
}

fn pod_response(state: &WebhookState, request: &AdmissionRequest<DynamicObject>) -> (&'static str, AdmissionResponse) {
    if request.resource.resource != "pods" || request.sub_resource.is_some() || request.operation != Operation::Create {
        return ("unexpected_request", review::allow(request, None));
    }
    let Some(object) = &request.object else {
        return malformed(request, "pod CREATE without object".into());
    };
    let pod: Pod = match typed(object, "a Pod") {
        Ok(p) => p,
        Err(why) => return malformed(request, why),
    };
    let namespace = request
        .namespace
        .clone()
        .or_else(|| pod.namespace())
        .unwrap_or_default();
    let migrations = state.migrations_of(&namespace, None);
    let decision = podmut::decide(&pod, &migrations);
    let mut mutated = pod.clone();
    match &decision {
        PodDecision::Untouched => return (decision.result(), review::allow(request, None)),
        PodDecision::Restore { migration } => {
            let Some(m) = migrations
                .iter()
                .find(|m| m.metadata.name.as_deref() == Some(migration))
            else {
                return ("untouched", review::allow(request, None));
            };
            podmut::apply_restore(&mut mutated, m);
            podmut::add_pull_secrets(&mut mutated, [migration.as_str()]);
            add_helper(state, &mut mutated);
        }
        PodDecision::GateForOwner { owner_uid, candidates } => {
            podmut::gate_for_owner(&mut mutated, owner_uid);
            podmut::add_pull_secrets(&mut mutated, candidates.iter().map(String::as_str));
            add_helper(state, &mut mutated);
        }
    }
    let response = podmut::patch(&pod, &mutated)
        .map_err(|e| e.to_string())
        .and_then(|patch| {
            review::allow(request, None)
                .with_patch(patch)
                .map_err(|e| e.to_string())
        });
    match response {
        Ok(r) => (decision.result(), r),
        Err(e) => (
            "error",
            review::deny(
                request,
                500,
                "InternalError",
                format!("kube-migrate: building the patch failed: {e}"),
            ),
        ),
    }
}
