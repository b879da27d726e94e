//! Agent to agent: the source pushes checkpoint archives and emptyDir contents, the target
//! receives them (digest and structure checked while they arrive) and says what it holds
//! verified, so that a resumed push sends only the rest.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use axum::{
    Json,
    body::Body,
    extract::{Extension, Path, State},
    http::HeaderMap,
};
use tracing::instrument;

use super::{
    api::{self, ArchiveRecord, Kind, PushRequest, PushResponse, ReceiveResponse},
    archive::Validator,
    client::Sending,
    expect,
    incoming::Feed,
    prepull, receive,
    server::{AgentError, AgentState, base_image, describe_early},
    store::Record,
};
use crate::{metrics::PhaseLabels, tls::PeerIdentity};

#[instrument(skip_all, fields(id = %id, target = %req.target))]
pub async fn push(
    State(state): State<Arc<AgentState>>,
    Path(id): Path<String>,
    Json(req): Json<PushRequest>,
) -> Result<Json<PushResponse>, AgentError> {
    let started = Instant::now();
    let result = do_push(&state, &id, &req).await;
    state.record_op("send", started, &result);
    result.map(Json)
}

/// What this node holds of `kind`: packed or checkpointed here (to send).
fn sent_from(record: &Record, kind: Kind) -> &BTreeMap<String, ArchiveRecord> {
    match kind {
        Kind::Archive => &record.checkpointed,
        Kind::Volume => &record.volumes,
    }
}

/// What this node received of `kind`.
fn received_map(record: &mut Record, kind: Kind) -> &mut BTreeMap<String, ArchiveRecord> {
    match kind {
        Kind::Archive => &mut record.received,
        Kind::Volume => &mut record.received_volumes,
    }
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
    let wire = Arc::new(AtomicU64::new(0));
    let files =
        || (req.archives.iter().map(|a| (Kind::Archive, a))).chain(req.volumes.iter().map(|v| (Kind::Volume, v)));
    let running = state.pushes.start(id, files().map(|(_, a)| a.size_bytes).sum());
    let files = files();
    for (kind, archive) in files {
        let what = match kind {
            Kind::Archive => "archive of container",
            Kind::Volume => "contents of emptyDir",
        };
        let held = sent_from(&record, kind)
            .get(&archive.container)
            .ok_or_else(|| AgentError::NotFound(format!("no {what} {}", archive.container)))?;
        if held.digest != archive.digest {
            return Err(AgentError::BadRequest(format!(
                "{what} {} is {}, not the requested {}",
                archive.container, held.digest, archive.digest
            )));
        }
        let target_id = req.target_id.as_deref().unwrap_or(id);
        // A resumed push (new leader, retry) does not resend what the target already verified.
        match state.peers.held(&req.target, target_id, kind, &archive.container).await {
            Ok(Some(there)) if there.digest == archive.digest => {
                tracing::info!(name = %archive.container, ?kind, bytes = there.size_bytes, "target already holds this verified; not sent again");
                already_held += there.size_bytes;
                running.push.read.fetch_add(there.size_bytes, Ordering::Relaxed);
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
                "{} is {on_disk} bytes on disk, {} when written",
                held.path, held.size_bytes
            )));
        }
        let sending = Sending {
            options: req.transfer,
            wire: Arc::clone(&wire),
            read: Arc::clone(&running.push.read),
        };
        let received = match state
            .peers
            .upload(&req.target, target_id, kind, archive, file, sending)
            .await
        {
            Ok(r) => r,
            // The target refused the bytes themselves (digest or structure): name it.
            Err(e)
                if e.reason()
                    .is_some_and(|r| matches!(r, "archive_unsafe" | "archive_invalid" | "digest_mismatch")) =>
            {
                return Err(AgentError::Corrupt(format!(
                    "the target refused the {what} {}: {e}",
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
    let wire_bytes = wire.load(Ordering::Relaxed);
    tracing::info!(bytes, already_held, wire_bytes, seconds, "archives sent");
    Ok(PushResponse {
        bytes: bytes + already_held,
        seconds,
        already_held_bytes: already_held,
        wire_bytes,
    })
}

#[instrument(skip_all, fields(id = %id, container = %container))]
pub async fn receive_archive(
    State(state): State<Arc<AgentState>>,
    Path((id, container)): Path<(String, String)>,
    peer: Option<Extension<Arc<PeerIdentity>>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<ReceiveResponse>, AgentError> {
    let started = Instant::now();
    let result = do_receive(&state, Kind::Archive, &id, &container, (peer, &headers), body).await;
    state.record_op("receive", started, &result);
    if result.is_ok() {
        // The last expected archive may just have arrived: build and pull without waiting
        // for the controller (this answer, and so the freeze, does not wait for it either).
        let (state, id) = (Arc::clone(&state), id.clone());
        tokio::spawn(async move { prepull::after_receipt(state, &id).await });
    }
    result.map(Json)
}

#[instrument(skip_all, fields(id = %id, volume = %volume))]
pub async fn receive_volume(
    State(state): State<Arc<AgentState>>,
    Path((id, volume)): Path<(String, String)>,
    peer: Option<Extension<Arc<PeerIdentity>>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<ReceiveResponse>, AgentError> {
    let started = Instant::now();
    let result = do_receive(&state, Kind::Volume, &id, &volume, (peer, &headers), body).await;
    state.record_op("receive", started, &result);
    result.map(Json)
}

async fn do_receive(
    state: &Arc<AgentState>,
    kind: Kind,
    id: &str,
    name: &str,
    (peer, headers): (Option<Extension<Arc<PeerIdentity>>>, &HeaderMap),
    body: Body,
) -> Result<ReceiveResponse, AgentError> {
    let expected = headers
        .get(api::DIGEST_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|d| d.starts_with("sha256:"))
        .ok_or_else(|| AgentError::BadRequest(format!("missing {} header", api::DIGEST_HEADER)))?
        .to_string();
    let final_path = state.store.path_of(kind, id, name)?;
    let _guard = state.lock(id).await;
    let peer = peer.map(|Extension(p)| p).unwrap_or_default();
    // Loaded once: the migration's lock is held until the received file is recorded.
    let mut record = state.store.load(id)?.unwrap_or_default();
    let size = expect::admit_upload(
        record.expected.as_ref(),
        kind,
        name,
        &expected,
        &peer,
        state.access.require_node,
    )
    .map_err(AgentError::Forbidden)?;
    let compressed = match headers.get("content-encoding").map(|v| v.to_str().unwrap_or("?")) {
        None | Some("identity") => false,
        Some(api::ZSTD_ENCODING) => true,
        Some(other) => return Err(AgentError::BadRequest(format!("unknown content-encoding {other:?}"))),
    };
    state.store.create_dir(id)?;
    let part = final_path.with_extension("part");
    let validator = match kind {
        Kind::Archive => Validator::new(),
        // An emptyDir's files: the tar rules of a root file system diff.
        Kind::Volume => Validator::rootfs(),
    };
    // Hashed, validated and written in one pass; the part file is gone on any error.
    // Never more than was checkpointed: a hostile or broken sender (or a small compressed
    // stream that expands) cannot fill this node's disk.
    let feed = match kind {
        Kind::Archive => stream_to_runtime(state, id, &mut record, name, &part),
        Kind::Volume => None,
    };
    let info = receive::receive(body, &part, &expected, (validator, size, compressed), feed.clone()).await?;
    tokio::fs::rename(&part, &final_path).await?;
    if let Some(feed) = feed {
        feed.done(final_path.clone());
    }
    if let Some(dir) = final_path.parent() {
        crate::agent::private::sync_dir(dir)?;
    }
    received_map(&mut record, kind).insert(
        name.to_string(),
        ArchiveRecord {
            container: name.to_string(),
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
    tracing::info!(?kind, bytes = info.size, digest = %info.digest, "received and verified");
    Ok(ReceiveResponse {
        digest: info.digest,
        size_bytes: info.size,
    })
}

/// When `name` is the only archive of a migration whose replacement will start from it,
/// describe its image now and have the runtime pull it while it arrives into `part`: the
/// download overlaps the transfer instead of following it. Anything failing here only means
/// the image is built and pulled once the archive is verified, as for several containers.
fn stream_to_runtime(
    state: &Arc<AgentState>,
    id: &str,
    record: &mut Record,
    name: &str,
    part: &std::path::Path,
) -> Option<Arc<Feed>> {
    state.prepull.cri.as_ref()?;
    let archive = expect::streamed(record, name)?;
    match describe_early(state, id, record, &archive) {
        Ok(image) => {
            let feed = state
                .prepull
                .own
                .incoming
                .begin(&archive.digest, archive.size_bytes, part.to_path_buf());
            prepull::spawn(Arc::clone(state), id, vec![image]);
            Some(Arc::new(feed))
        }
        Err(error) => {
            tracing::warn!(%error, "could not describe the image before its archive; built on receipt");
            None
        }
    }
}

/// The verified archive this agent received for `container`, or 404.
pub async fn held_archive(
    State(state): State<Arc<AgentState>>,
    Path((id, container)): Path<(String, String)>,
) -> Result<Json<ReceiveResponse>, AgentError> {
    held(&state, Kind::Archive, &id, &container).map(Json)
}

/// The verified contents of emptyDir `volume` this agent received, or 404.
pub async fn held_volume(
    State(state): State<Arc<AgentState>>,
    Path((id, volume)): Path<(String, String)>,
) -> Result<Json<ReceiveResponse>, AgentError> {
    held(&state, Kind::Volume, &id, &volume).map(Json)
}

fn held(state: &AgentState, kind: Kind, id: &str, name: &str) -> Result<ReceiveResponse, AgentError> {
    state.store.path_of(kind, id, name)?; // validates both names
    let mut record = state.store.load(id)?.unwrap_or_default();
    let held = received_map(&mut record, kind)
        .get(name)
        .filter(|a| std::fs::metadata(&a.path).is_ok_and(|m| m.len() == a.size_bytes))
        .ok_or_else(|| AgentError::NotFound(format!("no verified {} {name} for migration {id}", kind.segment())))?;
    Ok(ReceiveResponse {
        digest: held.digest.clone(),
        size_bytes: held.size_bytes,
    })
}
