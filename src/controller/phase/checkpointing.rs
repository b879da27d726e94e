//! `Checkpointing`: the source agent freezes and checkpoints every container through its
//! kubelet; the result is persisted; then (migrations only) the source pod is held and the
//! target re-checked against the API server. A source that stayed frozen goes on to
//! `Transferring` as it is (killed once its state is verified there, see `frozen`); one that
//! could not be kept frozen is stopped at once through the Eviction API.

use std::time::Duration;

use k8s_openapi::{api::core::v1::Node, apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use kube::{Api, ResourceExt, runtime::controller::Action};
use serde_json::json;

use super::{frozen, hold, rollback, transition};
use crate::{
    agent::api::{CheckpointRequest, EmptyDirSpec},
    api::{Mode, Phase, PodMigration, PodMigrationStatus, STOP_SOURCE_OF, VolumeCheckpoint},
    controller::{
        context::{Context, Error},
        decide::human_bytes,
        phase::finished::release_archives,
        placement, state,
    },
};

pub async fn checkpointing(pm: &PodMigration, status: &mut PodMigrationStatus, ctx: &Context) -> Result<Action, Error> {
    if status.checkpointed_at.is_none() {
        return checkpoint(pm, status, ctx).await;
    }
    if status.source_stop_requested_at.is_none() {
        return keep_frozen(pm, status, ctx).await;
    }
    stop_source(pm, status, ctx).await
}

async fn checkpoint(pm: &PodMigration, status: &mut PodMigrationStatus, ctx: &Context) -> Result<Action, Error> {
    let ns = pm.namespace().unwrap_or_default();
    let id = pm.uid().ok_or(Error::Missing("uid"))?;
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
    let Some(pod) = ctx.source_pod(pm) else {
        return rollback(
            pm,
            status,
            ctx,
            "PodGone",
            "the pod vanished before it was stopped".into(),
        )
        .await;
    };
    // Backups leave the pod running: nothing to freeze.
    let freeze = match pm.spec.mode {
        Mode::Migrate => frozen::spec(ctx, &pod, status),
        _ => None,
    };
    // emptyDirs move with a migration; a backup keeps only the containers' state.
    let empty_dirs = match pm.spec.mode {
        Mode::Migrate => match empty_dir_specs(&pod) {
            Ok(specs) => specs,
            Err(why) => return rollback(pm, status, ctx, "CheckpointFailed", why).await,
        },
        _ => Vec::new(),
    };
    let request = CheckpointRequest {
        migration: pm.name_any(),
        freeze,
        empty_dirs,
        namespace: ns,
        pod: pm.spec.pod_name.clone(),
        containers: status.containers.iter().map(|c| c.name.clone()).collect(),
        timeout_seconds: ctx.config.checkpoint_timeout.as_secs(),
    };
    let answer = match ctx.agent_client.checkpoint(&source, &id, &request).await {
        Ok(a) => a,
        Err(e) if e.retryable() && status.attempts + 1 < ctx.config.max_attempts => {
            status.attempts += 1;
            tracing::warn!(migration = %pm.name_any(), attempt = status.attempts, error = %e, "checkpoint failed; retrying");
            status.message = Some(format!("checkpoint attempt {} failed, retrying: {e}", status.attempts));
            return Ok(Action::requeue(super::schedule_retry(status, ctx, Timestamp::now())));
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
    let asked: Vec<String> = request.empty_dirs.iter().map(|v| v.name.clone()).collect();
    status.volumes = answer
        .volumes
        .into_iter()
        .map(|v| VolumeCheckpoint {
            name: v.container,
            digest: v.digest,
            size_bytes: v.size_bytes,
        })
        .collect();
    if let Some(missing) = asked.iter().find(|n| !status.volumes.iter().any(|v| &v.name == *n)) {
        return rollback(
            pm,
            status,
            ctx,
            "CheckpointFailed",
            format!("no contents for emptyDir {missing}"),
        )
        .await;
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
    let bytes: u64 = status.containers.iter().filter_map(|c| c.size_bytes).sum::<u64>()
        + status.volumes.iter().map(|v| v.size_bytes).sum::<u64>();
    let now = Time(Timestamp::now());
    // This checkpoint's freeze and timeline replace any earlier attempt's (when it was
    // queued, before any attempt, stays).
    status.source_frozen_at = None;
    status.source_thawed_at = None;
    status.timeline.retain(|t| t.step == crate::api::Step::Queued.as_str());
    match answer.freeze {
        Some(f) if f.held => {
            let at = f.frozen_at.and_then(|t| t.parse::<Timestamp>().ok()).unwrap_or(now.0);
            state::mark(status, crate::api::Step::Frozen, at);
            status.source_frozen_at = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(at));
            status.freeze_note = None;
        }
        Some(f) => status.freeze_note = f.note,
        None => {}
    }
    if pm.spec.mode == Mode::Checkpoint {
        // A backup: the pod keeps running; the image is built where the archives are.
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
    status.checkpointed_at = Some(now.clone());
    state::mark(status, crate::api::Step::Checkpointed, now.0);
    if frozen::is_frozen(status) {
        // Persisted before anything else, so a new leader neither checkpoints twice nor
        // forgets to thaw.
        status.message = Some(format!(
            "checkpoint taken ({}); the source stays frozen until its state is verified on the target",
            human_bytes(bytes)
        ));
        return Ok(Action::requeue(Duration::ZERO));
    }
    // Not frozen: persist before stopping anything: the webhook lets our eviction through only
    // once it sees this, and a new leader must not checkpoint twice.
    status.source_stop_requested_at = Some(now);
    status.message = Some(format!(
        "checkpoint taken ({}); stopping the source pod",
        human_bytes(bytes)
    ));
    Ok(Action::requeue(Duration::ZERO))
}

/// The source stayed frozen through its checkpoint: hold its pod object (the drain waits for
/// it) and send the archives while it stays frozen; it is killed only once they are verified
/// on the target (`Transferring`).
async fn keep_frozen(pm: &PodMigration, status: &mut PodMigrationStatus, ctx: &Context) -> Result<Action, Error> {
    if let Some(why) = target_unfit(ctx, status.target_node.as_deref()).await? {
        return back_to_pending(pm, status, ctx, format!("target {why}")).await;
    }
    if !hold::add(ctx, pm).await? {
        return rollback(pm, status, ctx, "PodGone", "the frozen source pod vanished".into()).await;
    }
    to_transferring(pm, status, ctx, "source frozen since its checkpoint").await
}

async fn stop_source(pm: &PodMigration, status: &mut PodMigrationStatus, ctx: &Context) -> Result<Action, Error> {
    let stopping = ctx
        .source_pod(pm)
        .is_none_or(|p| p.metadata.deletion_timestamp.is_some());
    if !stopping {
        // The cache may be behind: ask the API server whether the target still fits.
        if let Some(why) = target_unfit(ctx, status.target_node.as_deref()).await? {
            return back_to_pending(pm, status, ctx, format!("target {why}")).await;
        }
        hold::add(ctx, pm).await?;
    }
    match evict_source(ctx, pm).await {
        Ok(()) => {}
        Err(kube::Error::Api(e)) if e.code == 429 => {
            // A PodDisruptionBudget refused: the source keeps running, so the checkpoint is
            // stale. Drop it and start over from Pending.
            return back_to_pending(pm, status, ctx, format!("the source stop was refused ({})", e.message)).await;
        }
        Err(e) => {
            status.message = Some(format!("stopping the source pod failed, retrying: {e}"));
            return Ok(Action::requeue(Duration::from_secs(2)));
        }
    }
    state::mark_source_stopped(
        status,
        "Evicted",
        "the source pod was evicted after the checkpoint; its object is held until the state is verified on the target",
        Timestamp::now(),
    );
    to_transferring(pm, status, ctx, "source stopped").await
}

/// On to `Transferring`, saying how the source was left (`how`) and what goes where.
async fn to_transferring(
    pm: &PodMigration,
    status: &mut PodMigrationStatus,
    ctx: &Context,
    how: &str,
) -> Result<Action, Error> {
    let bytes: u64 = status.containers.iter().filter_map(|c| c.size_bytes).sum();
    let note = format!(
        "{how}; sending {} to {}",
        human_bytes(bytes),
        status.target_node.as_deref().unwrap_or("?")
    );
    transition(pm, status, ctx, Phase::Transferring, note).await;
    Ok(Action::requeue(Duration::ZERO))
}

/// Why the chosen target cannot take the pod now, read from the API server.
async fn target_unfit(ctx: &Context, target: Option<&str>) -> Result<Option<String>, Error> {
    let Some(target) = target else {
        return Ok(Some("none chosen".into()));
    };
    let node = Api::<Node>::all(ctx.client.clone()).get_opt(target).await?;
    Ok(match node {
        None => Some(format!("{target} does not exist any more")),
        Some(n) => placement::node_unfit(&n).map(|why| format!("{target} {why}")),
    })
}

/// Drop the checkpoint (the source keeps running, so it goes stale) and queue again.
pub(super) async fn back_to_pending(
    pm: &PodMigration,
    status: &mut PodMigrationStatus,
    ctx: &Context,
    why: String,
) -> Result<Action, Error> {
    let thaw = frozen::resume(ctx, pm, status).await.unwrap_or_default();
    release_archives(ctx, pm, status).await;
    hold::release(ctx, pm).await?;
    ctx.release_slot(pm);
    status.source_stop_requested_at = None;
    status.checkpointed_at = None;
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
        format!("{why}; retrying from Pending{thaw}"),
    )
    .await;
    Ok(Action::requeue(Duration::from_secs(5)))
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

/// The emptyDirs to pack, each with the runtime ID of the container through whose mount the
/// source agent reads it (see `preflight::empty_dir_mounts`).
fn empty_dir_specs(pod: &k8s_openapi::api::core::v1::Pod) -> Result<Vec<EmptyDirSpec>, String> {
    let statuses = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .map(Vec::as_slice)
        .unwrap_or_default();
    crate::preflight::empty_dir_mounts(pod)
        .into_iter()
        .map(|m| {
            let id = statuses
                .iter()
                .find(|s| s.name == m.container)
                .and_then(|s| s.container_id.clone())
                .ok_or_else(|| {
                    format!(
                        "container {} (which mounts emptyDir {}) has no runtime ID",
                        m.container, m.volume
                    )
                })?;
            Ok(EmptyDirSpec {
                name: m.volume,
                container_id: id,
                mount_path: m.mount_path,
            })
        })
        .collect()
}
