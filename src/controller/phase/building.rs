//! `BuildingImage`: the target agent turns each verified archive into a checkpoint OCI image
//! and serves it to its node's runtime.

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::{ResourceExt, runtime::controller::Action};

use super::{hold, retry_after_stop, transferring, transition};
use crate::{
    agent::api::ImageRequest,
    api::{Mode, Phase, PodMigration, PodMigrationStatus},
    controller::{
        context::{Context, Error},
        decide, state,
    },
};

pub async fn building(pm: &PodMigration, status: &mut PodMigrationStatus, ctx: &Context) -> Result<Action, Error> {
    let id = pm.uid().ok_or(Error::Missing("uid"))?;
    if pm.spec.mode == Mode::Migrate {
        hold::settle(ctx, pm, status).await?;
    }
    let target = status.target_node.clone().ok_or(Error::Missing("status.targetNode"))?;
    let Some(agent) = ctx.agent(&target) else {
        return retry_after_stop(pm, status, ctx, format!("no agent on target node {target}")).await;
    };
    let request = ImageRequest {
        namespace: pm.namespace().unwrap_or_default(),
        pod: pm.spec.pod_name.clone(),
        archives: decide::archive_refs(status),
    };
    let answer = match ctx.agent_client.build_image(&agent, &id, &request).await {
        Ok(answer) => answer,
        // The target died after it verified the archives; they are still on the source node.
        Err(e) if transferring::agent_down(&e) && status.attempts >= 1 && pm.spec.mode == Mode::Migrate => {
            return transferring::replace_target(pm, status, ctx, &target, &e.to_string()).await;
        }
        Err(e) => return retry_after_stop(pm, status, ctx, format!("image build on {target} failed: {e}")).await,
    };
    for image in answer.images {
        if let Some(c) = status.containers.iter_mut().find(|c| c.name == image.container) {
            c.image = Some(image.image);
        }
    }
    if pm.spec.mode == Mode::Checkpoint {
        let message = format!(
            "checkpoint stored on {target}; restore it with: kubectl migrate restore {}",
            pm.name_any()
        );
        let closed = state::succeed(status, message.clone(), Timestamp::now());
        ctx.observe(pm, closed, status);
        ctx.normal(pm, "CheckpointStored", message).await;
        return Ok(Action::requeue(Duration::ZERO));
    }
    transition(
        pm,
        status,
        ctx,
        Phase::Restoring,
        format!("checkpoint image ready on {target}; restoring"),
    )
    .await;
    Ok(Action::requeue(Duration::ZERO))
}
