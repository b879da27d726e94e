//! The frozen source: frozen before its checkpoint, it stays frozen while its archives travel,
//! then is killed once they are verified on the target, or thawed on any failure before that
//! (the workload carries on from where it was: nothing is lost).

use k8s_openapi::{api::core::v1::Pod, jiff::Timestamp};
use kube::ResourceExt;

use crate::{
    agent::api::{FreezeSpec, SourceRequest},
    api::{PodMigration, PodMigrationStatus},
    controller::context::Context,
};

/// What the agent is asked to freeze: every container of the source pod by runtime ID, held
/// at most for the checkpoint and transfer deadlines (then the agent thaws by itself).
/// None when freezing is off or a container has no runtime ID yet.
pub fn spec(ctx: &Context, pod: &Pod, status: &mut PodMigrationStatus) -> Option<FreezeSpec> {
    if !ctx.config.freeze_source {
        return None;
    }
    let statuses = pod.status.as_ref()?.container_statuses.as_ref()?;
    let mut ids = std::collections::BTreeMap::new();
    for c in &mut status.containers {
        let id = statuses
            .iter()
            .find(|s| s.name == c.name)
            .and_then(|s| s.container_id.clone())?;
        c.container_id = Some(id.clone());
        ids.insert(c.name.clone(), id);
    }
    let hold = ctx.config.checkpoint_timeout + ctx.config.deadlines.transferring + std::time::Duration::from_secs(60);
    Some(FreezeSpec {
        container_ids: ids,
        hold_seconds: hold.as_secs(),
    })
}

/// The source was frozen before its checkpoint and has not been thawed since.
pub fn is_frozen(status: &PodMigrationStatus) -> bool {
    status.source_frozen_at.is_some() && status.source_thawed_at.is_none()
}

/// The source is frozen and nothing asked it to stop: it can still be resumed.
pub fn resumable(status: &PodMigrationStatus) -> bool {
    is_frozen(status) && status.source_stop_requested_at.is_none()
}

fn request(status: &PodMigrationStatus) -> SourceRequest {
    SourceRequest {
        container_ids: status
            .containers
            .iter()
            .filter_map(|c| c.container_id.clone())
            .collect(),
    }
}

/// Thaw the source (rollback). Also after a freeze whose answer never came (the agent may
/// have frozen): thawing what is not frozen is a no-op. Returns a note for the failure
/// message when the agent could not be told (it thaws by itself when the hold expires).
pub async fn resume(ctx: &Context, pm: &PodMigration, status: &mut PodMigrationStatus) -> Option<String> {
    if status.source_stop_requested_at.is_some() {
        return None;
    }
    let req = request(status);
    if req.container_ids.is_empty() {
        return None;
    }
    let id = pm.uid()?;
    let outcome = match ctx.agent(&pm.spec.source_node) {
        None => Err(format!("no agent on {}", pm.spec.source_node)),
        Some(agent) => ctx
            .agent_client
            .source(&agent, &id, "thaw", &req)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
    };
    let was_frozen = is_frozen(status);
    match outcome {
        Ok(()) => {
            if was_frozen {
                status.source_thawed_at = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
                    Timestamp::now(),
                ));
                tracing::info!(migration = %pm.name_any(), "source thawed: it carries on from its frozen state");
            }
            None
        }
        Err(e) => {
            tracing::error!(migration = %pm.name_any(), error = %e, "could not thaw the source");
            Some(format!(
                "; thawing the source failed ({e}): its agent thaws it when the hold expires"
            ))
        }
    }
}

/// Delete the frozen source pod (UID precondition, the usual short grace period). Not an
/// Eviction: its disruption was admitted by the PodDisruptionBudget check before the freeze and
/// it has not served since, and the controller must be able to finish while its own eviction
/// webhook is degraded (an Eviction goes through it).
pub async fn delete_source(ctx: &Context, pm: &PodMigration) -> Result<(), kube::Error> {
    delete_source_within(ctx, pm, u32::try_from(ctx.config.source_grace_period_seconds).ok()).await
}

/// Remove the source pod object at once (grace period 0), once its agent saw every task of it
/// gone after the kill: nothing of it can run any more, and a replacement that must take its
/// name (bare pod, StatefulSet) need not wait for the kubelet to notice, stop what is already
/// dead and confirm (0.9 s on real nodes). The kubelet cleans up the sandbox afterwards.
async fn remove_source(ctx: &Context, pm: &PodMigration) -> Result<(), kube::Error> {
    delete_source_within(ctx, pm, Some(0)).await
}

/// [`remove_source`] once its containers are known dead: `sourceTerminated` is recorded only
/// when its agent saw every killed task gone, or the kubelet reported every container stopped.
/// Best effort: the graceful deletion under way ends it anyway, only later.
pub async fn remove_dead_source(ctx: &Context, pm: &PodMigration, status: &PodMigrationStatus) {
    let dead = status
        .timeline
        .iter()
        .any(|t| t.step == crate::api::Step::SourceTerminated.as_str());
    if !dead || ctx.source_pod(pm).is_none() {
        return;
    }
    if let Err(e) = remove_source(ctx, pm).await {
        tracing::warn!(migration = %pm.name_any(), error = %e, "could not remove the stopped source at once");
    }
}

async fn delete_source_within(ctx: &Context, pm: &PodMigration, grace: Option<u32>) -> Result<(), kube::Error> {
    let api: kube::Api<Pod> = kube::Api::namespaced(ctx.client.clone(), &pm.namespace().unwrap_or_default());
    let params = kube::api::DeleteParams {
        grace_period_seconds: grace,
        preconditions: Some(kube::api::Preconditions {
            uid: Some(pm.spec.pod_uid.clone()),
            resource_version: None,
        }),
        ..Default::default()
    };
    match api.delete(&pm.spec.pod_name, &params).await {
        Ok(_) => Ok(()),
        // Gone already, or another pod holds the name now: the source is stopped.
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(()),
        Err(e) => Err(e),
    }
}

/// Kill the frozen source for good, after its state was verified on the target. The pod is
/// evicted first (else the kubelet restarts the killed container); the agent then kills the
/// frozen tasks and thaws the cgroup so the signal lands (a plain stop of a frozen container
/// hangs until it is thawed). Ok(true) when the agent saw every task gone.
pub async fn kill(ctx: &Context, pm: &PodMigration, status: &PodMigrationStatus) -> Result<bool, String> {
    let id = pm.uid().unwrap_or_default();
    let agent = ctx
        .agent(&pm.spec.source_node)
        .ok_or_else(|| format!("no agent on source node {}", pm.spec.source_node))?;
    let answer = ctx
        .agent_client
        .source(&agent, &id, "kill", &request(status))
        .await
        .map_err(|e| format!("killing the frozen source failed: {e}"))?;
    tracing::info!(migration = %pm.name_any(), at = %Timestamp::now(), gone = answer.gone, "frozen source killed");
    Ok(answer.gone)
}
