//! `Pending` of a `Restore`: start a new pod from a stored checkpoint (a `Checkpoint`
//! PodMigration), moving its archives first when it must run on another node.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::{Api, ResourceExt, runtime::controller::Action};

use super::{fail, pending, transition};
use crate::{
    api::{ContainerCheckpoint, Mode, Phase, PodMigration, PodMigrationStatus},
    controller::{
        context::{Context, Error},
        decide,
    },
};

pub async fn pending_restore(
    pm: &PodMigration,
    status: &mut PodMigrationStatus,
    ctx: &Context,
) -> Result<Action, Error> {
    let ns = pm.namespace().unwrap_or_default();
    let api: Api<PodMigration> = Api::namespaced(ctx.client.clone(), &ns);
    let from = pm.spec.restore_from.clone().unwrap_or_default();
    let checkpoint = api
        .get_opt(&from)
        .await?
        .filter(|c| c.spec.mode == Mode::Checkpoint && c.phase() == Phase::Succeeded);
    let Some(checkpoint) = checkpoint else {
        return Ok(fail(
            pm,
            status,
            ctx,
            "CheckpointNotFound",
            format!("no stored checkpoint named {from} in {ns}"),
        )
        .await);
    };
    let stored = checkpoint.status.clone().unwrap_or_default();
    if ctx.pod(&ns, &pm.spec.pod_name).is_some() {
        return Ok(fail(
            pm,
            status,
            ctx,
            "PodExists",
            format!(
                "pod {ns}/{} already exists; restore under another name",
                pm.spec.pod_name
            ),
        )
        .await);
    }
    let Some(mut template) = stored
        .pod_template
        .clone()
        .and_then(|t| serde_json::from_value::<Pod>(t).ok())
    else {
        return Ok(fail(
            pm,
            status,
            ctx,
            "CheckpointNotFound",
            format!("checkpoint {from} has no pod template"),
        )
        .await);
    };
    template.metadata.name = Some(pm.spec.pod_name.clone());
    // A copy must not be adopted by the ReplicaSet or StatefulSet of the original.
    if let Some(labels) = template.metadata.labels.as_mut() {
        for key in [
            "pod-template-hash",
            "controller-revision-hash",
            "statefulset.kubernetes.io/pod-name",
        ] {
            labels.remove(key);
        }
    }
    let held_on = stored
        .target_node
        .clone()
        .unwrap_or_else(|| checkpoint.spec.source_node.clone());
    let reserved = pending::reserved_by_others(ctx, pm);
    let volumes = pending::claimed_volumes(ctx, &pm.namespace().unwrap_or_default(), &template).await?;
    let target = match pending::target_or_reason(
        ctx,
        &template,
        "",
        pm.spec.target_node.as_deref(),
        &reserved,
        &status.excluded_targets,
        &volumes,
    ) {
        Ok(n) => n,
        Err(reason) => {
            let reason = pending::no_target_reason(status, reason);
            return Ok(fail(pm, status, ctx, "NoTarget", reason).await);
        }
    };
    // As before a migration's freeze: a node that cannot restore is known before anything
    // moves (the checkpoint's template names the images; their IDs were not kept).
    if let Some(later) = pending::vet_target(pm, status, ctx, &decide::base_images(&template), &target).await {
        return Ok(later);
    }
    status.pod_template = Some(serde_json::to_value(&template)?);
    status.source_id = checkpoint.uid();
    status.target_node = Some(target.clone());
    if target == held_on {
        // The image is already where it must run.
        status.containers = stored.containers.clone();
        transition(
            pm,
            status,
            ctx,
            Phase::Restoring,
            format!("restoring {} on {target} from {from}", pm.spec.pod_name),
        )
        .await;
    } else {
        status.containers = stored
            .containers
            .iter()
            .map(|c| ContainerCheckpoint {
                image: None,
                ..c.clone()
            })
            .collect();
        transition(
            pm,
            status,
            ctx,
            Phase::Transferring,
            format!("sending checkpoint {from} from {held_on} to {target}"),
        )
        .await;
    }
    Ok(Action::requeue(Duration::ZERO))
}
