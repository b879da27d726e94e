//! The reconciler: runs the kube-rs `Controller` over PodMigrations and hands each one to
//! its phase's step ([`super::phase`]), under the cleanup finalizer.

use std::{sync::Arc, time::Duration};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client, ResourceExt,
    runtime::{
        Controller,
        controller::Action,
        finalizer::{self, finalizer},
        reflector::Store,
        watcher,
    },
};
use tokio_util::sync::CancellationToken;
use tracing::instrument;

use super::{
    context::{Context, Error},
    decide, phase,
};
use crate::api::{self, PodMigration};

/// Queued migrations woken by one that ended: the slot it freed, and one more in case that
/// one is held back by something else (a PodDisruptionBudget, no target yet).
const WAKE_PER_END: usize = 2;

/// Run the controller until `shutdown`. In-flight reconciles are dropped at once, not drained:
/// `shutdown` fires when this replica lost (or is about to lose) the leader Lease, and a
/// replica that is no longer the leader must stop acting before another one starts.
pub async fn run(
    client: Client,
    shared: impl FnOnce(Store<PodMigration>) -> Arc<Context>,
    shutdown: CancellationToken,
) {
    let api = Api::<PodMigration>::all(client.clone());
    let controller = Controller::new(api.clone(), watcher::Config::default().any_semantic());
    let store = controller.store();
    // Pod changes (source stopped, replacement scheduled, Ready) wake their migration at once
    // instead of waiting for the next poll; a migration that ended wakes the oldest ones
    // queued for its slot (a drain of many pods turns its slots over without polls).
    let controller = controller
        .watches(
            Api::<Pod>::all(client),
            watcher::Config::default().any_semantic(),
            |pod| decide::migrations_of_pod(&pod),
        )
        .watches(api, watcher::Config::default().any_semantic(), {
            let store = store.clone();
            move |ended| decide::queued_to_wake(&ended, &store.state(), WAKE_PER_END)
        });
    let ctx = shared(store);
    // Series the dashboard needs before their first event (nodes join over time).
    let series = {
        let ctx = Arc::clone(&ctx);
        async move {
            let _ = ctx.nodes.wait_until_ready().await;
            loop {
                ctx.initialise_series();
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
        }
    };
    let work = controller
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!(%error, "reconcile failed");
            }
        });
    tokio::select! {
        _ = work => {}
        _ = series => {}
        _ = shutdown.cancelled() => tracing::info!("controller stopped; in-flight steps abandoned"),
    }
}

fn error_policy(pm: Arc<PodMigration>, error: &Error, ctx: Arc<Context>) -> Action {
    if error.is_conflict() {
        // Our cache was behind our own write: the watch event is on its way.
        tracing::debug!(name = %pm.name_any(), %error, "conflict; retrying with a fresh object");
        return Action::requeue(Duration::from_millis(200));
    }
    tracing::warn!(name = %pm.name_any(), %error, reason = error.metric_label(), "reconcile error");
    ctx.metrics
        .agent_operations
        .get_or_create(&crate::metrics::OperationLabels {
            operation: "reconcile",
            result: error.metric_label(),
        })
        .inc();
    Action::requeue(Duration::from_secs(5))
}

#[instrument(skip_all, fields(migration = %pm.name_any(), namespace = pm.namespace().unwrap_or_default(), phase = %pm.phase()))]
async fn reconcile(pm: Arc<PodMigration>, ctx: Arc<Context>) -> Result<Action, Error> {
    // Decisions read the caches (slots, placement): never act on a half-listed cluster.
    let _ = tokio::join!(
        ctx.migrations.wait_until_ready(),
        ctx.pods.wait_until_ready(),
        ctx.nodes.wait_until_ready()
    );
    let ns = pm.namespace().ok_or(Error::Missing("namespace"))?;
    let api: Api<PodMigration> = Api::namespaced(ctx.client.clone(), &ns);
    ctx.update_in_flight();
    finalizer(&api, api::FINALIZER, pm, |event| async {
        match event {
            finalizer::Event::Apply(pm) => phase::apply(&pm, &ctx).await,
            finalizer::Event::Cleanup(pm) => phase::cleanup(&pm, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}
