//! `Restoring`: find (or, for a bare pod, create) the replacement pod, bind it to this
//! migration, lift its gate once the images are ready, and wait for it to be Ready.

use std::{sync::Arc, time::Duration};

use k8s_openapi::{api::core::v1::Pod, jiff::Timestamp};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, Patch, PatchParams, PostParams},
    runtime::controller::Action,
};
use serde_json::json;

use super::{hold, retry_after_stop, transferring};
use crate::{
    api::{self, Mode, PodMigration, PodMigrationStatus, PodRef},
    controller::{
        context::{Context, Error},
        decide, state,
    },
    replacement,
};

pub async fn restoring(pm: &PodMigration, status: &mut PodMigrationStatus, ctx: &Context) -> Result<Action, Error> {
    let ns = pm.namespace().unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    // Never two live copies: the replacement is released only once the source has stopped
    // (its window recorded and its hold lifted). The source's pod watch wakes this step.
    if pm.spec.mode == Mode::Migrate && !hold::settle(ctx, pm, status).await? {
        status.message = Some("waiting for the source to stop before releasing the replacement".into());
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    if pm.spec.mode == Mode::Migrate {
        super::frozen::remove_dead_source(ctx, pm, status).await;
    }
    let bound = bound_to(pm, ctx);
    if let Some(target) = status.target_node.clone() {
        let node = ctx.nodes.get(&kube::runtime::reflector::ObjectRef::new(&target));
        let on_target: Vec<&Pod> = bound
            .iter()
            .map(AsRef::as_ref)
            .filter(|p| placed_on(p).as_deref() == Some(&target))
            .collect();
        if let Some(why) = decide::target_lost(node.as_deref(), &on_target) {
            return transferring::replace_target(pm, status, ctx, &target, &why).await;
        }
    }
    let Some(pod) = find_replacement(pm, status, ctx, &pods, bound).await? else {
        status.message = Some("waiting for the replacement pod".into());
        return Ok(Action::requeue(Duration::from_secs(1)));
    };
    status.replacement = Some(PodRef {
        name: pod.name_any(),
        uid: pod.uid(),
    });
    state::mark(status, crate::api::Step::ReplacementSeen, Timestamp::now());
    if replacement::is_gated(&pod) && !status.volumes.is_empty() && !replacement::has_restore_helper(&pod) {
        // Created without the restore init container (the webhook did not know its image, or
        // let the pod through): it could not wait for its volumes, and init containers cannot
        // be added now. Never released, it goes; the next one gets the init container.
        if ctx.helper_image.get().is_none() {
            return retry_after_stop(pm, status, ctx, NO_HELPER.into()).await;
        }
        tracing::info!(migration = %pm.name_any(), pod = %pod.name_any(), "replacement without the restore init container; deleting it");
        let _ = pods.delete(&pod.name_any(), &DeleteParams::default()).await;
        status.replacement = None;
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    if replacement::is_gated(&pod) {
        let mut desired = (*pod).clone();
        replacement::apply_restore(&mut desired, &with_status(pm, status));
        replacement::remove_gate(&mut desired);
        patch_pod(&pods, &pod, &desired).await?;
        state::mark(status, crate::api::Step::Released, Timestamp::now());
        ctx.normal(
            pm,
            "Released",
            format!(
                "released {} onto {}",
                pod.name_any(),
                status.target_node.as_deref().unwrap_or("?")
            ),
        )
        .await;
        return Ok(Action::requeue(Duration::from_secs(5)));
    }
    // This step is woken by the replacement's own events, which the controller's trigger watch
    // can deliver before the pod cache has them (two watches): a replacement that looks
    // bound but not Ready is read again from the API server rather than left for the next
    // requeue (measured: Ready seen 5 s late).
    let pod = match pod.spec.as_ref().and_then(|s| s.node_name.as_ref()) {
        Some(_) if !decide::is_ready(&pod) => match pods.get_opt(&pod.name_any()).await? {
            Some(fresh) if fresh.uid() == pod.uid() => Arc::new(fresh),
            _ => pod,
        },
        _ => pod,
    };
    if pod.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some() {
        state::mark(status, crate::api::Step::Scheduled, Timestamp::now());
    }
    if let Some(action) = place_volumes(pm, status, ctx, &pod).await? {
        return Ok(action);
    }
    if decide::all_running(&pod) {
        state::mark(status, crate::api::Step::Started, Timestamp::now());
    }
    if decide::is_ready(&pod) {
        let now = Timestamp::now();
        state::mark(status, crate::api::Step::Ready, now);
        // The workload stopped serving when it was frozen, if it was.
        let frozen = status.source_frozen_at.as_ref().map(|t| t.0);
        if let Some(stopped) = frozen.or(status.source_stopped_at.as_ref().map(|t| t.0)) {
            status.downtime_seconds = Some((decide::seconds_between(&stopped, &now) * 1000.0).round() / 1000.0);
        }
        let message = format!(
            "{} restored on {} (downtime {:.1}s)",
            pod.name_any(),
            status.target_node.as_deref().unwrap_or("?"),
            status.downtime_seconds.unwrap_or_default()
        );
        state::succeed(status, message.clone(), now);
        ctx.normal(pm, "Succeeded", message).await;
        return Ok(Action::requeue(Duration::ZERO));
    }
    if let Some(trouble) = decide::restore_trouble(&pod) {
        return retry_after_stop(pm, status, ctx, trouble).await;
    }
    status.message = Some(decide::restore_wait(&pod));
    // Pod changes wake this migration (see `decide::migrations_of_pod`); this is a safety net.
    Ok(Action::requeue(Duration::from_secs(5)))
}

const NO_HELPER: &str =
    "no image for the restore init container: the agent DaemonSet is not visible (or set --restore-helper-image)";

/// A replacement with the restore init container: once that runs, have the target agent put
/// the emptyDirs' contents in place and release it. None when there is nothing (more) to do.
async fn place_volumes(
    pm: &PodMigration,
    status: &mut PodMigrationStatus,
    ctx: &Context,
    pod: &Pod,
) -> Result<Option<Action>, Error> {
    let uid = pod.uid().unwrap_or_default();
    if !replacement::has_restore_helper(pod) || status.volumes_placed_in.as_deref() == Some(uid.as_str()) {
        return Ok(None);
    }
    if replacement::restore_helper_done(pod) {
        // Placed by a leader that did not live to record it.
        status.volumes_placed_in = Some(uid);
        return Ok(None);
    }
    let Some(container_id) = replacement::running_restore_helper(pod) else {
        status.message = Some(format!(
            "waiting for {}'s restore init container to start",
            pod.name_any()
        ));
        return Ok(Some(Action::requeue(Duration::from_secs(1))));
    };
    let target = status.target_node.clone().unwrap_or_default();
    let Some(agent) = ctx.agent(&target) else {
        return retry_after_stop(pm, status, ctx, format!("no agent on target node {target}"))
            .await
            .map(Some);
    };
    let id = pm.uid().ok_or(Error::Missing("uid"))?;
    let request = crate::agent::api::VolumesRequest {
        pod_uid: uid.clone(),
        container_id,
        volumes: decide::volume_refs(status),
    };
    match ctx.agent_client.place_volumes(&agent, &id, &request).await {
        Ok(answer) => {
            state::mark(status, crate::api::Step::VolumesPlaced, Timestamp::now());
            status.volumes_placed_in = Some(uid);
            status.message = Some(format!(
                "{} emptyDir volume(s) ({}) in place in {}; restoring its containers",
                answer.filled,
                decide::human_bytes(answer.bytes),
                pod.name_any()
            ));
            Ok(Some(Action::requeue(Duration::from_secs(1))))
        }
        Err(e) if e.retryable() => {
            status.message = Some(format!("putting the emptyDir contents in place, retrying: {e}"));
            Ok(Some(Action::requeue(Duration::from_secs(1))))
        }
        Err(e) => retry_after_stop(pm, status, ctx, format!("emptyDir contents not put in place: {e}"))
            .await
            .map(Some),
    }
}

fn with_status(pm: &PodMigration, status: &PodMigrationStatus) -> PodMigration {
    PodMigration {
        status: Some(status.clone()),
        ..pm.clone()
    }
}

/// The pod that restores this migration: one of `bound` (bound by annotation), or gated for
/// the owner and bound now, or (bare pod) created now.
async fn find_replacement(
    pm: &PodMigration,
    status: &PodMigrationStatus,
    ctx: &Context,
    pods: &Api<Pod>,
    mut bound: Vec<Arc<Pod>>,
) -> Result<Option<Arc<Pod>>, Error> {
    let ns = pm.namespace().unwrap_or_default();
    bound.sort_by_key(|p| p.metadata.creation_timestamp.clone());
    // Pinned to (or bound on) a target this migration gave up on: a gated pod's pin cannot be
    // lifted, so it goes; its owner (or this step, for a bare pod) makes a new one. Nothing was
    // restored there (see `decide::target_lost`).
    let target = status.target_node.as_deref();
    let (misplaced, bound): (Vec<_>, Vec<_>) = bound
        .into_iter()
        .partition(|p| placed_on(p).is_some_and(|n| Some(n.as_str()) != target));
    for pod in &misplaced {
        tracing::info!(migration = %pm.name_any(), pod = %pod.name_any(), "deleting a replacement pinned to a lost target");
        let _ = pods.delete(&pod.name_any(), &DeleteParams::default()).await;
    }
    if !misplaced.is_empty() {
        return Ok(None);
    }
    if let Some(first) = bound.first() {
        // Two replacements claimed one migration (webhook replicas raced): the later ones
        // never ran; deleting them lets their controller recreate them for another migration.
        for extra in bound.iter().skip(1).filter(|p| replacement::is_gated(p)) {
            let _ = pods.delete(&extra.name_any(), &DeleteParams::default()).await;
        }
        return Ok(Some(Arc::clone(first)));
    }
    match &status.owner {
        Some(owner) => {
            let mut gated: Vec<Arc<Pod>> = ctx
                .pods
                .state()
                .into_iter()
                .filter(|p| {
                    p.namespace().as_deref() == Some(&ns)
                        && p.annotations().get(api::RESTORE_OWNER) == Some(&owner.uid)
                        && api::restore_of(p).is_none()
                })
                .collect();
            gated.sort_by_key(|p| p.metadata.creation_timestamp.clone());
            let Some(pod) = gated.first() else {
                delete_slipped(pm, status, ctx, pods, &owner.uid).await?;
                return Ok(None);
            };
            let mut desired = (**pod).clone();
            replacement::apply_restore(&mut desired, &with_status(pm, status));
            patch_pod(pods, pod, &desired).await?;
            Ok(None) // seen bound on the next round, from the cache
        }
        None => {
            // A bare pod: recreate it under its name once the old one is gone.
            if ctx.source_pod(pm).is_some() {
                return Ok(None);
            }
            let template = status
                .pod_template
                .clone()
                .ok_or(Error::Missing("status.podTemplate"))?;
            let mut pod: Pod = serde_json::from_value(template)?;
            replacement::apply_restore(&mut pod, &with_status(pm, status));
            replacement::add_pull_secrets(&mut pod, [pm.name_any().as_str()]);
            if !replacement::empty_dirs(&pod).is_empty() {
                let Some(image) = ctx.helper_image.get() else {
                    return Err(Error::Missing("restore init container image (agent DaemonSet)"));
                };
                replacement::add_restore_helper(&mut pod, &image);
            }
            match pods
                .create(
                    &PostParams {
                        field_manager: Some(api::FIELD_MANAGER.into()),
                        ..Default::default()
                    },
                    &pod,
                )
                .await
            {
                Ok(created) => Ok(Some(Arc::new(created))),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(None),
                Err(e) => Err(e.into()),
            }
        }
    }
}

/// The owner's replacement was created while the pod webhook did not answer: it started from
/// scratch, ungated, instead of being restored. Delete it at once (it has run only since the
/// source stopped), so that the owner's next pod is gated and restored; said in an Event.
async fn delete_slipped(
    pm: &PodMigration,
    status: &PodMigrationStatus,
    ctx: &Context,
    pods: &Api<Pod>,
    owner_uid: &str,
) -> Result<(), Error> {
    let Some(stopped) = status.source_stop_requested_at.as_ref().map(|t| t.0) else {
        return Ok(());
    };
    let ns = pm.namespace().unwrap_or_default();
    let slipped = ctx.pods.state_filter(|p| {
        p.namespace().as_deref() == Some(&ns) && decide::slipped_through(p, owner_uid, &pm.spec.pod_uid, &stopped)
    });
    for pod in slipped {
        let note = format!(
            "{} was created without kube-migrate's restore gate (the pod webhook did not answer) and started from scratch; deleting it so that its owner re-creates it and the checkpoint is restored",
            pod.name_any()
        );
        tracing::warn!(migration = %pm.name_any(), pod = %pod.name_any(), "replacement slipped through ungated; deleting it");
        match pods.delete(&pod.name_any(), &DeleteParams::default()).await {
            Ok(_) => ctx.warn(pm, "ReplacementNotGated", note).await,
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// The node a replacement runs on, or is pinned to.
fn placed_on(pod: &Pod) -> Option<String> {
    pod.spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .or_else(|| replacement::pinned_to(pod))
}

/// Pods bound to this migration by annotation (never the source itself).
fn bound_to(pm: &PodMigration, ctx: &Context) -> Vec<Arc<Pod>> {
    let ns = pm.namespace().unwrap_or_default();
    let name = pm.name_any();
    ctx.pods.state_filter(|p| {
        p.namespace().as_deref() == Some(&ns)
            && api::restore_of(p) == Some(&name)
            && p.uid().as_deref() != Some(&pm.spec.pod_uid)
    })
}

/// JSON-patch `current` into `desired`, guarded by the resourceVersion we read.
async fn patch_pod(pods: &Api<Pod>, current: &Pod, desired: &Pod) -> Result<(), Error> {
    let diff = replacement::patch(current, desired)?;
    if diff.0.is_empty() {
        return Ok(());
    }
    let mut ops =
        vec![json!({ "op": "test", "path": "/metadata/resourceVersion", "value": current.resource_version() })];
    ops.extend(serde_json::to_value(&diff)?.as_array().cloned().unwrap_or_default());
    let patch: json_patch::Patch = serde_json::from_value(serde_json::Value::Array(ops))?;
    match pods
        .patch(&current.name_any(), &PatchParams::default(), &Patch::<()>::Json(patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 || e.code == 422 => Err(Error::Conflict(current.name_any())),
        Err(e) => Err(e.into()),
    }
}

/// Give up on the checkpoint: the workload must run again, without the state (which the
/// Failed status and a Warning Event say). Runs in `Failed`, so the pod webhook no longer
/// binds new pods to the migration. A replacement already on a node runs its original images
/// there; one that never got a node (gated, or unschedulable on the target) is deleted, so
/// that its owner re-creates it untouched wherever the scheduler finds room (a bare pod is
/// re-created from its template by the next call). Ok(true) once nothing is left to do.
pub async fn start_fresh(pm: &PodMigration, status: &PodMigrationStatus, ctx: &Context) -> Result<bool, Error> {
    let ns = pm.namespace().unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let name = pm.name_any();
    let candidates: Vec<Arc<Pod>> = bound_to(pm, ctx)
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect();
    let mut done = true;
    for pod in &candidates {
        let scheduled = pod.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some();
        // Still waiting in its restore init container, which nobody will release now: it
        // has not run the workload either, so it goes like an unscheduled one.
        let waiting = replacement::has_restore_helper(pod) && !replacement::restore_helper_done(pod);
        if !scheduled || waiting {
            tracing::info!(migration = %name, pod = %pod.name_any(), "deleting the unscheduled replacement; it starts fresh");
            match pods.delete(&pod.name_any(), &DeleteParams::default()).await {
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e.into()),
                Ok(_) => {}
            }
            done = false;
            continue;
        }
        let mut desired = (**pod).clone();
        fresh(&mut desired, status);
        if replacement::patch(pod, &desired)?.0.is_empty() {
            continue;
        }
        patch_pod(&pods, pod, &desired).await?;
        done = false;
    }
    if candidates.is_empty()
        && status.owner.is_none()
        && ctx.pod(&ns, &pm.spec.pod_name).is_none()
        && let Some(template) = status.pod_template.clone()
    {
        let mut pod: Pod = serde_json::from_value(template)?;
        fresh(&mut pod, status);
        match pods.create(&PostParams::default(), &pod).await {
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e.into()),
            Ok(_) => {}
        }
        done = false;
    }
    Ok(done)
}

/// The pod without the gate and with its containers' original images.
fn fresh(pod: &mut Pod, status: &PodMigrationStatus) {
    replacement::remove_gate(pod);
    if let Some(spec) = pod.spec.as_mut() {
        for c in &mut spec.containers {
            if let Some(image) = status
                .containers
                .iter()
                .find(|x| x.name == c.name)
                .and_then(|x| x.base_image.clone())
            {
                c.image = Some(image);
            }
        }
    }
}
