//! `POST /v1/migrations/{id}/checkpoint`: checkpoint containers through this node's kubelet,
//! frozen around it when the controller asks (see [`super::source`]).

use std::{sync::Arc, time::Duration, time::Instant};

use axum::{
    Json,
    extract::{Path, State},
};
use tracing::instrument;

use super::{
    api::{self, ArchiveRecord, CheckpointRequest, CheckpointResponse, FreezeOutcome},
    server::{AgentError, AgentState, base_image, validate_blocking},
    source,
    store::Record,
    volumes,
};
use crate::metrics::PhaseLabels;

#[instrument(skip_all, fields(id = %id, pod = %req.pod, namespace = %req.namespace))]
pub async fn checkpoint(
    State(state): State<Arc<AgentState>>,
    Path(id): Path<String>,
    Json(req): Json<CheckpointRequest>,
) -> Result<Json<CheckpointResponse>, AgentError> {
    let started = Instant::now();
    let result = do_checkpoint(&state, &id, &req).await;
    state.record_op("checkpoint", started, &result);
    result.map(Json)
}

async fn do_checkpoint(
    state: &AgentState,
    id: &str,
    req: &CheckpointRequest,
) -> Result<CheckpointResponse, AgentError> {
    if req.containers.is_empty() || !req.containers.iter().all(|c| api::valid_container(c)) {
        return Err(AgentError::BadRequest(format!(
            "invalid container list {:?}",
            req.containers
        )));
    }
    // Names go into the kubelet's URL path: nothing but what Kubernetes allows in them.
    if !api::valid_label(&req.namespace) || !api::valid_pod_name(&req.pod) {
        return Err(AgentError::BadRequest(format!(
            "invalid pod {:?}/{:?}",
            req.namespace, req.pod
        )));
    }
    if let Some(spec) = &req.freeze
        && let Some((name, id)) = spec
            .container_ids
            .iter()
            .find(|(name, id)| !req.containers.contains(name) || super::freezer::bare_id(id).is_err())
    {
        // IDs go into paths under the cgroup root and the hold directory.
        return Err(AgentError::BadRequest(format!(
            "invalid container id {id:?} for {name:?}"
        )));
    }
    if let Some(bad) = req.empty_dirs.iter().find(|v| {
        !api::valid_container(&v.name)
            || super::freezer::bare_id(&v.container_id).is_err()
            || volumes::inside(std::path::Path::new("/"), &v.mount_path).is_err()
    }) {
        return Err(AgentError::BadRequest(format!("invalid emptyDir {bad:?}")));
    }
    if let Some(consent) = &state.access.consent {
        consent
            .check(id, &state.node, req)
            .await
            .map_err(|refusal| match refusal {
                super::consent::Refusal::Denied(why) => AgentError::Forbidden(why),
                super::consent::Refusal::Unavailable(e) => AgentError::Api(e),
            })?;
    }
    let timeout = Duration::from_secs(req.timeout_seconds.clamp(1, api::MAX_CHECKPOINT_TIMEOUT_SECONDS));
    let _guard = state.lock(id).await;
    let mut record = state.store.load(id)?.unwrap_or_else(|| Record {
        namespace: req.namespace.clone(),
        pod: req.pod.clone(),
        ..Default::default()
    });
    // A checkpoint kept from an earlier call is only as good as the freeze around it: without
    // a hold that outlived that call, the container ran since and is checkpointed again.
    let held_before: Vec<bool> = match &req.freeze {
        Some(spec) => req
            .containers
            .iter()
            .map(|c| {
                spec.container_ids
                    .get(c)
                    .is_some_and(|cid| state.freezer.hold(cid).is_ok_and(|h| h.is_some()))
            })
            .collect(),
        None => vec![true; req.containers.len()],
    };
    let frozen = match &req.freeze {
        Some(spec) => Some(source::freeze(state, id, spec).await),
        None => None,
    };
    let freeze_ok = matches!(frozen, Some(Ok(_)));
    let mut taken = checkpoint_all(state, &mut record, id, req, timeout, |i| !freeze_ok || held_before[i]).await;
    if let Ok(retaken) = taken {
        // While still frozen: the files must be those the memory image knows.
        taken = pack_volumes(state, &mut record, id, req, retaken)
            .await
            .map(|()| retaken);
    }
    let freeze = match frozen {
        None => None,
        Some(Err(note)) => Some(FreezeOutcome {
            held: false,
            frozen_at: None,
            note: Some(note),
        }),
        Some(Ok(f)) if taken.is_err() => {
            source::undo_freeze(state, f).await;
            None
        }
        Some(Ok(f)) => Some(source::after_checkpoint(state, f).await),
    };
    taken?;
    let archives = req
        .containers
        .iter()
        .filter_map(|c| record.checkpointed.get(c).cloned())
        .collect();
    let volumes = req
        .empty_dirs
        .iter()
        .filter_map(|v| record.volumes.get(&v.name).cloned())
        .collect();
    Ok(CheckpointResponse {
        archives,
        volumes,
        freeze,
    })
}

/// Pack each emptyDir of `req` (again when `retaken`: a container was checkpointed anew, so
/// the files of the earlier pack may be older than its memory image).
async fn pack_volumes(
    state: &AgentState,
    record: &mut Record,
    id: &str,
    req: &CheckpointRequest,
    retaken: bool,
) -> Result<(), AgentError> {
    if !req.empty_dirs.is_empty() {
        state.store.create_dir(id)?;
    }
    for spec in &req.empty_dirs {
        if !retaken
            && record
                .volumes
                .get(&spec.name)
                .is_some_and(|v| std::fs::metadata(&v.path).is_ok_and(|m| m.len() == v.size_bytes))
        {
            continue;
        }
        let started = Instant::now();
        let out = state.store.volume_path(id, &spec.name)?;
        let root = state.roots.root_of(&state.freezer, &spec.container_id)?;
        let dir = volumes::inside(&root, &spec.mount_path)?;
        let name = spec.name.clone();
        let path = out.clone();
        let packed = tokio::task::spawn_blocking(move || volumes::pack(&name, &dir, &path))
            .await
            .map_err(|e| AgentError::Io(std::io::Error::other(e)))??;
        let seconds = started.elapsed().as_secs_f64();
        if !packed.skipped.is_empty() {
            tracing::warn!(volume = %spec.name, skipped = ?packed.skipped, "sockets and FIFOs are not moved");
        }
        tracing::info!(volume = %spec.name, bytes = packed.size, files = packed.files, seconds, "emptyDir packed");
        record.volumes.insert(
            spec.name.clone(),
            ArchiveRecord {
                container: spec.name.clone(),
                path: out.display().to_string(),
                digest: packed.digest,
                size_bytes: packed.size,
                base_image: String::new(),
                seconds,
            },
        );
        state.store.save(id, record)?;
    }
    Ok(())
}

/// Checkpoint each container of `req` not already checkpointed (`keep(i)`: an earlier
/// checkpoint of container i may be kept), saving the record after each. Whether any was
/// checkpointed now.
async fn checkpoint_all(
    state: &AgentState,
    record: &mut Record,
    id: &str,
    req: &CheckpointRequest,
    timeout: Duration,
    keep: impl Fn(usize) -> bool,
) -> Result<bool, AgentError> {
    let mut retaken = false;
    for (i, container) in req.containers.iter().enumerate() {
        if let Some(done) = record.checkpointed.get(container)
            && std::path::Path::new(&done.path).exists()
            && keep(i)
        {
            continue; // a retry after a controller restart: keep the checkpoint already taken
        }
        let started = Instant::now();
        let path = state
            .kubelet
            .checkpoint(&req.namespace, &req.pod, container, timeout)
            .await?;
        let info = validate_blocking(path.clone()).await?;
        let seconds = started.elapsed().as_secs_f64();
        tracing::info!(container, path = %path.display(), bytes = info.size, seconds, "checkpointed");
        state.metrics.archive_bytes.observe(info.size as f64);
        state
            .metrics
            .agent_bytes
            .get_or_create(&PhaseLabels { phase: "checkpoint" })
            .inc_by(info.size);
        record.checkpointed.insert(
            container.clone(),
            ArchiveRecord {
                container: container.clone(),
                path: path.display().to_string(),
                digest: info.digest,
                size_bytes: info.size,
                base_image: base_image(&info.config),
                seconds,
            },
        );
        state.store.save(id, record)?;
        retaken = true;
    }
    Ok(retaken)
}
