//! `POST /v1/migrations/{id}/volumes`: put the emptyDir contents received for a migration
//! into its replacement pod, through the mounts of the pod's restore init container, then
//! write the marker that lets the init container (and so the pod's containers) go on.

use std::{sync::Arc, time::Instant};

use axum::{
    Json,
    extract::{Path, State},
};
use tracing::instrument;

use super::{
    api::{self, VolumesRequest, VolumesResponse},
    freezer,
    server::{AgentError, AgentState},
    volumes::{self, HELPER_MARKER_DIR, HELPER_VOLUMES_DIR, VolumeError},
};

#[instrument(skip_all, fields(id = %id, pod_uid = %req.pod_uid))]
pub async fn place(
    State(state): State<Arc<AgentState>>,
    Path(id): Path<String>,
    Json(req): Json<VolumesRequest>,
) -> Result<Json<VolumesResponse>, AgentError> {
    let started = Instant::now();
    let result = do_place(&state, &id, &req).await;
    state.record_op("volumes", started, &result);
    result.map(Json)
}

async fn do_place(state: &AgentState, id: &str, req: &VolumesRequest) -> Result<VolumesResponse, AgentError> {
    if !api::valid_id(id) || !api::valid_id(&req.pod_uid) {
        return Err(AgentError::BadRequest(format!("invalid ids {id:?}/{:?}", req.pod_uid)));
    }
    freezer::bare_id(&req.container_id).map_err(|e| AgentError::BadRequest(e.to_string()))?;
    if let Some(bad) = req.volumes.iter().find(|v| !api::valid_container(&v.container)) {
        return Err(AgentError::BadRequest(format!(
            "invalid volume name {:?}",
            bad.container
        )));
    }
    let _guard = state.lock(id).await;
    let mut record = state.store.load(id)?.unwrap_or_default();
    let root = state.roots.root_of(&state.freezer, &req.container_id)?;
    let marker_dir = volumes::inside(&root, HELPER_MARKER_DIR)?;
    if record.volumes_placed_in.as_deref() == Some(req.pod_uid.as_str()) {
        // Filled before (a retry): the pod's containers may run by now, so only make sure
        // the marker is there.
        if !volumes::released(&marker_dir) {
            volumes::release(&marker_dir, id)?;
        }
        return Ok(VolumesResponse { filled: 0, bytes: 0 });
    }
    let mut jobs = Vec::new();
    for wanted in &req.volumes {
        let held = record
            .received_volumes
            .get(&wanted.container)
            .ok_or_else(|| AgentError::NotFound(format!("no verified contents of emptyDir {}", wanted.container)))?;
        if held.digest != wanted.digest {
            return Err(AgentError::BadRequest(format!(
                "contents of emptyDir {} held are {}, not {}",
                wanted.container, held.digest, wanted.digest
            )));
        }
        let dir = format!("{HELPER_VOLUMES_DIR}/{}", wanted.container);
        volumes::inside(&root, &dir)?;
        jobs.push((
            wanted.container.clone(),
            std::path::PathBuf::from(&held.path),
            dir,
            held.size_bytes,
        ));
    }
    let bytes = jobs.iter().map(|j| j.3).sum();
    let filled = jobs.len();
    let (unpacker, in_root) = (state.roots.unpacker.clone(), root.clone());
    tokio::task::spawn_blocking(move || -> Result<(), VolumeError> {
        for (name, tar, dir, _) in jobs {
            unpacker.unpack(&name, &tar, &in_root, &dir)?;
        }
        Ok(())
    })
    .await
    .map_err(|e| AgentError::Io(std::io::Error::other(e)))??;
    // Recorded before the marker: once the marker is written the pod runs, and a retry must
    // not unpack over its files again.
    record.volumes_placed_in = Some(req.pod_uid.clone());
    state.store.save(id, &record)?;
    volumes::release(&marker_dir, id)?;
    tracing::info!(filled, bytes, "emptyDir contents in place; replacement released");
    Ok(VolumesResponse { filled, bytes })
}
