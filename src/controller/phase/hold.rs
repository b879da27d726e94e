//! The source hold: a finalizer on the source pod from just before it is stopped until its
//! state is verified on the target (or the migration rolls back or ends). `kubectl drain`
//! waits until the pod object is gone, so the drain cannot finish while the only copy of the
//! state is still on the drained node.

use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, ResourceExt,
    api::{Patch, PatchParams},
};
use serde_json::json;

use crate::{
    api::{self, PodMigration, PodMigrationStatus},
    controller::{
        context::{Context, Error},
        decide, state,
    },
};

fn pods(ctx: &Context, pm: &PodMigration) -> Api<Pod> {
    Api::namespaced(ctx.client.clone(), &pm.namespace().unwrap_or_default())
}

/// Put the hold on the source pod (the instance of this migration only: UID-checked).
/// Idempotent. Ok(false) when the source pod no longer exists.
pub async fn add(ctx: &Context, pm: &PodMigration) -> Result<bool, Error> {
    let api = pods(ctx, pm);
    let Some(pod) = api.get_opt(&pm.spec.pod_name).await? else {
        return Ok(false);
    };
    if pod.uid().as_deref() != Some(pm.spec.pod_uid.as_str()) {
        return Ok(false);
    }
    if pod.finalizers().iter().any(|f| f == api::SOURCE_HOLD) {
        return Ok(true);
    }
    if pod.metadata.deletion_timestamp.is_some() {
        // A terminating object accepts no new finalizer: it is stopping anyway.
        return Ok(true);
    }
    let patch = if pod.metadata.finalizers.is_none() {
        json!([
            { "op": "test", "path": "/metadata/uid", "value": pm.spec.pod_uid },
            { "op": "add", "path": "/metadata/finalizers", "value": [api::SOURCE_HOLD] },
        ])
    } else {
        json!([
            { "op": "test", "path": "/metadata/uid", "value": pm.spec.pod_uid },
            { "op": "add", "path": "/metadata/finalizers/-", "value": api::SOURCE_HOLD },
        ])
    };
    let patch: json_patch::Patch = serde_json::from_value(patch)?;
    api.patch(&pm.spec.pod_name, &PatchParams::default(), &Patch::<()>::Json(patch))
        .await?;
    Ok(true)
}

/// Once the archives are verified on the target: when every source container has stopped,
/// record how long the source ran on after its checkpoint, then lift the hold. Ok(true) once
/// nothing holds the source any more. Reads the cache, so calling it every step is cheap.
pub async fn settle(ctx: &Context, pm: &PodMigration, status: &mut PodMigrationStatus) -> Result<bool, Error> {
    let Some(pod) = ctx.source_pod(pm) else {
        return Ok(true);
    };
    let Some(stopped) = decide::all_stopped_at(&pod) else {
        return Ok(false);
    };
    state::mark(
        status,
        crate::api::Step::SourceTerminated,
        k8s_openapi::jiff::Timestamp::now(),
    );
    if status.source_window_seconds.is_none() && super::frozen::is_frozen(status) {
        // Frozen before the checkpoint, killed while frozen: it never ran after it.
        status.source_window_seconds = Some(0.0);
    } else if status.source_window_seconds.is_none()
        && let Some(checkpointed) = &status.checkpointed_at
    {
        let window = decide::seconds_between(&checkpointed.0, &stopped).max(0.0);
        status.source_window_seconds = Some((window * 1000.0).round() / 1000.0);
    }
    // Release only once the window is in the API server: releasing lets the pod object go, and
    // a status write that then failed (conflict) could never measure it again.
    let persisted = pm
        .status
        .as_ref()
        .is_some_and(|s| s.source_window_seconds.is_some() || s.checkpointed_at.is_none());
    if !persisted {
        return Ok(false);
    }
    if pod.finalizers().iter().any(|f| f == api::SOURCE_HOLD) {
        release(ctx, pm).await?;
    }
    Ok(true)
}

/// Lift the hold, if it is there. Guarded by the index and the resourceVersion we read, so a
/// concurrent change to the finalizers makes it retry instead of removing the wrong entry.
pub async fn release(ctx: &Context, pm: &PodMigration) -> Result<(), Error> {
    let api = pods(ctx, pm);
    let Some(pod) = api.get_opt(&pm.spec.pod_name).await? else {
        return Ok(());
    };
    if pod.uid().as_deref() != Some(pm.spec.pod_uid.as_str()) {
        return Ok(());
    }
    let Some(index) = pod.finalizers().iter().position(|f| f == api::SOURCE_HOLD) else {
        return Ok(());
    };
    let patch: json_patch::Patch = serde_json::from_value(json!([
        { "op": "test", "path": "/metadata/resourceVersion", "value": pod.resource_version() },
        { "op": "test", "path": format!("/metadata/finalizers/{index}"), "value": api::SOURCE_HOLD },
        { "op": "remove", "path": format!("/metadata/finalizers/{index}") },
    ]))?;
    match api
        .patch(&pm.spec.pod_name, &PatchParams::default(), &Patch::<()>::Json(patch))
        .await
    {
        Ok(_) => {
            tracing::info!(migration = %pm.name_any(), pod = %pm.spec.pod_name, "source hold released");
            Ok(())
        }
        // The pod went away meanwhile.
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 || e.code == 422 => Err(Error::Conflict(pm.spec.pod_name.clone())),
        Err(e) => Err(e.into()),
    }
}
