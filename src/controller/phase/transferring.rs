//! `Transferring`: the source agent streams every archive to the target agent, which checks
//! each digest before it keeps anything. Once verified there, a frozen source is killed, and
//! the source pod's hold is lifted.

use std::time::Duration;

use k8s_openapi::{api::core::v1::Pod, apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use kube::{ResourceExt, runtime::controller::Action};

use super::{frozen, hold, lose_state_because, pending, retry_after_stop, transition};
use crate::{
    agent::{
        api::{ExpectRequest, PushRequest, PushResponse},
        client::ClientError,
    },
    api::{Phase, PodMigration, PodMigrationStatus, TransferProgress},
    controller::{
        context::{Context, Error},
        decide::{self, human_bytes},
        placement, state,
    },
};

pub async fn transferring(
    pm: &mut PodMigration,
    status: &mut PodMigrationStatus,
    ctx: &Context,
) -> Result<Action, Error> {
    if frozen::is_frozen(status) && status.source_stop_requested_at.is_some() && status.source_stopped_at.is_none() {
        return stop_frozen(pm, status, ctx).await;
    }
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
    let Some(target) = ensure_target(pm, status, ctx).await else {
        return retry_after_stop(pm, status, ctx, "no node can take the pod right now".into()).await;
    };
    let Some(target_agent) = ctx.agent(&target) else {
        return retry_after_stop(pm, status, ctx, format!("no agent on target node {target}")).await;
    };
    let request = PushRequest {
        target: target_agent,
        archives: decide::archive_refs(status),
        target_id: Some(id.clone()),
        volumes: decide::volume_refs(status),
        transfer: ctx.config.transfer,
    };
    let source_id = status.source_id.clone().unwrap_or_else(|| id.clone());
    // The target accepts exactly these digests, and only from the source node's agent.
    let expect = ExpectRequest {
        source_node: pm.spec.source_node.clone(),
        archives: request.archives.clone(),
        volumes: request.volumes.clone(),
        // As `BuildingImage` asks: never for a checkpoint kept for later.
        prepull: pm.spec.mode != crate::api::Mode::Checkpoint,
    };
    let pushed = match ctx.agent_client.expect(&request.target, &id, &expect).await {
        Ok(()) => push_showing_progress(pm, status, ctx, (&source, &source_id), &request).await,
        // The target's agent is gone, as when the source cannot reach it below.
        Err(e) if agent_down(&e) && status.attempts >= 1 => {
            return replace_target(pm, status, ctx, &target, &e.to_string()).await;
        }
        Err(e) => Err(e),
    };
    match pushed {
        Ok(answer) => {
            state::mark(status, crate::api::Step::Verified, Timestamp::now());
            status.transferred_bytes = Some(answer.bytes);
            let rate = if answer.seconds > 0.0 {
                answer.bytes as f64 / answer.seconds
            } else {
                0.0
            };
            let mut resumed = String::new();
            if ctx.config.transfer.zstd_level.is_some() && answer.wire_bytes > 0 {
                resumed += &format!(", {} on the wire", human_bytes(answer.wire_bytes));
            }
            if answer.already_held_bytes > 0 {
                resumed += &format!(
                    ", {} of it already verified there before",
                    human_bytes(answer.already_held_bytes)
                );
            }
            if frozen::resumable(status) {
                // Verified on the target: the frozen source may go. Persisted first, so the
                // webhook lets our eviction through and a new leader does not resume it.
                status.source_stop_requested_at = Some(Time(Timestamp::now()));
                status.message = Some(format!(
                    "{} verified on {target} ({}/s{resumed}){STOPPING_FROZEN}",
                    human_bytes(answer.bytes),
                    human_bytes(rate as u64)
                ));
                return Ok(Action::requeue(Duration::ZERO));
            }
            // The state is verified off the source node: once the source has stopped, the
            // drain may complete (later steps settle it if its containers are still stopping).
            hold::settle(ctx, pm, status).await?;
            transition(
                pm,
                status,
                ctx,
                Phase::BuildingImage,
                format!(
                    "{} verified on {target} ({}/s{resumed}); building the checkpoint image",
                    human_bytes(answer.bytes),
                    human_bytes(rate as u64)
                ),
            )
            .await;
            Ok(Action::requeue(Duration::ZERO))
        }
        // The target's agent stopped answering (its node died or lost its network) while
        // the archives are still on the source node: take another target.
        Err(e) if target_unreachable(&e) && status.attempts >= 1 => {
            replace_target(pm, status, ctx, &target, &e.to_string()).await
        }
        // The archive is not what was checkpointed: no retry can help, say so.
        Err(e) if e.reason() == Some("archive_corrupt") => {
            lose_state_because(
                pm,
                status,
                ctx,
                "ArchiveCorrupt",
                format!("transfer to {target} refused: {e}"),
            )
            .await
        }
        Err(e) => retry_after_stop(pm, status, ctx, format!("transfer to {target} failed: {e}")).await,
    }
}

const STOPPING_FROZEN: &str = "; stopping the frozen source";

/// How often a running push's progress is written into the status.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// Push, and while the push runs write how far it is into `status.transfer` about every
/// second (for `kubectl migrate` and `kubectl get -o yaml`). Each write is conditional on the
/// version the previous one wrote, so the step's final write still fails on anyone else's
/// change; once one fails, progress is no longer shown and the final write will tell.
async fn push_showing_progress(
    pm: &mut PodMigration,
    status: &mut PodMigrationStatus,
    ctx: &Context,
    (source, source_id): (&str, &str),
    request: &PushRequest,
) -> Result<PushResponse, ClientError> {
    let push = ctx.agent_client.push(source, source_id, request);
    tokio::pin!(push);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + PROGRESS_EVERY, PROGRESS_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut showing = true;
    loop {
        tokio::select! {
            pushed = &mut push => {
                status.transfer = None;
                return pushed;
            }
            _ = tick.tick(), if showing => {
                let progress = match ctx.agent_client.push_progress(source, source_id).await {
                    Ok(Some(p)) => p,
                    // Not started yet (waiting for the agent's lock) or just ended.
                    Ok(None) => continue,
                    Err(error) => {
                        tracing::debug!(%error, "no progress from the source agent");
                        continue;
                    }
                };
                status.transfer = Some(TransferProgress {
                    bytes: progress.bytes,
                    total_bytes: progress.total_bytes,
                    seconds: progress.seconds,
                });
                if let Err(error) = ctx.write_progress(pm, status).await {
                    tracing::debug!(%error, "progress not written; not trying again in this step");
                    showing = false;
                }
            }
        }
    }
}

/// The state is verified on the target and the source, frozen since its checkpoint, is asked
/// to stop: evict it (its object stays held), kill its frozen tasks, build the image.
async fn stop_frozen(pm: &PodMigration, status: &mut PodMigrationStatus, ctx: &Context) -> Result<Action, Error> {
    let gone = ctx.source_pod(pm).is_none();
    let mut tasks_gone = gone;
    if !gone {
        if let Err(e) = frozen::delete_source(ctx, pm).await {
            status.message = Some(format!("stopping the frozen source failed, retrying: {e}"));
            return Ok(Action::requeue(Duration::from_secs(2)));
        }
        match frozen::kill(ctx, pm, status).await {
            Ok(seen_gone) => tasks_gone = seen_gone,
            Err(e) => {
                status.message = Some(format!("{e}; retrying"));
                return Ok(Action::requeue(Duration::from_secs(2)));
            }
        }
    }
    let now = Timestamp::now();
    state::mark(status, crate::api::Step::SourceKilled, now);
    if tasks_gone {
        // Killed while frozen and seen gone by its agent: it never ran after its checkpoint
        // (window 0 by construction, nothing for the kubelet to report first), so the hold
        // goes now, and the pod object with the next step (after this status says the state
        // is safe, so that a held eviction answers with where it went).
        state::mark(status, crate::api::Step::SourceTerminated, now);
        status.source_window_seconds.get_or_insert(0.0);
        hold::release(ctx, pm).await?;
    }
    state::mark_source_stopped(
        status,
        "KilledFrozen",
        "the source was frozen before its checkpoint and killed, still frozen, once its state was verified on the target: it never ran after its checkpoint",
        Timestamp::now(),
    );
    hold::settle(ctx, pm, status).await?;
    // The transfer's own summary (rate, what was already there) stays in the Event.
    let verified = status
        .message
        .as_deref()
        .and_then(|m| m.strip_suffix(STOPPING_FROZEN))
        .map(str::to_string)
        .unwrap_or_else(|| {
            format!(
                "{} verified on {}",
                human_bytes(status.transferred_bytes.unwrap_or_default()),
                status.target_node.as_deref().unwrap_or("?")
            )
        });
    transition(
        pm,
        status,
        ctx,
        Phase::BuildingImage,
        format!("{verified}; frozen source stopped; building the checkpoint image"),
    )
    .await;
    Ok(Action::requeue(Duration::ZERO))
}

/// The controller could not reach an agent at all (connection refused, reset, timeout).
pub fn agent_down(e: &crate::agent::client::ClientError) -> bool {
    matches!(
        e,
        crate::agent::client::ClientError::Connect { .. }
            | crate::agent::client::ClientError::Body { .. }
            | crate::agent::client::ClientError::Timeout { .. }
    )
}

/// The source agent could not reach the target agent (as opposed to the target refusing).
pub fn target_unreachable(e: &crate::agent::client::ClientError) -> bool {
    matches!(e.reason(), Some("unreachable" | "timeout"))
}

/// Give up on `target` for this migration and send the archives (still on the source node)
/// to another node. Replacements already pinned to the old target are deleted in `Restoring`
/// (a gated pod's node affinity can only be narrowed), once the new target is in the status
/// the pod webhook reads.
pub async fn replace_target(
    pm: &PodMigration,
    status: &mut PodMigrationStatus,
    ctx: &Context,
    target: &str,
    why: &str,
) -> Result<Action, Error> {
    if !status.excluded_targets.iter().any(|t| t == target) {
        status.excluded_targets.push(target.to_string());
    }
    let Some(pod) = status
        .pod_template
        .clone()
        .and_then(|t| serde_json::from_value::<Pod>(t).ok())
    else {
        return retry_after_stop(
            pm,
            status,
            ctx,
            format!("target {target} lost ({why}) and no pod template"),
        )
        .await;
    };
    let reserved = pending::reserved_by_others(ctx, pm);
    let volumes = pending::claimed_volumes(ctx, &pm.namespace().unwrap_or_default(), &pod).await?;
    let next = pending::target_or_reason(
        ctx,
        &pod,
        &pm.spec.source_node,
        pm.spec.target_node.as_deref(),
        &reserved,
        &status.excluded_targets,
        &volumes,
    );
    let next = match next {
        Ok(n) => n,
        Err(reason) => {
            return retry_after_stop(pm, status, ctx, format!("target {target} lost ({why}); {reason}")).await;
        }
    };
    ctx.warn(
        pm,
        "TargetChanged",
        format!("target {target} is lost ({why}); sending the checkpoint to {next} instead"),
    )
    .await;
    status.target_node = Some(next.clone());
    // A replacement pinned to the lost target is deleted in `Restoring`; its owner's next pod
    // must find this migration waiting for one (see `admission::pod`).
    status.replacement = None;
    status.transferred_bytes = None;
    for c in &mut status.containers {
        c.image = None;
    }
    status.attempts = 0;
    if status.phase != Phase::Transferring {
        transition(
            pm,
            status,
            ctx,
            Phase::Transferring,
            format!("target {target} lost; sending to {next}"),
        )
        .await;
    } else {
        status.message = Some(format!("target {target} lost; sending to {next}"));
    }
    Ok(Action::requeue(Duration::ZERO))
}

/// The target chosen in Pending, or a new one if it vanished or became unfit since. The new
/// one is chosen for the pod as it was recorded (its own constraints and requests), with the
/// capacity other migrations reserved.
async fn ensure_target(pm: &PodMigration, status: &mut PodMigrationStatus, ctx: &Context) -> Option<String> {
    let current = status.target_node.clone()?;
    let node_ok = ctx
        .nodes
        .get(&kube::runtime::reflector::ObjectRef::new(&current))
        .is_some_and(|n| placement::node_unfit(&n).is_none());
    if node_ok && ctx.agent(&current).is_some() {
        return Some(current);
    }
    let pod: Pod = serde_json::from_value(status.pod_template.clone()?).ok()?;
    let reserved = pending::reserved_by_others(ctx, pm);
    let volumes = pending::claimed_volumes(ctx, &pm.namespace().unwrap_or_default(), &pod)
        .await
        .ok()?;
    match pending::target_or_reason(
        ctx,
        &pod,
        &pm.spec.source_node,
        pm.spec.target_node.as_deref(),
        &reserved,
        &status.excluded_targets,
        &volumes,
    ) {
        Ok(n) => {
            ctx.warn(
                pm,
                "TargetChanged",
                format!("target {current} is gone or unfit; using {n}"),
            )
            .await;
            status.target_node = Some(n.clone());
            Some(n)
        }
        Err(_) => None,
    }
}
