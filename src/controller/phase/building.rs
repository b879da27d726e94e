//! `BuildingImage`: the target agent turns each verified archive into a checkpoint OCI image
//! and serves it to its node's runtime.

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use kube::{
    Api, ResourceExt,
    api::{Patch, PatchParams},
    runtime::controller::Action,
};

use super::{hold, retry_after_stop, transferring, transition};
use crate::{
    agent::api::ImageRequest,
    api::{self, Mode, Phase, PodMigration, PodMigrationStatus},
    controller::{
        context::{Context, Error},
        decide, pull, state,
    },
};

pub async fn building(pm: &PodMigration, status: &mut PodMigrationStatus, ctx: &Context) -> Result<Action, Error> {
    let id = pm.uid().ok_or(Error::Missing("uid"))?;
    if pm.spec.mode == Mode::Migrate {
        hold::settle(ctx, pm, status).await?;
        super::frozen::remove_dead_source(ctx, pm, status).await;
    }
    let target = status.target_node.clone().ok_or(Error::Missing("status.targetNode"))?;
    let Some(agent) = ctx.agent(&target) else {
        return retry_after_stop(pm, status, ctx, format!("no agent on target node {target}")).await;
    };
    let password = match &ctx.config.pull_key_file {
        Some(key) => Some(pull::password_of(key, pm).map_err(|e| Error::PullKey(e.to_string()))?),
        None => None,
    };
    let request = ImageRequest {
        namespace: pm.namespace().unwrap_or_default(),
        pod: pm.spec.pod_name.clone(),
        archives: decide::archive_refs(status),
        // The agent is told the digest, never the password.
        pull_digest: password.as_deref().map(crate::agent::api::pull_digest),
        prepull: pm.spec.mode != Mode::Checkpoint,
    };
    let answer = match ctx.agent_client.build_image(&agent, &id, &request).await {
        Ok(answer) => answer,
        // The target died after it verified the archives; they are still on the source node.
        Err(e) if transferring::agent_down(&e) && status.attempts >= 1 && pm.spec.mode == Mode::Migrate => {
            return transferring::replace_target(pm, status, ctx, &target, &e.to_string()).await;
        }
        Err(e) => return retry_after_stop(pm, status, ctx, format!("image build on {target} failed: {e}")).await,
    };
    // The credential the target's runtime will present, as a Secret the replacement lists.
    if let (Some(password), Some(registry)) = (
        &password,
        answer.images.first().and_then(|i| pull::registry_of(&i.image)),
    ) {
        let secret = pull::secret(pm, registry, password);
        let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &pm.namespace().unwrap_or_default());
        secrets
            .patch(
                secret.metadata.name.as_deref().unwrap_or_default(),
                &PatchParams::apply(api::FIELD_MANAGER).force(),
                &Patch::Apply(&secret),
            )
            .await?;
    }
    for image in answer.images {
        if let Some(c) = status.containers.iter_mut().find(|c| c.name == image.container) {
            c.image = Some(image.image);
        }
    }
    state::mark(status, crate::api::Step::ImageBuilt, Timestamp::now());
    if pm.spec.mode == Mode::Checkpoint {
        let message = format!(
            "checkpoint stored on {target}; restore it with: kubectl migrate restore {}",
            pm.name_any()
        );
        state::succeed(status, message.clone(), Timestamp::now());
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
