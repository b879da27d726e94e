//! `Pending`: the pod can move (preflight), a concurrency slot is free, every
//! PodDisruptionBudget allows a disruption, and a target node is chosen — the slot and the
//! target's capacity are taken atomically.

use std::time::Duration;

use k8s_openapi::{
    api::{
        core::v1::{Node, PersistentVolume, PersistentVolumeClaim, Pod},
        policy::v1::PodDisruptionBudget,
    },
    jiff::Timestamp,
};
use kube::{Api, ResourceExt, api::ListParams, runtime::controller::Action};

use super::{fail, transition};
use crate::{
    agent::{
        api::{BaseImage, PrepareRequest, PrepareResponse, TARGET_UNFIT},
        client::ClientError,
    },
    api::{self, Mode, Phase, PodMigration, PodMigrationStatus},
    controller::{
        context::{Context, Error},
        decide::{self, Slot},
        placement::{self, Placement, PlacementInput},
        state::{self, CONDITION_QUEUED},
    },
    preflight,
};

pub async fn pending(pm: &PodMigration, status: &mut PodMigrationStatus, ctx: &Context) -> Result<Action, Error> {
    let ns = pm.namespace().unwrap_or_default();
    let now = Timestamp::now();
    let Some(pod) = ctx.source_pod(pm) else {
        return Ok(fail(
            pm,
            status,
            ctx,
            "PodGone",
            format!("pod {ns}/{} vanished before the checkpoint", pm.spec.pod_name),
        )
        .await);
    };
    if pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) != Some(pm.spec.source_node.as_str()) {
        return Ok(fail(
            pm,
            status,
            ctx,
            "PodMoved",
            format!("pod is no longer on node {}", pm.spec.source_node),
        )
        .await);
    }
    if ctx.agent(&pm.spec.source_node).is_none() {
        return Ok(fail(
            pm,
            status,
            ctx,
            "NoAgent",
            format!("no kube-migrate agent runs on node {}", pm.spec.source_node),
        )
        .await);
    }
    if pm.spec.mode == Mode::Checkpoint {
        return start_backup(pm, status, ctx, &pod).await;
    }
    let volumes = claimed_volumes(ctx, &ns, &pod).await?;
    if let Err(refusal) = preflight::check(&pod, &volumes) {
        return Ok(fail(pm, status, ctx, refusal.reason(), refusal.to_string()).await);
    }

    // A PodDisruptionBudget is the operator's availability contract, and a migration has
    // downtime between stop and restore: wait, as a plain drain would.
    let pdbs = Api::<PodDisruptionBudget>::namespaced(ctx.client.clone(), &ns)
        .list(&ListParams::default())
        .await?
        .items;
    if let Some(pdb) = decide::blocking_pdb(&pdbs, &pod) {
        let msg = format!(
            "waiting for PodDisruptionBudget {} (0 disruptions allowed); kube-migrate never overrides a PDB",
            pdb.name_any()
        );
        state::set_condition(status, CONDITION_QUEUED, true, "PodDisruptionBudget", &msg, now);
        status.message = Some(msg);
        return Ok(Action::requeue(Duration::from_secs(5)));
    }

    let requested = pm
        .spec
        .target_node
        .clone()
        .or_else(|| api::requested_target(&pod).map(str::to_string));
    let excluded = status.excluded_targets.clone();
    let admitted = ctx.admit(pm, |held| {
        let reserved = decide::reservations(held, &crate::controller::context::key(pm));
        target_or_reason(
            ctx,
            &pod,
            &pm.spec.source_node,
            requested.as_deref(),
            &reserved,
            &excluded,
            &volumes,
        )
    });
    let target = match admitted {
        Err(queued) => {
            if queued.reason == "ConcurrencyLimit" {
                state::mark(status, crate::api::Step::Queued, now);
            }
            state::set_condition(status, CONDITION_QUEUED, true, queued.reason, &queued.message, now);
            status.message = Some(queued.message);
            return Ok(Action::requeue(Duration::from_secs(2)));
        }
        Ok(Err(reason)) => {
            // Nodes refused by the check below: what the last one said, in the failure too.
            let reason = no_target_reason(status, reason);
            return Ok(fail(pm, status, ctx, "NoTarget", reason).await);
        }
        Ok(Ok(target)) => target,
    };
    if let Some(later) = vet_target(pm, status, ctx, &decide::base_images(&pod), &target).await {
        return Ok(later);
    }

    status.target_node = Some(target.clone());
    status.owner = decide::controller_owner(&pod);
    status.pod_template = Some(decide::pod_template(&pod)?);
    status.containers = decide::containers_of(&pod);
    state::set_condition(status, CONDITION_QUEUED, false, "Started", "", now);
    transition(
        pm,
        status,
        ctx,
        Phase::Checkpointing,
        format!("checkpointing {} for node {target}", pm.spec.pod_name),
    )
    .await;
    Ok(Action::requeue(Duration::ZERO))
}

/// Ask the chosen target whether it can restore (see [`ready_to_restore`]). `None`: it can, go
/// on. Else what the step returns: asked again later, or the node excluded for this migration
/// (with a `TargetUnfit` Event) and another chosen on the next pass, the slot released.
pub(super) async fn vet_target(
    pm: &PodMigration,
    status: &mut PodMigrationStatus,
    ctx: &Context,
    images: &[BaseImage],
    target: &str,
) -> Option<Action> {
    match give_up_after_tries(ready_to_restore(pm, ctx, images, target).await, status.attempts) {
        TargetCheck::Ready => None,
        TargetCheck::Later(why) => {
            ctx.release_slot(pm);
            status.attempts += 1;
            status.message = Some(format!(
                "node {target} could not be checked yet (attempt {}): {why}",
                status.attempts
            ));
            Some(Action::requeue(Duration::from_secs(2)))
        }
        TargetCheck::Unfit(why) => {
            status.attempts = 0;
            // Refused while the pod still runs: another node is chosen on the next pass.
            ctx.release_slot(pm);
            status.excluded_targets.push(target.to_string());
            let msg = format!("node {target} cannot restore the pod: {why}");
            ctx.warn(pm, "TargetUnfit", msg.clone()).await;
            status.message = Some(msg);
            Some(Action::requeue(Duration::ZERO))
        }
    }
}

/// `reason` why no node can take the pod, with what the last node refused by the check said.
pub(super) fn no_target_reason(status: &PodMigrationStatus, reason: String) -> String {
    match status.message.as_deref() {
        Some(last) if !status.excluded_targets.is_empty() => format!("{reason} ({last})"),
        _ => reason,
    }
}

/// How many times a target's agent is asked, 2 s apart, before its node is given up for this
/// migration (an agent restarting answers within that; its node is not chosen while not ready).
const CHECK_TRIES: u32 = 10;

/// What the target's agent said, before the freeze, about restoring the pod there.
#[derive(Debug, PartialEq, Eq)]
enum TargetCheck {
    Ready,
    /// Its agent could not be asked now (unreachable, restarting): ask again.
    Later(String),
    Unfit(String),
}

/// Ask the target's agent whether its node can restore `pod` (runtime settings, base images:
/// see `agent::prepare`). An agent older than the check (no such route) is taken as ready, as
/// before it existed.
async fn ready_to_restore(pm: &PodMigration, ctx: &Context, images: &[BaseImage], target: &str) -> TargetCheck {
    let (Some(base), Some(id)) = (ctx.agent(target), pm.uid()) else {
        return TargetCheck::Later(format!("no agent address for node {target}"));
    };
    let request = PrepareRequest {
        images: images.to_vec(),
    };
    let answer = ctx.agent_client.prepare(&base, &id, &request).await;
    if let Ok(answer) = &answer
        && !answer.pulled.is_empty()
    {
        let note = format!("pulled on {target} before the freeze: {}", answer.pulled.join(", "));
        ctx.normal(pm, "BaseImagePulled", note).await;
    }
    judge(answer)
}

/// An agent that stays unreachable while its node looks ready (a partition between the
/// controller and that node) would otherwise hold the drain until the Pending deadline.
fn give_up_after_tries(check: TargetCheck, attempts: u32) -> TargetCheck {
    match check {
        TargetCheck::Later(why) if attempts + 1 >= CHECK_TRIES => {
            TargetCheck::Unfit(format!("its agent did not answer the check {CHECK_TRIES} times: {why}"))
        }
        check => check,
    }
}

fn judge(answer: Result<PrepareResponse, ClientError>) -> TargetCheck {
    match answer {
        Ok(_) => TargetCheck::Ready,
        Err(ClientError::Status { reason, message, .. }) if reason == TARGET_UNFIT => TargetCheck::Unfit(message),
        Err(ClientError::Status { status, .. }) if status == http::StatusCode::NOT_FOUND => TargetCheck::Ready,
        Err(e) if e.retryable() => TargetCheck::Later(e.to_string()),
        Err(e) => TargetCheck::Unfit(format!("its agent refused the check: {e}")),
    }
}

/// A backup of a running pod: checkpoint it where it runs and keep the image there.
async fn start_backup(
    pm: &PodMigration,
    status: &mut PodMigrationStatus,
    ctx: &Context,
    pod: &Pod,
) -> Result<Action, Error> {
    status.target_node = Some(pm.spec.source_node.clone());
    status.owner = decide::controller_owner(pod);
    status.pod_template = Some(decide::pod_template(pod)?);
    status.containers = decide::containers_of(pod);
    transition(
        pm,
        status,
        ctx,
        Phase::Checkpointing,
        format!("checkpointing {} (it keeps running)", pm.spec.pod_name),
    )
    .await;
    Ok(Action::requeue(Duration::ZERO))
}

/// The PersistentVolumes bound to the pod's claims (unbound claims are left out).
pub async fn claimed_volumes(ctx: &Context, ns: &str, pod: &Pod) -> Result<Vec<PersistentVolume>, Error> {
    let claims: Vec<String> = pod
        .spec
        .iter()
        .flat_map(|s| s.volumes.iter().flatten())
        .filter_map(|v| v.persistent_volume_claim.as_ref().map(|c| c.claim_name.clone()))
        .collect();
    if claims.is_empty() {
        return Ok(Vec::new());
    }
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), ns);
    let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
    let mut out = Vec::new();
    for claim in claims {
        let Some(volume) = pvcs
            .get_opt(&claim)
            .await?
            .and_then(|c| c.spec.and_then(|s| s.volume_name))
        else {
            continue;
        };
        if let Some(pv) = pvs.get_opt(&volume).await? {
            out.push(pv);
        }
    }
    Ok(out)
}

/// The chosen node, or the message of a `NoTarget` failure naming every node's reason.
/// `reserved` are pods placed on their targets by in-flight migrations.
pub fn target_or_reason(
    ctx: &Context,
    pod: &Pod,
    source: &str,
    requested: Option<&str>,
    reserved: &[Pod],
    excluded: &[String],
    volumes: &[PersistentVolume],
) -> Result<String, String> {
    // A pod restored before still carries the pin to the node it was restored on: placed as
    // its owner made it, or its next migration could only go where it already is.
    let pod = &crate::replacement::without_restore(pod);
    let nodes = ctx.nodes.state();
    let node_refs: Vec<&Node> = nodes.iter().map(AsRef::as_ref).collect();
    let pods = ctx.pods.state();
    let mut bound: Vec<&Pod> = pods
        .iter()
        .map(AsRef::as_ref)
        .filter(|p| {
            let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
            !matches!(phase, Some("Succeeded" | "Failed"))
        })
        .collect();
    bound.extend(reserved.iter());
    let has_agent = |node: &str| ctx.agent(node).is_some();
    match placement::choose(&PlacementInput {
        pod,
        source_node: source,
        requested,
        nodes: &node_refs,
        pods: &bound,
        has_agent: &has_agent,
        excluded,
        volumes,
    }) {
        Placement::Node(n) => Ok(n),
        Placement::None(reasons) => Err(format!("no eligible target node: {}", Placement::explain(&reasons))),
    }
}

/// Capacity reserved by every other in-flight migration, from the cache and this leader's
/// admissions.
pub fn reserved_by_others(ctx: &Context, pm: &PodMigration) -> Vec<Pod> {
    let me = crate::controller::context::key(pm);
    let mut slots = ctx.slots.lock().expect("slots poisoned");
    let held: Vec<Slot> = ctx.held_slots(&mut slots);
    drop(slots);
    decide::reservations(&held, &me)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16, reason: &str) -> ClientError {
        ClientError::Status {
            url: "https://node-b:9443/v1/migrations/x/prepare".into(),
            status: http::StatusCode::from_u16(code).unwrap(),
            reason: reason.into(),
            message: "no image".into(),
        }
    }

    #[test]
    fn only_a_refusal_excludes_a_target() {
        assert_eq!(judge(Ok(PrepareResponse::default())), TargetCheck::Ready);
        assert_eq!(
            judge(Err(status(422, TARGET_UNFIT))),
            TargetCheck::Unfit("no image".into())
        );
        // An agent from before the check has no such route: as before it existed.
        assert_eq!(judge(Err(status(404, "not_found"))), TargetCheck::Ready);
        // Restarting or overloaded: ask again, the node is not given up.
        assert!(matches!(judge(Err(status(503, "api_server"))), TargetCheck::Later(_)));
        assert!(matches!(
            judge(Err(ClientError::Timeout {
                url: "u".into(),
                seconds: 1
            })),
            TargetCheck::Later(_)
        ));
        // Asked again, but not forever.
        let later = || TargetCheck::Later("connection refused".into());
        assert_eq!(give_up_after_tries(later(), CHECK_TRIES - 2), later());
        assert!(matches!(
            give_up_after_tries(later(), CHECK_TRIES - 1),
            TargetCheck::Unfit(why) if why.contains("did not answer the check 10 times: connection refused")
        ));
        assert_eq!(give_up_after_tries(TargetCheck::Ready, 99), TargetCheck::Ready);
        // Anything else it answers is not a yes.
        assert!(matches!(judge(Err(status(400, "bad_request"))), TargetCheck::Unfit(_)));
    }
}
