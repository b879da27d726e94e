//! `Succeeded` / `Failed`, and the PodMigration's deletion: release what is no longer needed.

use kube::{ResourceExt, runtime::controller::Action};

use std::time::Duration;

use super::{hold, restoring};
use crate::{
    api::{Mode, Phase, PodMigration, PodMigrationStatus, Trigger},
    controller::context::{Context, Error},
};

pub async fn finished(pm: &PodMigration, status: &mut PodMigrationStatus, ctx: &Context) -> Result<Action, Error> {
    if pm.spec.trigger == Trigger::Drain {
        ctx.observe_drain(&pm.spec.source_node);
    }
    ctx.release_slot(pm);
    // Whatever ended the migration, the source pod must not stay held.
    hold::release(ctx, pm).await?;
    // A migration that failed after its source stopped: the workload must run again, fresh.
    if pm.spec.mode == Mode::Migrate
        && status.phase == Phase::Failed
        && status.source_stop_requested_at.is_some()
        && !restoring::start_fresh(pm, status, ctx).await?
    {
        return Ok(Action::requeue(Duration::from_secs(2)));
    }
    // A stored checkpoint is kept until its PodMigration is deleted (finalizer cleanup).
    let keep = pm.spec.mode == Mode::Checkpoint && status.phase == Phase::Succeeded;
    if !status.archives_released && !keep {
        release_archives(ctx, pm, status).await;
    }
    Ok(Action::await_change())
}

/// Tell the agents to drop what they no longer need: the source's archives always; the
/// target's image only when the migration failed (a restored container that restarts is
/// created from the image again).
pub async fn release_archives(ctx: &Context, pm: &PodMigration, status: &mut PodMigrationStatus) {
    let Some(id) = pm.uid() else { return };
    let mut nodes = vec![pm.spec.source_node.clone()];
    if status.phase == Phase::Failed
        && let Some(t) = status.target_node.clone()
    {
        nodes.push(t);
    }
    for node in nodes {
        if let Some(agent) = ctx.agent(&node)
            && let Err(error) = ctx.agent_client.delete(&agent, &id).await
        {
            tracing::warn!(%error, node, "could not release archives (the agent's garbage collection will)");
        }
    }
    status.archives_released = true;
}

/// The PodMigration is being deleted: drop everything on every node involved.
pub async fn cleanup(pm: &PodMigration, ctx: &Context) -> Result<Action, Error> {
    ctx.release_slot(pm);
    hold::release(ctx, pm).await?;
    let Some(id) = pm.uid() else {
        return Ok(Action::await_change());
    };
    let mut nodes = vec![pm.spec.source_node.clone()];
    nodes.extend(pm.target_node().map(str::to_string));
    for node in nodes {
        if let Some(agent) = ctx.agent(&node)
            && let Err(error) = ctx.agent_client.delete(&agent, &id).await
        {
            tracing::warn!(%error, node, "cleanup on agent failed (its garbage collection will)");
        }
    }
    Ok(Action::await_change())
}
