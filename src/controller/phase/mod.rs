//! One step of a PodMigration's life per reconcile, one file per phase. The steps shared by
//! every phase (transitions, failure, rollback, retries, deadlines) live here.

mod building;
mod checkpointing;
mod finished;
mod frozen;
mod hold;
mod pending;
mod restore;
mod restoring;
mod transferring;

use std::time::Duration;

use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use kube::{ResourceExt, runtime::controller::Action};

pub use finished::cleanup;

use super::{
    context::{Context, Error},
    decide,
    state::{self, CONDITION_DEGRADED},
};
use crate::api::{Mode, Phase, PodMigration, PodMigrationStatus};

/// After a status write, the next step waits for the watch event that carries it (so it never
/// works from the stale cached object); this is only the safety net.
const AFTER_WRITE: Duration = Duration::from_secs(10);

/// One step; writes the status when it changed.
pub async fn apply(pm: &PodMigration, ctx: &Context) -> Result<Action, Error> {
    if ctx.superseded(pm) {
        // The watch event of the step's final write is on its way and will wake us.
        return Ok(Action::requeue(AFTER_WRITE));
    }
    // A step may write progress before its final write; it then moves `pm` to the version
    // it wrote (see `Context::write_progress`).
    let mut latest = std::borrow::Cow::Borrowed(pm);
    let mut status = pm.status.clone().unwrap_or_default();
    let before = status.clone();
    let now = Timestamp::now();
    let mut action = if pm.status.is_none() || status.phases.is_empty() {
        state::enter(&mut status, Phase::Pending, now);
        Ok(Action::requeue(Duration::ZERO))
    } else if let Some(late) = ctx.config.deadlines.overdue(&status, now) {
        deadline_passed(pm, &mut status, ctx, late).await
    } else if let Some(wait) = decide::wait_for_retry(&status, now) {
        Ok(Action::requeue(wait))
    } else {
        match status.phase {
            Phase::Pending => match pm.spec.mode {
                Mode::Migrate | Mode::Checkpoint => pending::pending(pm, &mut status, ctx).await,
                Mode::Restore => restore::pending_restore(pm, &mut status, ctx).await,
            },
            Phase::Checkpointing => checkpointing::checkpointing(pm, &mut status, ctx).await,
            Phase::Transferring => transferring::transferring(latest.to_mut(), &mut status, ctx).await,
            Phase::BuildingImage => building::building(pm, &mut status, ctx).await,
            Phase::Restoring => restoring::restoring(pm, &mut status, ctx).await,
            Phase::Succeeded | Phase::Failed => finished::finished(pm, &mut status, ctx).await,
        }
    };
    // Once the state is verified on the target, the next steps need nothing persisted
    // between them (each is idempotent and a retry redoes it from the last write): they run
    // on in this reconcile, as the pod is down, instead of a status write and its watch
    // event per phase (50-100 ms each on a loaded control plane).
    let mut ran = before.phase;
    while matches!(&action, Ok(a) if *a == Action::requeue(Duration::ZERO)) && runs_on(ran, status.phase) {
        ran = status.phase;
        action = match status.phase {
            Phase::BuildingImage => building::building(&latest, &mut status, ctx).await,
            _ => restoring::restoring(&latest, &mut status, ctx).await,
        };
    }
    status.deadline = ctx.config.deadlines.deadline(&status).map(Time);
    // After a progress write the status must be written again even if the step ends where
    // it began: what the progress showed is over.
    let progress_written = latest.resource_version() != pm.resource_version();
    if status != before || progress_written {
        if status.phase != before.phase {
            tracing::info!(
                migration = %pm.name_any(),
                pod = %format!("{}/{}", pm.namespace().unwrap_or_default(), pm.spec.pod_name),
                source = %pm.spec.source_node,
                target = status.target_node.as_deref().unwrap_or("-"),
                from = %before.phase,
                to = %status.phase,
                seconds = state::phase_seconds(&status, before.phase).unwrap_or_default(),
                "phase transition"
            );
        }
        if let Err(e) = ctx.write_status(&latest, &status).await {
            if status.phase != Phase::Pending && before.phase == Phase::Pending {
                ctx.release_slot(pm);
            }
            return Err(e);
        }
        ctx.observe(pm, &before, &status);
        if before.phase.is_active() && !status.phase.is_active() {
            ctx.slot_done(pm);
        }
        return action.map(|a| {
            if a == Action::requeue(Duration::ZERO) {
                Action::requeue(AFTER_WRITE)
            } else {
                a
            }
        });
    }
    action
}

/// Does a step that moved the migration from `from` to `to` go on with `to`'s step at once?
/// Only forward from a verified transfer, and only within one mode's path.
fn runs_on(from: Phase, to: Phase) -> bool {
    matches!(
        (from, to),
        (Phase::Transferring, Phase::BuildingImage) | (Phase::BuildingImage, Phase::Restoring)
    )
}

/// Move to `phase`, with metrics and an Event.
async fn transition(pm: &PodMigration, status: &mut PodMigrationStatus, ctx: &Context, phase: Phase, note: String) {
    state::enter(status, phase, Timestamp::now());
    status.message = Some(note.clone());
    ctx.normal(pm, phase.as_str(), note).await;
}

async fn fail(
    pm: &PodMigration,
    status: &mut PodMigrationStatus,
    ctx: &Context,
    reason: &str,
    message: String,
) -> Action {
    tracing::warn!(migration = %pm.name_any(), reason, %message, "migration failed");
    state::fail(status, reason, message.clone(), Timestamp::now());
    ctx.warn(pm, reason, message).await;
    Action::requeue(Duration::ZERO)
}

/// Give up before the source stopped: thaw it if it was frozen (it carries on from where it
/// was), drop the archives, release the source pod, fail. The eviction then follows the pod's
/// `on-failure` policy.
async fn rollback(
    pm: &PodMigration,
    status: &mut PodMigrationStatus,
    ctx: &Context,
    reason: &str,
    message: String,
) -> Result<Action, Error> {
    let was_frozen = frozen::is_frozen(status);
    let thaw = frozen::resume(ctx, pm, status).await;
    finished::release_archives(ctx, pm, status).await;
    hold::release(ctx, pm).await?;
    let done = match (&thaw, was_frozen) {
        (Some(note), _) => format!("; rolled back{note}"),
        (None, true) => "; rolled back, the source was thawed and carries on with its state".to_string(),
        (None, false) => "; rolled back, the source pod was not touched".to_string(),
    };
    Ok(fail(pm, status, ctx, reason, format!("{message}{done}")).await)
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
    if decide::seconds_between(&stopped, &now) > ctx.config.restore_deadline.as_secs_f64() {
        return lose_state(
            pm,
            status,
            ctx,
            format!("{message}; gave up after the restore deadline"),
        )
        .await;
    }
    status.attempts += 1;
    tracing::warn!(migration = %pm.name_any(), attempt = status.attempts, %message, "step failed; retrying");
    state::set_condition(status, CONDITION_DEGRADED, true, "Retrying", &message, now);
    status.message = Some(format!("{message} (attempt {}, retrying)", status.attempts));
    ctx.warn(pm, "Retrying", message).await;
    Ok(Action::requeue(schedule_retry(status, ctx, now)))
}

/// Keep the next retry's earliest time in the status (backoff with jitter, never past the
/// phase's deadline) and return it.
fn schedule_retry(status: &mut PodMigrationStatus, ctx: &Context, now: Timestamp) -> Duration {
    let backoff = decide::backoff(status.attempts, rand::random::<f64>());
    let wait = decide::retry_wait(backoff, ctx.config.deadlines.deadline(status), now);
    status.retry_at = now
        .checked_add(k8s_openapi::jiff::SignedDuration::try_from(wait).unwrap_or_default())
        .ok()
        .map(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime);
    wait
}

/// The source is gone and its state cannot reach a replacement: the replacement starts from
/// its original image so the workload runs again, and the migration fails loudly.
async fn lose_state(
    pm: &PodMigration,
    status: &mut PodMigrationStatus,
    ctx: &Context,
    message: String,
) -> Result<Action, Error> {
    lose_state_because(pm, status, ctx, "StateLost", message).await
}

/// [`lose_state`] with a more specific reason (e.g. `ArchiveCorrupt`).
async fn lose_state_because(
    pm: &PodMigration,
    status: &mut PodMigrationStatus,
    ctx: &Context,
    reason: &str,
    message: String,
) -> Result<Action, Error> {
    if pm.spec.mode != Mode::Migrate {
        // Backups and restores stopped nothing: nothing to start fresh.
        return Ok(fail(pm, status, ctx, reason, message).await);
    }
    if frozen::resumable(status) {
        // The source is frozen, not stopped: nothing is lost, it resumes.
        return rollback(pm, status, ctx, reason, message).await;
    }
    // The fresh start itself happens in `Failed` (finished.rs), once the webhooks see the
    // failure and no longer bind new pods to this migration.
    hold::release(ctx, pm).await?;
    Ok(fail(
        pm,
        status,
        ctx,
        reason,
        format!("{message}; the state is lost and the replacement starts from its original image"),
    )
    .await)
}

/// The current phase ran past its deadline.
async fn deadline_passed(
    pm: &PodMigration,
    status: &mut PodMigrationStatus,
    ctx: &Context,
    late: f64,
) -> Result<Action, Error> {
    let budget = ctx.config.deadlines.budget(status.phase).unwrap_or_default().as_secs();
    let last = status.message.clone().unwrap_or_default();
    let message = format!(
        "{} exceeded its deadline of {budget}s ({late:.0}s ago); last: {last}",
        status.phase
    );
    if pm.spec.mode == Mode::Migrate && status.source_stop_requested_at.is_some() {
        return lose_state(pm, status, ctx, message).await;
    }
    rollback(pm, status, ctx, "DeadlineExceeded", message).await
}
