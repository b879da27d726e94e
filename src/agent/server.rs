//! The agent's API server (mTLS): checkpoint, push, receive, image, delete.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{
    Json, Router,
    body::Body,
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::{delete, post, put},
};
use tracing::instrument;

use super::{
    api::{
        self, ArchiveRecord, ErrorBody, ImageRecord, ImageRequest, ImageResponse, PushRequest, PushResponse,
        ReceiveResponse,
    },
    archive::{self, ArchiveError, ArchiveInfo, ContainerConfig},
    authz::{self, Callers},
    checkpoint,
    client::{AgentClient, ClientError},
    freezer::{FreezeError, Freezer},
    image::{self, ImageError},
    kubelet::{KubeletClient, KubeletError},
    receive::{self, ReceiveError},
    registry::REPOSITORY_PREFIX,
    source,
    store::{Store, StoreError},
};
use crate::metrics::{Metrics, OperationLabels, PhaseLabels};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Kubelet(#[from] KubeletError),
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("target agent: {0}")]
    Peer(#[from] ClientError),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// An archive no longer is what was checkpointed (truncated, overwritten): it must not be
    /// sent, and retrying will not repair it.
    #[error("archive corrupt: {0}")]
    Corrupt(String),
    #[error(transparent)]
    Receive(#[from] ReceiveError),
    #[error("forbidden: {0}")]
    Forbidden(String),
    #[error("freezer: {0}")]
    Freeze(#[from] FreezeError),
}

impl AgentError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            AgentError::BadRequest(_) => "bad_request",
            AgentError::NotFound(_) => "not_found",
            AgentError::Store(e) => e.metric_label(),
            AgentError::Kubelet(e) => e.metric_label(),
            AgentError::Archive(e) => e.metric_label(),
            AgentError::Image(e) => e.metric_label(),
            AgentError::Peer(e) => e.reason().map_or(e.metric_label(), |_| "peer_refused"),
            AgentError::Io(_) => "io",
            AgentError::Corrupt(_) => "archive_corrupt",
            AgentError::Receive(e) => e.metric_label(),
            AgentError::Forbidden(_) => "forbidden",
            AgentError::Freeze(e) => e.metric_label(),
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            AgentError::BadRequest(_)
            | AgentError::Store(StoreError::InvalidId(_) | StoreError::InvalidContainer(_)) => StatusCode::BAD_REQUEST,
            AgentError::NotFound(_) => StatusCode::NOT_FOUND,
            AgentError::Forbidden(_) => StatusCode::FORBIDDEN,
            AgentError::Freeze(FreezeError::InvalidId(_)) => StatusCode::BAD_REQUEST,
            AgentError::Freeze(FreezeError::NotHeld(_)) => StatusCode::CONFLICT,
            AgentError::Archive(ArchiveError::Io(_))
            | AgentError::Receive(ReceiveError::Archive(ArchiveError::Io(_)) | ReceiveError::Io { .. }) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            // A corrupt or unsafe archive will not get better by retrying.
            AgentError::Archive(_) | AgentError::Receive(ReceiveError::Archive(_)) | AgentError::Corrupt(_) => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            AgentError::Kubelet(KubeletError::NotFound(_) | KubeletError::Forbidden(_)) => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            AgentError::Peer(e) if !e.retryable() => StatusCode::UNPROCESSABLE_ENTITY,
            AgentError::Receive(ReceiveError::Interrupted(_)) => StatusCode::BAD_REQUEST,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for AgentError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            reason: self.metric_label().to_string(),
            message: self.to_string(),
        };
        (self.status(), Json(body)).into_response()
    }
}

/// Shared state of the agent's handlers.
pub struct AgentState {
    pub node: String,
    pub store: Store,
    pub kubelet: KubeletClient,
    /// Freezes source containers around their checkpoint (see [`super::source`]).
    pub freezer: Freezer,
    pub peers: AgentClient,
    pub metrics: Arc<Metrics>,
    /// `host:port` under which this node's runtime reaches the registry endpoint.
    pub registry_host: String,
    /// The certificate names of the controller and of agents (see [`super::authz`]).
    pub callers: Callers,
    locks: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl AgentState {
    pub fn new(
        node: String,
        store: Store,
        (kubelet, freezer): (KubeletClient, Freezer),
        peers: AgentClient,
        metrics: Arc<Metrics>,
        registry_host: String,
        callers: Callers,
    ) -> Arc<Self> {
        Arc::new(Self {
            node,
            store,
            kubelet,
            freezer,
            peers,
            metrics,
            registry_host,
            callers,
            locks: Default::default(),
        })
    }

    /// One operation per migration at a time: a controller that retries after a restart
    /// waits for the running operation and then sees its result.
    pub(super) async fn lock(&self, id: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut locks = self.locks.lock().expect("lock map poisoned");
            locks.retain(|_, l| Arc::strong_count(l) > 1 || l.try_lock().is_err());
            Arc::clone(locks.entry(id.to_string()).or_default())
        };
        lock.lock_owned().await
    }

    pub(super) fn record_op<T>(&self, operation: &'static str, started: Instant, result: &Result<T, AgentError>) {
        let label = match result {
            Ok(_) => "ok",
            Err(e) => {
                // Every failed attempt is in this agent's log with its cause, not only in the
                // controller's retry message.
                tracing::warn!(operation, reason = e.metric_label(), error = %e, "operation failed");
                e.metric_label()
            }
        };
        self.metrics
            .agent_operations
            .get_or_create(&OperationLabels {
                operation,
                result: label,
            })
            .inc();
        self.metrics
            .agent_operation_duration
            .get_or_create(&PhaseLabels { phase: operation })
            .observe(started.elapsed().as_secs_f64());
    }
}

pub fn router(state: Arc<AgentState>) -> Router {
    Router::new()
        .route("/v1/migrations/{id}/checkpoint", post(checkpoint::checkpoint))
        .route("/v1/migrations/{id}/source/thaw", post(source::thaw))
        .route("/v1/migrations/{id}/source/kill", post(source::kill))
        .route("/v1/migrations/{id}/push", post(push))
        .route("/v1/migrations/{id}/archives/{container}", put(receive).get(held))
        .route("/v1/migrations/{id}/image", post(build_image))
        .route("/v1/migrations/{id}", delete(forget))
        .route_layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            authz::authorise,
        ))
        .with_state(state)
}

pub(super) fn base_image(config: &ContainerConfig) -> String {
    if config.rootfs_image_name.is_empty() {
        config.rootfs_image_ref.clone()
    } else {
        config.rootfs_image_name.clone()
    }
}

pub(super) async fn validate_blocking(path: PathBuf) -> Result<ArchiveInfo, AgentError> {
    tokio::task::spawn_blocking(move || archive::validate_file(&path))
        .await
        .map_err(|e| AgentError::Io(std::io::Error::other(e)))?
        .map_err(AgentError::from)
}

#[instrument(skip_all, fields(id = %id, target = %req.target))]
async fn push(
    State(state): State<Arc<AgentState>>,
    Path(id): Path<String>,
    Json(req): Json<PushRequest>,
) -> Result<Json<PushResponse>, AgentError> {
    let started = Instant::now();
    let result = do_push(&state, &id, &req).await;
    state.record_op("send", started, &result);
    result.map(Json)
}

async fn do_push(state: &AgentState, id: &str, req: &PushRequest) -> Result<PushResponse, AgentError> {
    let _guard = state.lock(id).await;
    let record = state
        .store
        .load(id)?
        .ok_or_else(|| AgentError::NotFound(format!("no checkpoint for migration {id}")))?;
    let started = Instant::now();
    let mut bytes = 0;
    let mut already_held = 0;
    for archive in &req.archives {
        let held = record
            .checkpointed
            .get(&archive.container)
            .ok_or_else(|| AgentError::NotFound(format!("no archive for container {}", archive.container)))?;
        if held.digest != archive.digest {
            return Err(AgentError::BadRequest(format!(
                "archive of {} is {}, not the requested {}",
                archive.container, held.digest, archive.digest
            )));
        }
        let target_id = req.target_id.as_deref().unwrap_or(id);
        // A resumed push (new leader, retry) does not resend what the target already verified.
        match state.peers.held(&req.target, target_id, &archive.container).await {
            Ok(Some(there)) if there.digest == archive.digest => {
                tracing::info!(container = %archive.container, bytes = there.size_bytes, "target already holds this archive verified; not sent again");
                already_held += there.size_bytes;
                continue;
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "could not ask the target what it holds; sending"),
        }
        let file = tokio::fs::File::open(&held.path).await?;
        // Cheap check that catches a truncated or replaced file before anything is sent (the
        // target checks the digest of every byte).
        let on_disk = file.metadata().await?.len();
        if on_disk != held.size_bytes {
            return Err(AgentError::Corrupt(format!(
                "{} is {on_disk} bytes on disk, {} when checkpointed",
                held.path, held.size_bytes
            )));
        }
        let received = match state.peers.upload(&req.target, target_id, archive, file).await {
            Ok(r) => r,
            // The target refused the bytes themselves (digest or structure): name it.
            Err(e)
                if e.reason()
                    .is_some_and(|r| matches!(r, "archive_unsafe" | "archive_invalid" | "digest_mismatch")) =>
            {
                return Err(AgentError::Corrupt(format!(
                    "the target refused the archive of {}: {e}",
                    archive.container
                )));
            }
            Err(e) => return Err(e.into()),
        };
        bytes += received.size_bytes;
        state
            .metrics
            .agent_bytes
            .get_or_create(&PhaseLabels { phase: "send" })
            .inc_by(received.size_bytes);
    }
    let seconds = started.elapsed().as_secs_f64();
    if seconds > 0.0 {
        state.metrics.transfer_throughput.observe(bytes as f64 / seconds);
    }
    tracing::info!(bytes, already_held, seconds, "archives sent");
    Ok(PushResponse {
        bytes: bytes + already_held,
        seconds,
        already_held_bytes: already_held,
    })
}

#[instrument(skip_all, fields(id = %id, container = %container))]
async fn receive(
    State(state): State<Arc<AgentState>>,
    Path((id, container)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<ReceiveResponse>, AgentError> {
    let started = Instant::now();
    let result = do_receive(&state, &id, &container, &headers, body).await;
    state.record_op("receive", started, &result);
    result.map(Json)
}

async fn do_receive(
    state: &AgentState,
    id: &str,
    container: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<ReceiveResponse, AgentError> {
    let expected = headers
        .get(api::DIGEST_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|d| d.starts_with("sha256:"))
        .ok_or_else(|| AgentError::BadRequest(format!("missing {} header", api::DIGEST_HEADER)))?
        .to_string();
    let final_path = state.store.archive_path(id, container)?;
    let _guard = state.lock(id).await;
    state.store.create_dir(id)?;
    let part = final_path.with_extension("part");
    // Hashed, validated and written in one pass; the part file is gone on any error.
    let info = receive::receive(body, &part, &expected).await?;
    tokio::fs::rename(&part, &final_path).await?;
    if let Some(dir) = final_path.parent() {
        crate::agent::private::sync_dir(dir)?;
    }
    let mut record = state.store.load(id)?.unwrap_or_default();
    record.received.insert(
        container.to_string(),
        ArchiveRecord {
            container: container.to_string(),
            path: final_path.display().to_string(),
            digest: info.digest.clone(),
            size_bytes: info.size,
            base_image: base_image(&info.config),
            seconds: 0.0,
        },
    );
    state.store.save(id, &record)?;
    state
        .metrics
        .agent_bytes
        .get_or_create(&PhaseLabels { phase: "receive" })
        .inc_by(info.size);
    tracing::info!(bytes = info.size, digest = %info.digest, "archive received and verified");
    Ok(ReceiveResponse {
        digest: info.digest,
        size_bytes: info.size,
    })
}

/// The verified archive this agent received for `container`, or 404.
async fn held(
    State(state): State<Arc<AgentState>>,
    Path((id, container)): Path<(String, String)>,
) -> Result<Json<ReceiveResponse>, AgentError> {
    state.store.archive_path(&id, &container)?; // validates both names
    let record = state.store.load(&id)?.unwrap_or_default();
    let held = record
        .received
        .get(&container)
        .filter(|a| std::fs::metadata(&a.path).is_ok_and(|m| m.len() == a.size_bytes))
        .ok_or_else(|| AgentError::NotFound(format!("no verified archive of {container} for migration {id}")))?;
    Ok(Json(ReceiveResponse {
        digest: held.digest.clone(),
        size_bytes: held.size_bytes,
    }))
}

#[instrument(skip_all, fields(id = %id, pod = %req.pod))]
async fn build_image(
    State(state): State<Arc<AgentState>>,
    Path(id): Path<String>,
    Json(req): Json<ImageRequest>,
) -> Result<Json<ImageResponse>, AgentError> {
    let started = Instant::now();
    let result = do_build_image(&state, &id, &req).await;
    state.record_op("image", started, &result);
    result.map(Json)
}

async fn do_build_image(state: &AgentState, id: &str, req: &ImageRequest) -> Result<ImageResponse, AgentError> {
    let _guard = state.lock(id).await;
    let mut record = state
        .store
        .load(id)?
        .ok_or_else(|| AgentError::NotFound(format!("no archives for migration {id}")))?;
    record.namespace.clone_from(&req.namespace);
    record.pod.clone_from(&req.pod);
    if req.pull_digest.is_some() {
        record.pull_digest.clone_from(&req.pull_digest);
    }
    state.store.save(id, &record)?;
    let layout = state.store.layout(id)?;
    let created = k8s_openapi::jiff::Timestamp::now().to_string();
    let mut images = Vec::new();
    for archive in &req.archives {
        // Archives received from another node, or (checkpoint-only backups) taken here.
        let held = record
            .received
            .get(&archive.container)
            .or_else(|| record.checkpointed.get(&archive.container))
            .ok_or_else(|| AgentError::NotFound(format!("no archive for container {}", archive.container)))?;
        if held.digest != archive.digest {
            return Err(AgentError::BadRequest(format!(
                "received archive of {} is {}, not {}",
                archive.container, held.digest, archive.digest
            )));
        }
        let info = ArchiveInfo {
            digest: held.digest.clone(),
            size: held.size_bytes,
            entries: 0,
            config: ContainerConfig {
                rootfs_image_name: held.base_image.clone(),
                ..Default::default()
            },
        };
        let (layout, path, container, created) = (
            layout.clone(),
            PathBuf::from(&held.path),
            archive.container.clone(),
            created.clone(),
        );
        let built =
            tokio::task::spawn_blocking(move || image::build(&layout, &container, &container, &path, &info, &created))
                .await
                .map_err(|e| AgentError::Io(std::io::Error::other(e)))??;
        images.push(ImageRecord {
            container: archive.container.clone(),
            image: format!("{}/{REPOSITORY_PREFIX}/{id}:{}", state.registry_host, archive.container),
            manifest_digest: built.manifest_digest,
            base_image: built.base_image,
        });
    }
    Ok(ImageResponse { images })
}

#[instrument(skip_all, fields(id = %id))]
async fn forget(
    State(state): State<Arc<AgentState>>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, AgentError> {
    let _guard = state.lock(&id).await;
    let existed = state.store.delete(&id)?;
    Ok(Json(serde_json::json!({ "deleted": existed })))
}

/// Remove migrations older than `max_age` every `every`.
pub fn spawn_gc(state: Arc<AgentState>, max_age: Duration, every: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            let store = state.store.clone();
            let result = tokio::task::spawn_blocking(move || {
                let deleted = store.gc(max_age, std::time::SystemTime::now());
                (deleted, store.stored_bytes())
            })
            .await;
            match result {
                Ok((Ok(deleted), bytes)) => {
                    state.metrics.agent_stored_bytes.set(bytes as i64);
                    if !deleted.is_empty() {
                        state.metrics.gc_deleted.inc_by(deleted.len() as u64);
                        tracing::info!(?deleted, "garbage-collected stale migrations");
                    }
                }
                Ok((Err(error), _)) => tracing::warn!(%error, "garbage collection failed"),
                Err(error) => tracing::warn!(%error, "garbage collection task failed"),
            }
        }
    })
}
