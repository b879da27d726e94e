//! The agent's HTTP API (mTLS), shared by the agent server and its clients.
//!
//! * `POST   /v1/migrations/{id}/checkpoint`            checkpoint containers via the kubelet
//! * `POST   /v1/migrations/{id}/source/thaw`           resume frozen source containers (rollback)
//! * `POST   /v1/migrations/{id}/source/kill`           kill frozen source containers for good
//!   (any other action: 404)
//! * `POST   /v1/migrations/{id}/push`                  stream archives to the target agent
//! * `POST   /v1/migrations/{id}/prepare`               before the freeze: can the target restore
//!   the pod (runtime able to restore, base images present or pulled)?
//! * `POST   /v1/migrations/{id}/expect`                tell the target agent which archives (by
//!   digest) to accept from which node; it refuses every other upload
//! * `PUT    /v1/migrations/{id}/archives/{container}`  receive one archive (agent to agent)
//! * `GET    /v1/migrations/{id}/archives/{container}`  the verified archive held, if any
//!   (lets a resumed push skip what the target already verified)
//! * `PUT    /v1/migrations/{id}/volumes/{volume}`      receive one emptyDir's contents (agent
//!   to agent); `GET` the verified copy held, as for archives
//! * `POST   /v1/migrations/{id}/volumes`               put received emptyDir contents into the
//!   replacement pod's volumes, then release its restore init container
//! * `POST   /v1/migrations/{id}/image`                 build checkpoint images
//! * `DELETE /v1/migrations/{id}`                       forget everything about a migration
//!
//! `{id}` is the PodMigration UID.

use serde::{Deserialize, Serialize};

/// Header carrying the expected `sha256:<hex>` of an archive upload.
pub const DIGEST_HEADER: &str = "x-kube-migrate-digest";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointRequest {
    /// Name of the PodMigration (in `namespace`) that asks for this checkpoint: the agent reads
    /// it from the API server and checkpoints only what it describes.
    #[serde(default)]
    pub migration: String,
    pub namespace: String,
    pub pod: String,
    pub containers: Vec<String>,
    /// Passed to the kubelet as `?timeout=`.
    pub timeout_seconds: u64,
    /// Freeze the containers before their checkpoint and keep them frozen after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freeze: Option<FreezeSpec>,
    /// emptyDir volumes whose contents move with the pod, packed after the checkpoint while
    /// the containers are still frozen.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub empty_dirs: Vec<EmptyDirSpec>,
}

/// An emptyDir to pack, and a container of the pod through whose mount it is read.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct EmptyDirSpec {
    pub name: String,
    /// Runtime ID of a container that mounts it (whole, not a subPath).
    pub container_id: String,
    pub mount_path: String,
}

/// Which containers to freeze, and for how long at most: past `hold_seconds` the agent thaws
/// them by itself (a controller that vanished must not leave the workload frozen for ever).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct FreezeSpec {
    /// Container name → runtime container ID (`cri-o://<hex>`), from the pod's status.
    pub container_ids: std::collections::BTreeMap<String, String>,
    pub hold_seconds: u64,
}

/// Whether the source stayed frozen through its checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct FreezeOutcome {
    /// Frozen before the checkpoint and still frozen after it: the source has not executed
    /// since, and is resumable (thaw) or killable (kill).
    pub held: bool,
    /// When the last container was frozen (RFC 3339), if they were.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frozen_at: Option<String>,
    /// Why not held (no freezer for this runtime, the runtime resumed the container).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// The source containers to thaw or kill, by runtime ID.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SourceRequest {
    pub container_ids: Vec<String>,
}

/// The answer to a thaw or kill of source containers.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SourceResponse {
    pub containers: usize,
    /// Kill only: every task of every container was seen gone (their cgroups empty), so the
    /// pod object may go without waiting for the kubelet's report. False from older agents.
    #[serde(default)]
    pub gone: bool,
}

/// One checkpointed container.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ArchiveRecord {
    pub container: String,
    pub path: String,
    pub digest: String,
    pub size_bytes: u64,
    pub base_image: String,
    pub seconds: f64,
}

impl ArchiveRecord {
    /// How a push or an expectation names this archive.
    pub fn reference(&self) -> ArchiveRef {
        ArchiveRef {
            container: self.container.clone(),
            digest: self.digest.clone(),
            size_bytes: self.size_bytes,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CheckpointResponse {
    pub archives: Vec<ArchiveRecord>,
    /// One tar per emptyDir asked for (`container` holds the volume name).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<ArchiveRecord>,
    /// Present when a freeze was asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freeze: Option<FreezeOutcome>,
}

/// What a transferred file is: a container's checkpoint archive or an emptyDir's contents.
/// Both go the same way (digest-checked stream, fsync, record); they differ in where they are
/// kept and how they are validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Archive,
    Volume,
}

impl Kind {
    /// The URL segment (`/v1/migrations/{id}/<segment>/{name}`).
    pub fn segment(self) -> &'static str {
        match self {
            Kind::Archive => "archives",
            Kind::Volume => "volumes",
        }
    }
}

/// An archive by container (or, for a volume, volume name) and digest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ArchiveRef {
    pub container: String,
    pub digest: String,
    pub size_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PushRequest {
    /// Base URL of the target agent, e.g. `https://10.0.0.2:9443`.
    pub target: String,
    pub archives: Vec<ArchiveRef>,
    /// Migration id under which the target stores the archives (default: the same id). A
    /// restore moves a stored checkpoint's archives under the restore's own id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_id: Option<String>,
    /// emptyDir contents to send after the archives.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<ArchiveRef>,
    #[serde(default)]
    pub transfer: TransferOptions,
}

/// How archives travel between agents: optionally compressed and paced (slow links).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TransferOptions {
    /// zstd level (1 to [`MAX_ZSTD_LEVEL`]) on the wire; the target stores and verifies the
    /// archive as it was checkpointed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zstd_level: Option<i32>,
    /// At most this many bytes per second on the wire, per migration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_per_second: Option<u64>,
}

pub const MAX_ZSTD_LEVEL: i32 = 19;
/// `content-encoding` of a zstd-compressed upload.
pub const ZSTD_ENCODING: &str = "zstd";

/// `POST /v1/migrations/{id}/expect`: what the target agent may receive for migration `id`
/// and from which node's agent. Uploads of anything else are refused before a byte is kept.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ExpectRequest {
    /// The node whose agent pushes (the migration's source node).
    pub source_node: String,
    pub archives: Vec<ArchiveRef>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<ArchiveRef>,
    /// Once every expected archive is verified here, build the checkpoint images and have the
    /// runtime pull them at once, without waiting for the controller's image build (which then
    /// finds them built): the pull, the target's longest step, starts a controller round trip
    /// earlier. Off for a checkpoint kept for later, and for a controller that does not say.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub prepull: bool,
}

/// Name of the volume and init container kube-migrate adds to a replacement with emptyDir
/// volumes: the init container waits until [`RESTORED_MARKER`] appears in that volume, which
/// the target agent writes once every emptyDir holds what it held on the source.
pub const RESTORE_VOLUME: &str = "kube-migrate-restore";
/// The file the restore init container waits for (in [`RESTORE_VOLUME`]).
pub const RESTORED_MARKER: &str = "restored";

/// `POST /v1/migrations/{id}/volumes`: fill the replacement's emptyDirs, then release it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct VolumesRequest {
    /// UID of the replacement pod (a repeated call for the same pod only re-checks).
    pub pod_uid: String,
    /// Runtime ID of its restore init container (`cri-o://<hex>`): the volumes are reached
    /// through its mounts.
    pub container_id: String,
    /// The received contents to put in place; empty: start with empty volumes (a replacement
    /// released without a restore), only the marker is written.
    pub volumes: Vec<ArchiveRef>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct VolumesResponse {
    /// Volumes filled by this call (0 when they were already, for a repeated call).
    pub filled: usize,
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PushResponse {
    pub bytes: u64,
    pub seconds: f64,
    /// Bytes the target already held verified (same digest) and that were not sent again.
    #[serde(default)]
    pub already_held_bytes: u64,
    /// Bytes that went over the wire (less than `bytes` when compressed or already held).
    #[serde(default)]
    pub wire_bytes: u64,
}

/// How far a push in progress is (`GET /v1/migrations/{id}/push`), for the controller to
/// show in the PodMigration's status.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PushProgress {
    /// Bytes of the archives and emptyDirs read and sent so far (before compression; those
    /// the target already held count as sent).
    pub bytes: u64,
    pub total_bytes: u64,
    /// Since the push began.
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ReceiveResponse {
    pub digest: String,
    pub size_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ImageRequest {
    pub namespace: String,
    pub pod: String,
    pub archives: Vec<ArchiveRef>,
    /// `sha256:<hex>` of the password the runtime must present to pull these images (see
    /// [`pull_digest`]); the agent keeps only this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull_digest: Option<String>,
    /// Have the node's runtime pull the images at once (a replacement will start from them
    /// soon); not for a checkpoint kept for later, whose memory has no business in the
    /// runtime's storage until it is restored. Off for a controller that does not say.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub prepull: bool,
}

/// `POST /v1/migrations/{id}/prepare`: before the source is frozen, can this node restore the
/// pod? The agent checks its runtime can restore at all and has each container's base image,
/// pulling a missing one (CRI-O's restore looks it up by ID and never pulls it: without it the
/// restore would fail after the source is gone).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PrepareRequest {
    pub images: Vec<BaseImage>,
}

/// One container's image as the source's kubelet reported it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct BaseImage {
    pub container: String,
    /// `spec.containers[].image`.
    pub image: String,
    /// `status.containerStatuses[].imageID`: the runtime's reference of the image the
    /// container runs (a digest reference, or an image ID); "" when not reported.
    #[serde(default)]
    pub image_id: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PrepareResponse {
    /// The agent could ask its runtime (false: no runtime endpoint, nothing was checked).
    pub checked: bool,
    /// Base images this call pulled.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pulled: Vec<String>,
}

/// `reason` of the error an agent answers when its node cannot restore the pod.
pub const TARGET_UNFIT: &str = "target_unfit";

/// Username of every checkpoint image pull credential.
pub const PULL_USER: &str = "kube-migrate";

/// What the agent stores of a pull password.
pub fn pull_digest(password: &str) -> String {
    use sha2::Digest;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(password.as_bytes())))
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ImageRecord {
    pub container: String,
    /// Full reference the node's runtime pulls, e.g. `127.0.0.1:5443/kube-migrate/<id>:<ctr>`.
    pub image: String,
    pub manifest_digest: String,
    pub base_image: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageResponse {
    pub images: Vec<ImageRecord>,
}

/// Body of every error answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorBody {
    /// Short machine-readable reason (also a metric label).
    pub reason: String,
    pub message: String,
}

/// Migration ids are PodMigration UIDs; anything else is refused before it touches a path.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// An RFC 1123 label (container and namespace names): what may go into a kubelet URL.
pub fn valid_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// Container names are DNS labels.
pub fn valid_container(name: &str) -> bool {
    valid_label(name)
}

/// Pod names are RFC 1123 subdomains: labels joined by dots, 253 bytes at most.
pub fn valid_pod_name(name: &str) -> bool {
    name.len() <= 253 && name.split('.').all(valid_label)
}

/// Longest kubelet checkpoint timeout an agent accepts (the controller's default is 300 s).
pub const MAX_CHECKPOINT_TIMEOUT_SECONDS: u64 = 3600;
