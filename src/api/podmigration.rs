//! The `PodMigration` custom resource (`migrate.io/v1alpha1`).
//!
//! The spec says what to migrate; the status is the whole state of the migration, so a
//! restarted controller resumes from the API server and never from memory.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, MicroTime, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// One migration of one pod from its node to another.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "migrate.io",
    version = "v1alpha1",
    kind = "PodMigration",
    plural = "podmigrations",
    shortname = "pmig",
    category = "kube-migrate",
    namespaced,
    status = "PodMigrationStatus",
    printcolumn = r#"{"name":"Pod","type":"string","jsonPath":".spec.podName"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Source","type":"string","jsonPath":".spec.sourceNode"}"#,
    printcolumn = r#"{"name":"Target","type":"string","jsonPath":".status.targetNode"}"#,
    printcolumn = r#"{"name":"Trigger","type":"string","jsonPath":".spec.trigger"}"#,
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mode","priority":1}"#,
    printcolumn = r#"{"name":"Downtime","type":"string","jsonPath":".status.downtimeSeconds","priority":1}"#,
    printcolumn = r#"{"name":"Message","type":"string","jsonPath":".status.message","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct PodMigrationSpec {
    /// Name of the pod to migrate (same namespace as the PodMigration).
    pub pod_name: String,
    /// UID of that pod: a migration belongs to one pod instance, never to a later pod that
    /// reuses the name.
    pub pod_uid: String,
    /// Node the pod runs on when the migration starts.
    pub source_node: String,
    /// Node to migrate to; chosen by the controller when empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_node: Option<String>,
    /// What started the migration.
    pub trigger: Trigger,
    /// What to do when things go wrong.
    #[serde(default)]
    pub policy: MigrationPolicy,
    /// `Migrate` (default) moves the pod; `Checkpoint` keeps a checkpoint of it as a backup
    /// while it keeps running; `Restore` starts a new pod from a `Checkpoint`.
    #[serde(default, skip_serializing_if = "Mode::is_migrate")]
    pub mode: Mode,
    /// For `Restore`: the name of the `Checkpoint` PodMigration (same namespace) to restore.
    /// `podName` is then the name of the pod to create.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_from: Option<String>,
}

/// What a PodMigration does.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Mode {
    #[default]
    Migrate,
    Checkpoint,
    Restore,
}

impl Mode {
    pub fn is_migrate(&self) -> bool {
        *self == Mode::Migrate
    }
}

/// What started a migration.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Trigger {
    /// An eviction (usually `kubectl drain`) intercepted by the webhook.
    Drain,
    /// A user (`kubectl migrate pod`).
    Manual,
}

/// Failure handling.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MigrationPolicy {
    /// When the migration fails before the source pod was stopped: `Evict` lets the waiting
    /// eviction through (state lost, as without kube-migrate), `Block` keeps refusing it. The
    /// pod's current `migrate.io/on-failure` annotation wins over this recorded value, so an
    /// operator can unblock a drain by re-annotating the pod.
    #[serde(default)]
    pub on_failure: OnFailure,
}

/// See [`MigrationPolicy::on_failure`].
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum OnFailure {
    #[default]
    Evict,
    Block,
}

/// Phases, in order. `Failed` can follow any non-terminal phase.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, JsonSchema)]
pub enum Phase {
    /// Accepted; waiting for a slot, a PodDisruptionBudget, or a target node.
    #[default]
    Pending,
    /// The source node's agent checkpoints every container; then the source pod is stopped.
    Checkpointing,
    /// Archives stream from the source agent to the target agent; digests are verified.
    Transferring,
    /// The target agent turns each archive into a checkpoint OCI image.
    BuildingImage,
    /// The replacement pod is released onto the target node and restores from the images.
    Restoring,
    /// The replacement pod is Ready on the target node.
    Succeeded,
    /// The migration stopped; see the message and conditions.
    Failed,
}

impl Phase {
    pub const ALL: [Phase; 7] = [
        Phase::Pending,
        Phase::Checkpointing,
        Phase::Transferring,
        Phase::BuildingImage,
        Phase::Restoring,
        Phase::Succeeded,
        Phase::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Checkpointing => "Checkpointing",
            Phase::Transferring => "Transferring",
            Phase::BuildingImage => "BuildingImage",
            Phase::Restoring => "Restoring",
            Phase::Succeeded => "Succeeded",
            Phase::Failed => "Failed",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Succeeded | Phase::Failed)
    }

    /// Phases that hold a concurrency slot (they load the nodes' disks and network).
    pub fn is_active(self) -> bool {
        matches!(
            self,
            Phase::Checkpointing | Phase::Transferring | Phase::BuildingImage | Phase::Restoring
        )
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Observed state of a migration.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodMigrationStatus {
    #[serde(default)]
    pub phase: Phase,
    /// Node chosen to receive the pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_node: Option<String>,
    /// Controller of the source pod (ReplicaSet, StatefulSet, ...); absent for a bare pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<OwnerInfo>,
    /// For a bare pod: the pod as it was (metadata and spec), to recreate it on the target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "preserve_unknown")]
    pub pod_template: Option<serde_json::Value>,
    /// One entry per container of the source pod.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub containers: Vec<ContainerCheckpoint>,
    /// The emptyDir volumes whose contents were packed with the checkpoint (while the source
    /// was frozen) and travel with the archives.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeCheckpoint>,
    /// UID of the replacement whose emptyDirs were filled from `volumes` (its restore init
    /// container then let the pod start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volumes_placed_in: Option<String>,
    /// When the controller asked for the source pod to stop (after the checkpoint).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_stop_requested_at: Option<Time>,
    /// When the checkpoint of every container was taken (the agent's answer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpointed_at: Option<Time>,
    /// Seconds from `checkpointedAt` to the last source container stopping: the window in
    /// which the source ran on after its checkpoint (what it did then is not in the
    /// checkpoint). Measured from the kubelet's `finishedAt`; goal 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_window_seconds: Option<f64>,
    /// When the source's containers were frozen, before their checkpoint. Set only when the
    /// freeze held through the checkpoint: the source has not executed since, is resumed
    /// (thawed) on any failure before its state is verified on the target, and killed after.
    /// In microseconds: the downtime is counted from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_frozen_at: Option<MicroTime>,
    /// When a frozen source was thawed because the migration failed or went back to `Pending`
    /// before its state was verified on the target: it carries on from where it was.
    /// `sourceFrozenAt` to this is how long the workload was paused for nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_thawed_at: Option<MicroTime>,
    /// Why the source could not be kept frozen (no freezer for its runtime, the runtime
    /// resumed it): it was then stopped right after its checkpoint, see `sourceWindowSeconds`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freeze_note: Option<String>,
    /// When the source pod was confirmed stopping.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_stopped_at: Option<Time>,
    /// The pod that restores the state on the target node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replacement: Option<PodRef>,
    /// Bytes moved from the source node to the target node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transferred_bytes: Option<u64>,
    /// How far the transfer is while it runs (refreshed about every second; cleared when it
    /// ends).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transfer: Option<TransferProgress>,
    /// Seconds from the source stop (its freeze, when frozen) to the replacement being Ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_seconds: Option<f64>,
    /// Start and end of each phase.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub phases: Vec<PhaseTiming>,
    /// When each step of the current attempt happened (in microseconds, as the controller saw
    /// it): where the time goes. Steps, in order: `queued` (first held back by the concurrency
    /// limit, while `Pending`), `frozen`, `checkpointed`, `verified`
    /// (every archive on the target), `sourceKilled`, `imageBuilt`, `sourceTerminated` (its
    /// kubelet reports every container ended), `replacementSeen`, `released` (gate lifted),
    /// `scheduled`, `started` (every container running), `ready`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub timeline: Vec<TimelineStep>,
    /// Agent id under which the archives to transfer are held, when it is not this
    /// PodMigration's UID (a restore moves the archives of the checkpoint it restores).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_id: Option<String>,
    /// The agents were told to drop this migration's archives that are no longer needed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub archives_released: bool,
    /// Targets given up on (their agent stopped answering or their Node was lost mid-migration); never chosen again
    /// for this migration.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub excluded_targets: Vec<String>,
    /// When the current phase must have ended; past it the migration rolls back (before the
    /// source stopped) or fails with the replacement starting fresh (after).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<Time>,
    /// The next retry of the current step is not before this: a retry's own status write
    /// wakes the controller at once, so the backoff must be kept in the status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<MicroTime>,
    /// Retries of the current phase.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub attempts: u32,
    /// Standard conditions: `Ready` (Succeeded), `SourceStopped`, `Queued`, `Degraded`, `Failed`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Human-readable summary of the latest step or failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Machine-readable failure reason (also the metric label).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

fn preserve_unknown(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true
    })
}

/// The controlling owner of the source pod.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OwnerInfo {
    pub api_version: String,
    pub kind: String,
    pub name: String,
    pub uid: String,
}

/// A pod by name and UID.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodRef {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
}

/// Checkpoint of one container and where its state went.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ContainerCheckpoint {
    pub name: String,
    /// Archive path on the source node (written by the kubelet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive: Option<String>,
    /// `sha256:<hex>` of the archive, checked by the target agent before use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
    /// Runtime ID of the source container (`cri-o://<hex>`), which the agent froze.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    /// Image the container had; the checkpoint image restores on top of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_image: Option<String>,
    /// Checkpoint image reference the replacement container runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

/// The contents of one emptyDir volume, moved with the checkpoint.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VolumeCheckpoint {
    pub name: String,
    /// `sha256:<hex>` of the packed contents, checked by the target agent before use.
    pub digest: String,
    pub size_bytes: u64,
}

/// The steps of `status.timeline`, in the order a migration goes through them (the strings
/// are what the status and the `step` label of `kube_migrate_step_seconds` carry).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    Queued,
    Frozen,
    Checkpointed,
    Verified,
    SourceKilled,
    ImageBuilt,
    SourceTerminated,
    ReplacementSeen,
    Released,
    Scheduled,
    VolumesPlaced,
    Started,
    Ready,
}

impl Step {
    pub const ALL: [Step; 13] = [
        Step::Queued,
        Step::Frozen,
        Step::Checkpointed,
        Step::Verified,
        Step::SourceKilled,
        Step::ImageBuilt,
        Step::SourceTerminated,
        Step::ReplacementSeen,
        Step::Released,
        Step::Scheduled,
        Step::VolumesPlaced,
        Step::Started,
        Step::Ready,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Step::Queued => "queued",
            Step::Frozen => "frozen",
            Step::Checkpointed => "checkpointed",
            Step::Verified => "verified",
            Step::SourceKilled => "sourceKilled",
            Step::ImageBuilt => "imageBuilt",
            Step::SourceTerminated => "sourceTerminated",
            Step::ReplacementSeen => "replacementSeen",
            Step::Released => "released",
            Step::Scheduled => "scheduled",
            Step::VolumesPlaced => "volumesPlaced",
            Step::Started => "started",
            Step::Ready => "ready",
        }
    }
}

/// One step of a migration's timeline.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TimelineStep {
    pub step: String,
    pub at: MicroTime,
}

/// A running transfer: bytes sent of the total, and for how long (rate and ETA follow).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TransferProgress {
    pub bytes: u64,
    pub total_bytes: u64,
    pub seconds: f64,
}

/// Timing of one phase.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PhaseTiming {
    pub phase: Phase,
    pub started_at: MicroTime,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<MicroTime>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds: Option<f64>,
}

impl PodMigration {
    pub fn phase(&self) -> Phase {
        self.status.as_ref().map(|s| s.phase).unwrap_or_default()
    }

    pub fn target_node(&self) -> Option<&str> {
        self.status
            .as_ref()
            .and_then(|s| s.target_node.as_deref())
            .or(self.spec.target_node.as_deref())
    }

    /// The source pod has been told to stop; from here on failures roll forward, not back.
    pub fn source_stop_requested(&self) -> bool {
        self.status
            .as_ref()
            .is_some_and(|s| s.source_stop_requested_at.is_some())
    }

    /// The state is on the target node (transfer verified), so the drain may move on.
    pub fn state_is_safe(&self) -> bool {
        matches!(self.phase(), Phase::BuildingImage | Phase::Restoring | Phase::Succeeded)
    }

    /// When the migration reached a terminal phase.
    pub fn finished_at(&self) -> Option<&MicroTime> {
        let status = self.status.as_ref()?;
        if !status.phase.is_terminal() {
            return None;
        }
        status.phases.last().map(|t| &t.started_at)
    }
}
