//! The kubelet's HTTPS API, the parts kube-migrate and kubectl use:
//!
//! * `POST /checkpoint/{namespace}/{pod}/{container}[?timeout=N]` (KEP-2008), authenticated
//!   with a TokenReview and authorized with a SubjectAccessReview on `nodes/checkpoint`;
//! * `GET /containerLogs/{namespace}/{pod}/{container}` (what `kubectl logs` reaches through
//!   the API server), with `follow`, `tailLines`, `timestamps`, `sinceSeconds`, `limitBytes`;
//! * `GET /healthz`.

use std::{convert::Infallible, path::PathBuf, sync::Arc, time::Duration};

use axum::{
    Json, Router,
    body::Body,
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use bytes::Bytes;
use futures::StreamExt;
use k8s_openapi::jiff::Timestamp;
use serde::Deserialize;
use serde_json::json;

use crate::{
    auth::Authorizer,
    checkpoint::{Snapshot, write_archive},
    container::{Backend, Container, LogLine},
    pods::Runtime,
};

/// Used when the checkpoint request names no timeout.
const DEFAULT_CHECKPOINT_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("{0}")]
    Auth(#[from] crate::auth::AuthError),
    #[error("container {container:?} of pod {namespace}/{pod} is not running on this node")]
    NotFound {
        namespace: String,
        pod: String,
        container: String,
    },
    #[error("previous terminated container {container:?} in pod {pod:?} not found")]
    NoPrevious { pod: String, container: String },
    #[error("checkpointing of {target} failed: {message}")]
    Checkpoint { target: String, message: String },
    #[error("checkpointing of {target} failed: timeout after {seconds} s")]
    CheckpointTimeout { target: String, seconds: u64 },
}

impl ServerError {
    fn status(&self) -> StatusCode {
        match self {
            ServerError::Auth(e) => StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            ServerError::NotFound { .. } => StatusCode::NOT_FOUND,
            ServerError::NoPrevious { .. } => StatusCode::BAD_REQUEST,
            ServerError::Checkpoint { .. } | ServerError::CheckpointTimeout { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for ServerError {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut body = self.to_string();
        body.push('\n');
        (status, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response()
    }
}

#[derive(Clone)]
pub struct ServerState {
    pub runtime: Runtime,
    pub authorizer: Authorizer,
    pub checkpoint_dir: PathBuf,
}

pub fn router(state: ServerState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/checkpoint/{namespace}/{pod}/{container}", post(checkpoint))
        .route("/containerLogs/{namespace}/{pod}/{container}", get(container_logs))
        .fallback(|| async { (StatusCode::NOT_FOUND, "404 page not found\n") })
        .with_state(Arc::new(state))
}

#[derive(Debug, Default, Deserialize)]
struct CheckpointQuery {
    timeout: Option<u64>,
}

async fn checkpoint(
    State(state): State<Arc<ServerState>>,
    Path((namespace, pod, container)): Path<(String, String, String)>,
    Query(query): Query<CheckpointQuery>,
    headers: HeaderMap,
) -> Result<Response, ServerError> {
    let user = state.authorizer.check(&headers, "create", "checkpoint").await?;
    let target = format!("{namespace}/{pod}/{container}");
    let running = state
        .runtime
        .container(&namespace, &pod, &container)
        .filter(|c| c.is_running())
        .ok_or_else(|| ServerError::NotFound {
            namespace: namespace.clone(),
            pod: pod.clone(),
            container: container.clone(),
        })?;
    let timeout = query
        .timeout
        .filter(|&t| t > 0)
        .map_or(DEFAULT_CHECKPOINT_TIMEOUT, Duration::from_secs);
    let started = std::time::Instant::now();
    let failed = |message: String| ServerError::Checkpoint {
        target: target.clone(),
        message,
    };
    let timed_out = || ServerError::CheckpointTimeout {
        target: target.clone(),
        seconds: timeout.as_secs(),
    };
    if let Backend::Crun { crun, handle } = &running.backend {
        let job = crun.checkpoint(
            handle,
            &pod,
            &namespace,
            &container,
            running.started_at,
            &state.checkpoint_dir,
        );
        let path = tokio::time::timeout(timeout, job)
            .await
            .map_err(|_| timed_out())?
            .map_err(|e| failed(e.to_string()))?;
        let bytes = std::fs::metadata(&path).map_or(0, |m| m.len());
        tracing::info!(
            %target, user = user.username.as_deref().unwrap_or_default(), path = %path.display(), bytes,
            seconds = started.elapsed().as_secs_f64(), "checkpointed container with CRIU (it keeps running)"
        );
        return Ok(Json(json!({"items": [path.display().to_string()]})).into_response());
    }
    let snapshot = Snapshot::of(&running).ok_or_else(|| failed("container has no simulated state".into()))?;
    let (counter, memory_bytes) = (snapshot.counter, snapshot.memory.len());
    let dir = state.checkpoint_dir.clone();
    let job = tokio::task::spawn_blocking(move || write_archive(&dir, &snapshot));
    let path = match tokio::time::timeout(timeout, job).await {
        Err(_) => return Err(timed_out()),
        Ok(Err(join)) => return Err(failed(join.to_string())),
        Ok(Ok(Err(e))) => return Err(failed(e.to_string())),
        Ok(Ok(Ok(path))) => path,
    };
    tracing::info!(
        %target, user = user.username.as_deref().unwrap_or_default(), path = %path.display(), counter, memory_bytes,
        seconds = started.elapsed().as_secs_f64(), "checkpointed container (it keeps running)"
    );
    Ok(Json(json!({"items": [path.display().to_string()]})).into_response())
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LogQuery {
    #[serde(default)]
    follow: bool,
    #[serde(default)]
    previous: bool,
    #[serde(default)]
    timestamps: bool,
    tail_lines: Option<i64>,
    since_seconds: Option<i64>,
    limit_bytes: Option<i64>,
}

fn format_line(line: &LogLine, timestamps: bool) -> String {
    if timestamps {
        format!("{} {}\n", line.time, line.text)
    } else {
        format!("{}\n", line.text)
    }
}

fn select_lines(lines: Vec<LogLine>, since: Option<Timestamp>) -> impl Iterator<Item = LogLine> {
    lines.into_iter().filter(move |l| since.is_none_or(|s| l.time >= s))
}

/// A follow stream: the lines after `next`, as they come, until the container stops.
fn follow(
    container: Arc<Container>,
    next: u64,
    timestamps: bool,
) -> impl futures::Stream<Item = Result<Bytes, Infallible>> + Send + 'static {
    let progress = container.log.subscribe();
    futures::stream::unfold(
        (container, progress, next, false),
        move |(container, mut progress, mut next, done)| async move {
            if done {
                return None;
            }
            loop {
                // Read the stop flag before the lines: lines written before the stop are seen.
                let stopped = progress.borrow_and_update().1;
                let (lines, after) = container.log.since(next);
                if !lines.is_empty() {
                    next = after;
                    let chunk: String = lines.iter().map(|l| format_line(l, timestamps)).collect();
                    return Some((Ok(Bytes::from(chunk)), (container, progress, next, false)));
                }
                if stopped || progress.changed().await.is_err() {
                    return None;
                }
            }
        },
    )
}

async fn container_logs(
    State(state): State<Arc<ServerState>>,
    Path((namespace, pod, container)): Path<(String, String, String)>,
    Query(query): Query<LogQuery>,
) -> Result<Response, ServerError> {
    if query.previous {
        return Err(ServerError::NoPrevious { pod, container });
    }
    let found = state
        .runtime
        .container(&namespace, &pod, &container)
        .ok_or_else(|| ServerError::NotFound {
            namespace: namespace.clone(),
            pod: pod.clone(),
            container: container.clone(),
        })?;
    let tail = query.tail_lines.filter(|&n| n >= 0).map(|n| n as u64);
    let since = query.since_seconds.filter(|&s| s > 0).and_then(|s| {
        Timestamp::now()
            .checked_sub(k8s_openapi::jiff::SignedDuration::from_secs(s))
            .ok()
    });
    let (lines, next) = found.log.tail(tail);
    let mut text: String = select_lines(lines, since)
        .map(|l| format_line(&l, query.timestamps))
        .collect();
    let headers = [(header::CONTENT_TYPE, "text/plain; charset=utf-8")];
    if query.follow {
        let first = futures::stream::once(async move { Ok::<_, Infallible>(Bytes::from(text)) });
        let body = Body::from_stream(first.chain(follow(found, next, query.timestamps)));
        return Ok((StatusCode::OK, headers, body).into_response());
    }
    if let Some(limit) = query.limit_bytes.filter(|&l| l >= 0) {
        let mut cut = (limit as usize).min(text.len());
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
    Ok((StatusCode::OK, headers, text).into_response())
}
