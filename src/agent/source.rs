//! The source side of a migration that freezes: the containers are frozen before the kubelet
//! checkpoints them and stay frozen after it (the node's runtime wrapper keeps CRI-O from
//! resuming them), so the source never executes after its checkpoint. Then exactly one of:
//! `kill` (the state is verified on the target) or `thaw` (rollback: the source carries on
//! from where it was, nothing lost).

use std::{sync::Arc, time::Duration, time::Instant};

use axum::{
    Json,
    extract::{Path, State},
};
use k8s_openapi::jiff::Timestamp;
use tracing::instrument;

use super::{
    api::{self, FreezeOutcome, FreezeSpec, SourceRequest, SourceResponse},
    freezer::{self, FreezeError},
    server::{AgentError, AgentState},
};

/// Longest hold an agent grants (the controller asks for its checkpoint + transfer deadlines).
pub const MAX_HOLD_SECONDS: u64 = 4 * 3600;

/// One container frozen for a checkpoint.
struct FrozenContainer {
    name: String,
    id: String,
    cgroup: std::path::PathBuf,
}

/// The containers frozen for one checkpoint, and when the last of them froze.
pub struct Frozen {
    containers: Vec<FrozenContainer>,
    at: Timestamp,
}

impl Frozen {
    fn ids(&self) -> impl Iterator<Item = &str> {
        self.containers.iter().map(|c| c.id.as_str())
    }
}

/// Freeze every container of `spec` for migration `id`. A container the freezer cannot find
/// (another runtime's layout, a test double without cgroups) is not an error: the migration
/// goes on unfrozen and says why. A freeze that fails half-way is undone.
pub async fn freeze(state: &AgentState, id: &str, spec: &FreezeSpec) -> Result<Frozen, String> {
    let freezer = state.freezer.clone();
    let id = id.to_string();
    let spec = spec.clone();
    let hold = Duration::from_secs(spec.hold_seconds.clamp(1, MAX_HOLD_SECONDS));
    tokio::task::spawn_blocking(move || {
        let mut frozen = Frozen {
            containers: Vec::new(),
            at: Timestamp::now(),
        };
        for (name, cid) in &spec.container_ids {
            match freezer.freeze(&id, cid, hold) {
                Ok(cgroup) => frozen.containers.push(FrozenContainer {
                    name: name.clone(),
                    id: cid.clone(),
                    cgroup,
                }),
                Err(e) => {
                    undo(&freezer, frozen.ids());
                    return Err(format!("container {name} not frozen: {e}"));
                }
            }
        }
        frozen.at = Timestamp::now();
        Ok(frozen)
    })
    .await
    .unwrap_or_else(|e| Err(format!("freeze task: {e}")))
}

/// After the checkpoint: did every container stay frozen? If not (a runtime without the hold
/// wrapper resumed it), thaw them all: the source runs on until its stop, and the outcome says
/// so.
pub async fn after_checkpoint(state: &AgentState, frozen: Frozen) -> FreezeOutcome {
    let freezer = state.freezer.clone();
    tokio::task::spawn_blocking(move || {
        let resumed: Vec<&str> = frozen
            .containers
            .iter()
            .filter(|c| !freezer::is_frozen(&c.cgroup).unwrap_or(false))
            .map(|c| c.name.as_str())
            .collect();
        if resumed.is_empty() {
            return FreezeOutcome {
                held: true,
                frozen_at: Some(frozen.at.to_string()),
                note: None,
            };
        }
        let note = format!(
            "the runtime resumed {resumed:?} after the checkpoint: install the runtime hold (docs/install-cri-o.md, section 5)"
        );
        undo(&freezer, frozen.ids());
        FreezeOutcome {
            held: false,
            frozen_at: Some(frozen.at.to_string()),
            note: Some(note),
        }
    })
    .await
    .unwrap_or_else(|e| FreezeOutcome {
        held: false,
        frozen_at: None,
        note: Some(format!("freeze check: {e}")),
    })
}

/// Thaw after a failed checkpoint (the caller rolls back).
pub async fn undo_freeze(state: &AgentState, frozen: Frozen) {
    let freezer = state.freezer.clone();
    let _ = tokio::task::spawn_blocking(move || undo(&freezer, frozen.ids())).await;
}

fn undo<'a>(freezer: &freezer::Freezer, ids: impl Iterator<Item = &'a str>) {
    for cid in ids {
        if let Err(e) = freezer.thaw(cid) {
            tracing::error!(container = %cid, error = %e, "thawing the source failed");
        }
    }
}

/// How long a kill waits to see the killed tasks gone before answering without that word.
const KILL_WAIT: Duration = Duration::from_secs(2);

#[derive(Clone, Copy, Debug)]
enum Action {
    Thaw,
    Kill,
}

async fn apply(
    state: &AgentState,
    id: &str,
    req: &SourceRequest,
    action: Action,
) -> Result<Json<SourceResponse>, AgentError> {
    if !api::valid_id(id) {
        return Err(AgentError::BadRequest(format!("invalid migration id {id:?}")));
    }
    for cid in &req.container_ids {
        freezer::bare_id(cid).map_err(|e| AgentError::BadRequest(e.to_string()))?;
        // Only what this migration froze: a caller cannot thaw or kill other containers.
        if let Some(hold) = state.freezer.hold(cid).map_err(freeze_error)?
            && hold.migration != id
        {
            return Err(AgentError::Forbidden(format!(
                "container {cid} is held by migration {}, not {id}",
                hold.migration
            )));
        }
    }
    let freezer = state.freezer.clone();
    let ids = req.container_ids.clone();
    let gone = tokio::task::spawn_blocking(move || -> Result<bool, FreezeError> {
        for cid in &ids {
            match action {
                Action::Thaw => freezer.thaw(cid)?,
                Action::Kill => freezer.kill_held(cid)?,
            }
        }
        Ok(matches!(action, Action::Kill) && ids.iter().all(|cid| freezer.gone(cid, KILL_WAIT)))
    })
    .await
    .map_err(|e| AgentError::Io(std::io::Error::other(e)))?
    .map_err(freeze_error)?;
    tracing::info!(?action, containers = ?req.container_ids, gone, "source containers");
    Ok(Json(SourceResponse {
        containers: req.container_ids.len(),
        gone,
    }))
}

fn freeze_error(e: FreezeError) -> AgentError {
    AgentError::Freeze(e)
}

/// `POST /v1/migrations/{id}/source/{action}`: `thaw` (rollback) or `kill` (the state is
/// verified elsewhere) the containers this migration froze.
#[instrument(skip_all, fields(id = %id, action = %action))]
pub async fn source(
    State(state): State<Arc<AgentState>>,
    Path((id, action)): Path<(String, String)>,
    Json(req): Json<SourceRequest>,
) -> Result<Json<SourceResponse>, AgentError> {
    let (action, operation) = match action.as_str() {
        "thaw" => (Action::Thaw, "thaw"),
        "kill" => (Action::Kill, "kill"),
        other => return Err(AgentError::NotFound(format!("no source action {other:?}"))),
    };
    let started = Instant::now();
    let result = apply(&state, &id, &req, action).await;
    state.record_op(operation, started, &result);
    result
}

/// Thaw holds that outlived their migration's deadlines, every `every`.
pub fn spawn_expiry(state: Arc<AgentState>, every: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            let freezer = state.freezer.clone();
            if let Ok(thawed) = tokio::task::spawn_blocking(move || freezer.thaw_expired()).await
                && !thawed.is_empty()
            {
                tracing::warn!(containers = ?thawed, "holds expired: source containers thawed");
            }
        }
    })
}
