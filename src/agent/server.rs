//! The agent's API server (mTLS): routes, errors and shared state; checkpoint, push, receive,
//! volumes, image, delete.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{
    Json, Router,
    extract::{Path, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{delete, post, put},
};
use tracing::instrument;

use super::{
    api::{ArchiveRef, ErrorBody, ImageRecord, ImageRequest, ImageResponse},
    archive::{self, ArchiveError, ArchiveInfo, ContainerConfig},
    authz::{self, Access},
    checkpoint,
    client::{AgentClient, ClientError},
    cri::CriError,
    expect,
    freezer::{FreezeError, Freezer},
    image::{self, ImageError},
    kubelet::{KubeletClient, KubeletError},
    place, prepare,
    prepull::{self, Prepull},
    receive::ReceiveError,
    registry::REPOSITORY_PREFIX,
    source,
    store::{ImageMeta, Record, Store, StoreError},
    transfer,
    volumes::{ContainerRoots, VolumeError},
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
    #[error(transparent)]
    Volume(#[from] VolumeError),
    #[error("API server: {0}")]
    Api(#[from] kube::Error),
    #[error("runtime: {0}")]
    Runtime(#[from] CriError),
    /// This node cannot restore the pod (checked before the freeze, see [`super::prepare`]).
    #[error("{0}")]
    Unfit(String),
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
            AgentError::Volume(e) => e.metric_label(),
            AgentError::Api(_) => "api_server",
            AgentError::Runtime(e) => e.metric_label(),
            AgentError::Unfit(_) => super::api::TARGET_UNFIT,
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
            // The replacement's init container is not running yet: ask again.
            AgentError::Volume(e) if e.may_pass() => StatusCode::SERVICE_UNAVAILABLE,
            AgentError::Volume(VolumeError::Invalid { .. }) => StatusCode::BAD_REQUEST,
            AgentError::Volume(VolumeError::NotMounted { .. }) => StatusCode::UNPROCESSABLE_ENTITY,
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
            AgentError::Receive(ReceiveError::TooLarge { .. }) => StatusCode::PAYLOAD_TOO_LARGE,
            AgentError::Api(_) => StatusCode::SERVICE_UNAVAILABLE,
            AgentError::Unfit(_) => StatusCode::UNPROCESSABLE_ENTITY,
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
    /// Reaches pods' emptyDirs through their containers (see [`super::volumes`]).
    pub roots: ContainerRoots,
    pub peers: AgentClient,
    pub metrics: Arc<Metrics>,
    /// `host:port` under which this node's runtime reaches the registry endpoint.
    pub registry_host: String,
    /// Pulls of checkpoint images into this node's runtime as soon as they are built.
    pub prepull: Prepull,
    /// Who may ask what (see [`super::authz`]).
    pub access: Access,
    /// Pushes running now, with their progress.
    pub pushes: super::progress::Pushes,
    locks: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl AgentState {
    pub fn new(
        node: String,
        store: Store,
        (kubelet, freezer, roots): (KubeletClient, Freezer, ContainerRoots),
        peers: AgentClient,
        metrics: Arc<Metrics>,
        (registry_host, prepull): (String, Prepull),
        access: Access,
    ) -> Arc<Self> {
        Arc::new(Self {
            node,
            store,
            kubelet,
            freezer,
            roots,
            peers,
            metrics,
            registry_host,
            prepull,
            access,
            pushes: Default::default(),
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
        .route("/v1/migrations/{id}/source/{action}", post(source::source))
        .route(
            "/v1/migrations/{id}/push",
            post(transfer::push).get(super::progress::progress),
        )
        .route("/v1/migrations/{id}/prepare", post(prepare::prepare))
        .route("/v1/migrations/{id}/expect", post(expect::expect))
        .route(
            "/v1/migrations/{id}/archives/{container}",
            put(transfer::receive_archive).get(transfer::held_archive),
        )
        .route(
            "/v1/migrations/{id}/volumes/{volume}",
            put(transfer::receive_volume).get(transfer::held_volume),
        )
        .route("/v1/migrations/{id}/volumes", post(place::place))
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

#[instrument(skip_all, fields(id = %id, pod = %req.pod))]
async fn build_image(
    State(state): State<Arc<AgentState>>,
    Path(id): Path<String>,
    Json(req): Json<ImageRequest>,
) -> Result<Json<ImageResponse>, AgentError> {
    let started = Instant::now();
    let result = do_build_image(&state, &id, &req).await;
    state.record_op("image", started, &result);
    if let (Ok(built), true) = (&result, req.prepull) {
        let images = built.images.iter().map(|i| i.image.clone()).collect();
        prepull::spawn(Arc::clone(&state), &id, images);
    }
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
    let images = build_images(state, id, &mut record, &req.archives).await?;
    Ok(ImageResponse { images })
}

/// Build (or build again, to the same manifests) the checkpoint image of each of `archives`
/// held in `record`, and save the record. The caller holds the migration's lock.
pub(super) async fn build_images(
    state: &AgentState,
    id: &str,
    record: &mut Record,
    archives: &[ArchiveRef],
) -> Result<Vec<ImageRecord>, AgentError> {
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let mut work = Vec::new();
    for archive in archives {
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
        let meta = match record.images.get(&archive.container) {
            Some(meta) if meta.archive_digest == held.digest => meta.clone(),
            _ => ImageMeta {
                archive_digest: held.digest.clone(),
                created: now.clone(),
                base_image: held.base_image.clone(),
            },
        };
        work.push((archive.container.clone(), held.clone(), meta));
    }
    for (container, _, meta) in &work {
        record.images.insert(container.clone(), meta.clone());
    }
    state.store.save(id, record)?;
    let layout = state.store.layout(id)?;
    let mut images = Vec::new();
    for (container, held, meta) in work {
        let (layout, tag) = (layout.clone(), container.clone());
        let built = tokio::task::spawn_blocking(move || {
            image::link_layer(&layout, std::path::Path::new(&held.path), &held.digest)?;
            image::describe(
                &layout,
                &tag,
                &tag,
                (&held.digest, held.size_bytes),
                &meta.base_image,
                &meta.created,
            )
        })
        .await
        .map_err(|e| AgentError::Io(std::io::Error::other(e)))??;
        // In the layout now: served from there.
        state.prepull.own.incoming.forget(&meta.archive_digest);
        images.push(image_record(state, id, &container, built));
    }
    Ok(images)
}

fn image_record(state: &AgentState, id: &str, container: &str, built: image::BuiltImage) -> ImageRecord {
    ImageRecord {
        container: container.to_string(),
        image: format!("{}/{REPOSITORY_PREFIX}/{id}:{container}", state.registry_host),
        manifest_digest: built.manifest_digest,
        base_image: built.base_image,
    }
}

/// Describe the image of the only archive of migration `id`, `archive`, before it arrives, so
/// that the runtime's pull can begin at once and download the layer as it comes in (see
/// [`super::incoming`]). Returns the image's reference. The caller holds the migration's lock.
pub(super) fn describe_early(
    state: &AgentState,
    id: &str,
    record: &mut Record,
    archive: &ArchiveRef,
) -> Result<String, AgentError> {
    let meta = match record.images.get(&archive.container) {
        Some(meta) if meta.archive_digest == archive.digest => meta.clone(),
        _ => ImageMeta {
            archive_digest: archive.digest.clone(),
            created: k8s_openapi::jiff::Timestamp::now().to_string(),
            base_image: String::new(),
        },
    };
    record.images.insert(archive.container.clone(), meta.clone());
    state.store.save(id, record)?;
    let layout = state.store.layout(id)?;
    let built = image::describe(
        &layout,
        &archive.container,
        &archive.container,
        (&archive.digest, archive.size_bytes),
        &meta.base_image,
        &meta.created,
    )?;
    Ok(image_record(state, id, &archive.container, built).image)
}

#[instrument(skip_all, fields(id = %id))]
async fn forget(
    State(state): State<Arc<AgentState>>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, AgentError> {
    let _guard = state.lock(&id).await;
    let existed = state.store.delete(&id)?;
    state.prepull.own.forget(&id);
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
