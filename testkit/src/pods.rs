//! Running the pods bound to this node: watch them (`spec.nodeName=<node>`), start their
//! simulated containers (fresh, or restored from a checkpoint image), report their status
//! through `pods/status`, and stop and delete them when they are deleted.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Arc, RwLock},
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::{api::core::v1::Pod, jiff::Timestamp};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, Patch, PatchParams, Preconditions},
    runtime::{WatchStreamExt, watcher},
};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::{sync::watch, time::Instant};
use tokio_util::sync::CancellationToken;

use crate::{
    checkpoint::rfc3339,
    container::{
        Container, ContainerError, ContainerSpec, Memory, Mount, Origin, STATE_BYTES_ENV, STATE_SEED_ENV, default_seed,
        parse_state_bytes, parse_state_seed,
    },
    crun::{Crun, CrunError, RunSpec},
    restore::{ImageRef, Puller, REASON_CREATE, RestoreError},
};

/// The address every pod and the node have.
pub const POD_IP: &str = "127.0.0.1";
/// Upper bound of the wait before stopping the containers of a deleted pod.
pub const MAX_STOP_DELAY: Duration = Duration::from_secs(1);
/// Upper bound of the wait for stopped containers to be gone.
const MAX_STOP_WAIT: Duration = Duration::from_secs(15);
const BACKOFF_START: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error(transparent)]
    Restore(#[from] RestoreError),
    #[error(transparent)]
    Container(#[from] ContainerError),
    #[error("container task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error(transparent)]
    Crun(#[from] CrunError),
}

impl PodError {
    /// The waiting reason a kubelet would report.
    pub fn reason(&self) -> &'static str {
        match self {
            PodError::Restore(e) => e.reason(),
            PodError::Container(ContainerError::StateBytes { .. } | ContainerError::StateSeed { .. }) => {
                "CreateContainerConfigError"
            }
            PodError::Container(ContainerError::Allocation { .. }) | PodError::Join(_) => REASON_CREATE,
            PodError::Crun(e) => e.reason(),
        }
    }
}

/// (pod UID, containers by name)
type PodContainers = (String, BTreeMap<String, Arc<Container>>);

/// The containers of the pods of this node, for the HTTP server.
#[derive(Clone, Default)]
pub struct Runtime {
    pods: Arc<RwLock<HashMap<(String, String), PodContainers>>>,
}

impl Runtime {
    /// The container `name` of pod `namespace/pod`, running or stopped.
    pub fn container(&self, namespace: &str, pod: &str, name: &str) -> Option<Arc<Container>> {
        let pods = self.pods.read().expect("runtime lock");
        pods.get(&(namespace.to_string(), pod.to_string()))
            .and_then(|(_, containers)| containers.get(name).cloned())
    }

    fn insert(&self, uid: &str, container: Arc<Container>) {
        let mut pods = self.pods.write().expect("runtime lock");
        let key = (container.spec.namespace.clone(), container.spec.pod.clone());
        let entry = pods.entry(key).or_insert_with(|| (uid.to_string(), BTreeMap::new()));
        if entry.0 != uid {
            // A new pod of the same name replaced the old one.
            *entry = (uid.to_string(), BTreeMap::new());
        }
        entry.1.insert(container.spec.name.clone(), container);
    }

    fn remove(&self, namespace: &str, pod: &str, uid: &str) {
        let mut pods = self.pods.write().expect("runtime lock");
        let key = (namespace.to_string(), pod.to_string());
        if pods.get(&key).is_some_and(|(u, _)| u == uid) {
            pods.remove(&key);
        }
    }
}

/// A container that could not be created, and when to try again.
#[derive(Debug, Clone)]
struct Failure {
    reason: &'static str,
    message: String,
    attempts: u32,
    retry_at: Instant,
}

fn backoff(attempts: u32) -> Duration {
    BACKOFF_START
        .saturating_mul(1 << attempts.saturating_sub(1).min(8))
        .min(BACKOFF_MAX)
}

/// What the status of one container is built from.
enum ContainerView<'a> {
    Creating,
    Failed(&'a Failure),
    Running(&'a Container),
    Terminated(&'a Container),
}

/// Remembers what was reported, so transitions keep their times and nothing is sent twice.
struct StatusTracker {
    start_time: String,
    transitions: HashMap<String, (String, String)>,
    last_sent: Option<Value>,
}

impl StatusTracker {
    fn new(pod: &Pod) -> Self {
        let status = pod.status.as_ref();
        let start_time = status
            .and_then(|s| s.start_time.as_ref())
            .map(|t| rfc3339(t.0))
            .unwrap_or_else(|| rfc3339(Timestamp::now()));
        let transitions = status
            .and_then(|s| s.conditions.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|c| {
                let time = c.last_transition_time.as_ref()?;
                Some((c.type_.clone(), (c.status.clone(), rfc3339(time.0))))
            })
            .collect();
        Self {
            start_time,
            transitions,
            last_sent: None,
        }
    }

    fn condition(&mut self, kind: &str, ok: bool, reason: Option<&str>, message: Option<String>) -> Value {
        let status = if ok { "True" } else { "False" };
        let entry = self
            .transitions
            .entry(kind.to_string())
            .or_insert_with(|| (status.to_string(), rfc3339(Timestamp::now())));
        if entry.0 != status {
            *entry = (status.to_string(), rfc3339(Timestamp::now()));
        }
        let mut c = json!({
            "type": kind,
            "status": status,
            "lastProbeTime": null,
            "lastTransitionTime": entry.1,
        });
        if let Some(reason) = reason {
            c["reason"] = json!(reason);
        }
        if let Some(message) = message {
            c["message"] = json!(message);
        }
        c
    }

    /// The full status of `pod` with `views` for its containers (in spec order).
    fn status(&mut self, pod: &Pod, views: &[(String, String, ContainerView<'_>)], terminal: bool) -> Value {
        let all_running = views.iter().all(|(_, _, v)| matches!(v, ContainerView::Running(_)));
        let unready: Vec<&str> = views
            .iter()
            .filter(|(_, _, v)| !matches!(v, ContainerView::Running(_)))
            .map(|(n, _, _)| n.as_str())
            .collect();
        let phase = if terminal {
            "Succeeded"
        } else if all_running {
            "Running"
        } else {
            "Pending"
        };
        let (ready_reason, ready_message) = if terminal {
            (Some("PodCompleted"), None)
        } else if all_running {
            (None, None)
        } else {
            (
                Some("ContainersNotReady"),
                Some(format!("containers with unready status: [{}]", unready.join(" "))),
            )
        };
        let mut conditions = vec![
            self.condition("PodReadyToStartContainers", !terminal, None, None),
            self.condition("Initialized", true, None, None),
            self.condition("Ready", all_running && !terminal, ready_reason, ready_message.clone()),
            self.condition("ContainersReady", all_running && !terminal, ready_reason, ready_message),
            self.condition("PodScheduled", true, None, None),
        ];
        // Conditions owned by others (DisruptionTarget, readiness gates) are kept as they are.
        let ours = [
            "PodReadyToStartContainers",
            "Initialized",
            "Ready",
            "ContainersReady",
            "PodScheduled",
        ];
        for c in pod.status.iter().flat_map(|s| s.conditions.iter().flatten()) {
            if !ours.contains(&c.type_.as_str())
                && let Ok(v) = serde_json::to_value(c)
            {
                conditions.push(v);
            }
        }
        let container_statuses: Vec<Value> = views
            .iter()
            .map(|(name, image, view)| container_status(name, image, view))
            .collect();
        let init_statuses: Vec<Value> = pod
            .spec
            .iter()
            .flat_map(|s| s.init_containers.iter().flatten())
            .map(|c| {
                json!({
                    "name": c.name,
                    "image": c.image.clone().unwrap_or_default(),
                    "imageID": fake_image_id(c.image.as_deref().unwrap_or_default()),
                    "containerID": format!("test-kubelet://{}", hex::encode(Sha256::digest(format!("{}/{}", pod.uid().unwrap_or_default(), c.name)))),
                    "ready": true,
                    "started": false,
                    "restartCount": 0,
                    "state": {"terminated": {
                        "exitCode": 0,
                        "reason": "Completed",
                        "startedAt": self.start_time,
                        "finishedAt": self.start_time,
                    }},
                })
            })
            .collect();
        let mut status = json!({
            "phase": phase,
            "conditions": conditions,
            "hostIP": POD_IP,
            "hostIPs": [{"ip": POD_IP}],
            "podIP": POD_IP,
            "podIPs": [{"ip": POD_IP}],
            "startTime": self.start_time,
            "containerStatuses": container_statuses,
        });
        if !init_statuses.is_empty() {
            status["initContainerStatuses"] = json!(init_statuses);
        }
        status
    }
}

/// The imageID of an image that was not really pulled: `<name>@sha256:<hash of the name>`.
/// A new container id: 64 hex characters, like a runtime's.
fn container_id(spec: &ContainerSpec) -> String {
    hex::encode(Sha256::digest(format!(
        "{}/{}/{}",
        spec.pod_uid,
        spec.name,
        Timestamp::now().as_nanosecond()
    )))
}

fn fake_image_id(image: &str) -> String {
    let name = image.split('@').next().unwrap_or(image);
    let name = match name.rsplit_once(':') {
        Some((repo, tag)) if !tag.contains('/') => repo,
        _ => name,
    };
    format!("{name}@sha256:{}", hex::encode(Sha256::digest(image.as_bytes())))
}

fn container_status(name: &str, image: &str, view: &ContainerView<'_>) -> Value {
    match view {
        ContainerView::Creating => json!({
            "name": name, "image": image, "imageID": "", "ready": false, "started": false, "restartCount": 0,
            "state": {"waiting": {"reason": "ContainerCreating"}},
        }),
        ContainerView::Failed(f) => json!({
            "name": name, "image": image, "imageID": "", "ready": false, "started": false, "restartCount": 0,
            "state": {"waiting": {"reason": f.reason, "message": f.message}},
        }),
        ContainerView::Running(c) => json!({
            "name": name, "image": image, "imageID": c.image_id, "containerID": format!("test-kubelet://{}", c.id),
            "ready": true, "started": true, "restartCount": 0,
            "state": {"running": {"startedAt": rfc3339(c.started_at)}},
        }),
        ContainerView::Terminated(c) => json!({
            "name": name, "image": image, "imageID": c.image_id, "containerID": format!("test-kubelet://{}", c.id),
            "ready": false, "started": false, "restartCount": 0,
            "state": {"terminated": {
                "exitCode": 0,
                "reason": "Completed",
                "startedAt": rfc3339(c.started_at),
                "finishedAt": rfc3339(c.finished_at().unwrap_or_else(Timestamp::now)),
                "containerID": format!("test-kubelet://{}", c.id),
            }},
        }),
    }
}

/// Why a pod worker stops running its pod.
enum End {
    Deleted(Box<Pod>),
    Vanished,
}

/// Waits until the pod has a deletionTimestamp or is gone.
async fn until_ended(rx: &mut watch::Receiver<Option<Pod>>) -> End {
    loop {
        match rx.borrow_and_update().clone() {
            None => return End::Vanished,
            Some(pod) if pod.metadata.deletion_timestamp.is_some() => return End::Deleted(Box::new(pod)),
            Some(_) => {}
        }
        if rx.changed().await.is_err() {
            return End::Vanished;
        }
    }
}

/// Runs the pods of one node.
pub struct PodManager {
    client: Client,
    node: String,
    runtime: Runtime,
    puller: Puller,
    /// Runs `kube-migrate.test/*` images as real containers, when configured.
    crun: Option<Crun>,
    /// Where the checkpoint API writes archives (for the fault injection below).
    checkpoint_dir: Option<std::path::PathBuf>,
}

/// Fault injection for the end-to-end scenarios: a pod annotated with this key and the value
/// `truncate-archive-on-stop` has its checkpoint archives cut in half when it is deleted,
/// i.e. after its checkpoint and before the archive is sent, as a failing disk would.
pub const FAULT_ANNOTATION: &str = "test.kube-migrate.io/fault";

impl PodManager {
    pub fn with_checkpoint_dir(mut self, dir: std::path::PathBuf) -> Self {
        self.checkpoint_dir = Some(dir);
        self
    }

    fn inject_stop_faults(&self, pod: &Pod) {
        let wanted = pod.annotations().get(FAULT_ANNOTATION).map(String::as_str) == Some("truncate-archive-on-stop");
        let Some(dir) = self.checkpoint_dir.as_ref().filter(|_| wanted) else {
            return;
        };
        let prefix = format!("checkpoint-{}_{}-", pod.name_any(), pod.namespace().unwrap_or_default());
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if !entry.file_name().to_string_lossy().starts_with(&prefix) {
                continue;
            }
            let path = entry.path();
            let len = entry.metadata().map(|m| m.len()).unwrap_or(0);
            let result = std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .and_then(|f| f.set_len(len / 2));
            tracing::warn!(path = %path.display(), from = len, to = len / 2, ?result, "fault injected: archive truncated");
        }
    }

    pub fn new(client: Client, node: impl Into<String>, runtime: Runtime, puller: Puller, crun: Option<Crun>) -> Self {
        Self {
            client,
            node: node.into(),
            runtime,
            puller,
            crun,
            checkpoint_dir: None,
        }
    }

    /// Watch this node's pods until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let api: Api<Pod> = Api::all(self.client.clone());
        let config = watcher::Config::default().fields(&format!("spec.nodeName={}", self.node));
        let mut events = watcher(api, config).default_backoff().boxed();
        // Pod UID → its worker. A closed channel means the worker is done with that pod.
        let mut workers: HashMap<String, watch::Sender<Option<Pod>>> = HashMap::new();
        let mut listed: Option<HashSet<String>> = None;
        loop {
            let event = tokio::select! {
                _ = shutdown.cancelled() => break,
                event = events.next() => event,
            };
            let Some(event) = event else { break };
            match event {
                Ok(watcher::Event::Init) => listed = Some(HashSet::new()),
                Ok(watcher::Event::InitApply(pod)) => {
                    if let (Some(listed), Some(uid)) = (listed.as_mut(), pod.uid()) {
                        listed.insert(uid);
                    }
                    self.dispatch(&mut workers, pod);
                }
                Ok(watcher::Event::InitDone) => {
                    if let Some(listed) = listed.take() {
                        workers.retain(|uid, tx| {
                            let keep = listed.contains(uid);
                            if !keep {
                                tx.send_replace(None);
                            }
                            keep
                        });
                    }
                }
                Ok(watcher::Event::Apply(pod)) => self.dispatch(&mut workers, pod),
                Ok(watcher::Event::Delete(pod)) => {
                    if let Some(tx) = pod.uid().and_then(|uid| workers.remove(&uid)) {
                        tx.send_replace(None);
                    }
                }
                Err(error) => tracing::warn!(%error, "pod watch failed; retrying"),
            }
        }
        for tx in workers.values() {
            tx.send_replace(None);
        }
    }

    fn dispatch(self: &Arc<Self>, workers: &mut HashMap<String, watch::Sender<Option<Pod>>>, pod: Pod) {
        let Some(uid) = pod.uid() else { return };
        match workers.get(&uid) {
            // Done with it (stopped and deleted): late events change nothing.
            Some(tx) if tx.is_closed() => {}
            Some(tx) => {
                tx.send_replace(Some(pod));
            }
            None => {
                let (tx, rx) = watch::channel(Some(pod));
                workers.insert(uid, tx);
                tokio::spawn(Arc::clone(self).run_pod(rx));
            }
        }
    }

    /// Create one container: restored from its image when that is a checkpoint image.
    async fn create(&self, pod: &Pod, c: &k8s_openapi::api::core::v1::Container) -> Result<Arc<Container>, PodError> {
        let image = c.image.clone().unwrap_or_default();
        let env = |name: &str| {
            c.env
                .iter()
                .flatten()
                .find(|e| e.name == name)
                .and_then(|e| e.value.clone())
        };
        let spec = ContainerSpec {
            namespace: pod.namespace().unwrap_or_default(),
            pod: pod.name_any(),
            pod_uid: pod.uid().unwrap_or_default(),
            name: c.name.clone(),
            image: image.clone(),
            mounts: c
                .volume_mounts
                .iter()
                .flatten()
                .map(|m| Mount {
                    volume: m.name.clone(),
                    destination: m.mount_path.clone(),
                    read_only: m.read_only.unwrap_or(false),
                })
                .collect(),
        };
        let run_spec = |id: &str| RunSpec {
            id: id.to_string(),
            pod_uid: spec.pod_uid.clone(),
            namespace: spec.namespace.clone(),
            pod: spec.pod.clone(),
            container: spec.name.clone(),
            image: image.clone(),
            command: c.command.clone().unwrap_or_default(),
            args: c.args.clone().unwrap_or_default(),
            env: c
                .env
                .iter()
                .flatten()
                .filter_map(|e| e.value.as_ref().map(|v| format!("{}={v}", e.name)))
                .collect(),
        };
        let target = format!("{}/{}", spec.namespace, spec.pod);
        if let Some(reference) = ImageRef::parse(&image) {
            let manifest = self.puller.manifest(&reference).await?;
            if let (Some(crun), Some(base)) = (&self.crun, manifest.base_image.as_deref())
                && crun.handles(base)
            {
                let id = container_id(&spec);
                let started = Instant::now();
                let dir = crun.restore_dir(&id);
                let bytes = self.puller.unpack(&reference, &manifest, dir.clone()).await?;
                let pulled = started.elapsed();
                let handle = crun.restore(&run_spec(&id), &dir).await?;
                tracing::info!(
                    pod = %target, container = %spec.name, %image, digest = %manifest.manifest_digest, bytes,
                    pull_seconds = pulled.as_secs_f64(), restore_seconds = (started.elapsed() - pulled).as_secs_f64(),
                    "restored container with CRIU from checkpoint image"
                );
                return Ok(Container::start_crun(spec, id, manifest.image_id, crun.clone(), handle));
            }
            let restored = self.puller.read_state(&reference, manifest).await?;
            tracing::info!(
                pod = %target, container = %spec.name, %image,
                digest = %restored.manifest_digest, counter = restored.counter,
                memory_bytes = restored.memory.len(), "restored container from checkpoint image"
            );
            let origin = Origin::Restored {
                image_ref: format!("{image}@{}", restored.manifest_digest),
                counter: restored.counter,
            };
            return Ok(Container::start(spec, restored.image_id, restored.memory, origin));
        }
        if let Some(crun) = self.crun.as_ref().filter(|crun| crun.handles(&image)) {
            let id = container_id(&spec);
            let handle = crun.run(&run_spec(&id)).await?;
            tracing::info!(pod = %target, container = %spec.name, %image, id = %id, "started container with crun");
            return Ok(Container::start_crun(
                spec,
                id,
                fake_image_id(&image),
                crun.clone(),
                handle,
            ));
        }
        let bytes = parse_state_bytes(env(STATE_BYTES_ENV).as_deref())?;
        let seed = parse_state_seed(env(STATE_SEED_ENV).as_deref())?
            .unwrap_or_else(|| default_seed(&spec.pod_uid, &spec.name));
        let memory = tokio::task::spawn_blocking(move || Memory::generate(bytes, seed)).await??;
        Ok(Container::start(spec, fake_image_id(&image), memory, Origin::Fresh))
    }

    async fn publish(&self, api: &Api<Pod>, name: &str, status: Value, tracker: &mut StatusTracker) -> bool {
        if tracker.last_sent.as_ref() == Some(&status) {
            return true;
        }
        let patch = json!({"status": status});
        match api
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                tracker.last_sent = Some(status);
                true
            }
            // Gone: the watch will say so.
            Err(kube::Error::Api(s)) if s.code == 404 => true,
            Err(error) => {
                tracing::warn!(pod = %name, %error, "pod status update failed; retrying");
                false
            }
        }
    }

    fn views<'a>(
        pod: &Pod,
        running: &'a BTreeMap<String, Arc<Container>>,
        failures: &'a BTreeMap<String, Failure>,
        stopped: bool,
    ) -> Vec<(String, String, ContainerView<'a>)> {
        pod.spec
            .iter()
            .flat_map(|s| s.containers.iter())
            .map(|c| {
                let view = match (running.get(&c.name), failures.get(&c.name)) {
                    (Some(r), _) if stopped => ContainerView::Terminated(r),
                    (Some(r), _) => ContainerView::Running(r),
                    (None, Some(f)) => ContainerView::Failed(f),
                    (None, None) => ContainerView::Creating,
                };
                (c.name.clone(), c.image.clone().unwrap_or_default(), view)
            })
            .collect()
    }

    /// Run one pod until it is deleted or gone.
    async fn run_pod(self: Arc<Self>, mut rx: watch::Receiver<Option<Pod>>) {
        let Some(first) = rx.borrow_and_update().clone() else {
            return;
        };
        let (namespace, name, uid) = (
            first.namespace().unwrap_or_default(),
            first.name_any(),
            first.uid().unwrap_or_default(),
        );
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &namespace);
        let mut tracker = StatusTracker::new(&first);
        let mut running: BTreeMap<String, Arc<Container>> = BTreeMap::new();
        let mut failures: BTreeMap<String, Failure> = BTreeMap::new();
        let terminal = first
            .status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .is_some_and(|p| p == "Succeeded" || p == "Failed");
        tracing::info!(pod = %format!("{namespace}/{name}"), %uid, "pod bound to this node");

        let end = if terminal {
            // Finished earlier (by a previous run of this kubelet): only the deletion is left.
            until_ended(&mut rx).await
        } else {
            'run: loop {
                let pod = match rx.borrow_and_update().clone() {
                    None => break 'run End::Vanished,
                    Some(p) if p.metadata.deletion_timestamp.is_some() => break 'run End::Deleted(Box::new(p)),
                    Some(p) => p,
                };
                let mut published = {
                    let status = tracker.status(&pod, &Self::views(&pod, &running, &failures, false), false);
                    self.publish(&api, &name, status, &mut tracker).await
                };
                let due: Vec<_> = pod
                    .spec
                    .iter()
                    .flat_map(|s| s.containers.iter())
                    .filter(|c| !running.contains_key(&c.name))
                    .filter(|c| failures.get(&c.name).is_none_or(|f| f.retry_at <= Instant::now()))
                    .cloned()
                    .collect();
                for c in due {
                    let created = tokio::select! {
                        created = self.create(&pod, &c) => created,
                        end = until_ended(&mut rx) => break 'run end,
                    };
                    match created {
                        Ok(container) => {
                            tracing::info!(pod = %format!("{namespace}/{name}"), container = %c.name, "container started");
                            self.runtime.insert(&uid, Arc::clone(&container));
                            running.insert(c.name.clone(), container);
                            failures.remove(&c.name);
                        }
                        Err(error) => {
                            let attempts = failures.get(&c.name).map_or(1, |f| f.attempts + 1);
                            let wait = backoff(attempts);
                            tracing::warn!(
                                pod = %format!("{namespace}/{name}"), container = %c.name, reason = error.reason(),
                                %error, retry_in = ?wait, "container could not be created"
                            );
                            failures.insert(
                                c.name.clone(),
                                Failure {
                                    reason: error.reason(),
                                    message: error.to_string(),
                                    attempts,
                                    retry_at: Instant::now() + wait,
                                },
                            );
                        }
                    }
                    let status = tracker.status(&pod, &Self::views(&pod, &running, &failures, false), false);
                    published = self.publish(&api, &name, status, &mut tracker).await;
                }
                let next_retry = failures.values().map(|f| f.retry_at).min();
                let wake = match (published, next_retry) {
                    (false, r) => Some(r.map_or(Instant::now() + BACKOFF_START, |r| {
                        r.min(Instant::now() + BACKOFF_START)
                    })),
                    (true, r) => r,
                };
                tokio::select! {
                    _ = tokio::time::sleep_until(wake.unwrap_or_else(Instant::now)), if wake.is_some() => {}
                    changed = rx.changed() => if changed.is_err() { break 'run End::Vanished },
                }
            }
        };

        match end {
            End::Vanished => {
                tracing::info!(pod = %format!("{namespace}/{name}"), %uid, "pod gone; stopping its containers");
                for c in running.values() {
                    c.stop();
                }
                for c in running.values() {
                    c.stopped(MAX_STOP_WAIT).await;
                }
            }
            End::Deleted(pod) => {
                self.inject_stop_faults(&pod);
                let grace = pod
                    .metadata
                    .deletion_grace_period_seconds
                    .map_or(Duration::from_secs(30), |s| Duration::from_secs(s.max(0) as u64));
                tracing::info!(pod = %format!("{namespace}/{name}"), %uid, ?grace, "pod deleted; stopping its containers");
                let stop_at = Instant::now() + grace.min(MAX_STOP_DELAY);
                // A pod that vanishes meanwhile needs no more waiting.
                let vanished = tokio::select! {
                    _ = tokio::time::sleep_until(stop_at) => false,
                    end = async { loop { if rx.changed().await.is_err() || rx.borrow().is_none() { return End::Vanished } } } => matches!(end, End::Vanished),
                };
                for c in running.values() {
                    c.stop();
                }
                // Real containers take a moment (TERM, KILL, crun delete).
                for c in running.values() {
                    c.stopped(MAX_STOP_WAIT).await;
                }
                if !vanished && !terminal {
                    let status = tracker.status(&pod, &Self::views(&pod, &running, &failures, true), true);
                    self.publish(&api, &name, status, &mut tracker).await;
                }
                if !vanished {
                    self.delete(&api, &name, &uid, &mut rx).await;
                }
            }
        }
        self.runtime.remove(&namespace, &name, &uid);
        tracing::info!(pod = %format!("{namespace}/{name}"), %uid, "pod done");
    }

    /// Delete the pod object at once (grace period 0, UID precondition), as the kubelet
    /// does once the containers stopped. Retries until it is gone.
    async fn delete(&self, api: &Api<Pod>, name: &str, uid: &str, rx: &mut watch::Receiver<Option<Pod>>) {
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(uid.to_string()),
                resource_version: None,
            }),
            ..Default::default()
        };
        let mut attempts = 0;
        loop {
            match api.delete(name, &params).await {
                Ok(_) => return,
                // Gone already, or another pod of the same name by now.
                Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => return,
                Err(error) => {
                    attempts += 1;
                    tracing::warn!(pod = %name, %error, "deleting the pod failed; retrying");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff(attempts)) => {}
                changed = rx.changed() => if changed.is_err() || rx.borrow().is_none() { return },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(3), Duration::from_secs(4));
        assert_eq!(backoff(10), BACKOFF_MAX);
    }

    #[test]
    fn fake_image_ids_look_like_digests() {
        let id = fake_image_id("registry.local/counter:1");
        assert!(id.starts_with("registry.local/counter@sha256:"), "{id}");
        assert!(fake_image_id("localhost:5000/x").starts_with("localhost:5000/x@sha256:"));
    }

    fn pod() -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "ns", "uid": "u1"},
            "spec": {
                "nodeName": "node-a",
                "initContainers": [{"name": "init", "image": "busybox"}],
                "containers": [{"name": "a", "image": "img:1"}, {"name": "b", "image": "img:2"}]
            },
            "status": {"conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"},
                {"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI"}
            ]}
        }))
        .unwrap()
    }

    #[test]
    fn pending_status_names_unready_containers_and_keeps_foreign_conditions() {
        let pod = pod();
        let mut tracker = StatusTracker::new(&pod);
        let failure = Failure {
            reason: "ErrImagePull",
            message: "boom".into(),
            attempts: 1,
            retry_at: Instant::now(),
        };
        let views = vec![
            ("a".to_string(), "img:1".to_string(), ContainerView::Creating),
            ("b".to_string(), "img:2".to_string(), ContainerView::Failed(&failure)),
        ];
        let status = tracker.status(&pod, &views, false);
        assert_eq!(status["phase"], "Pending");
        let conditions = status["conditions"].as_array().unwrap();
        let ready = conditions.iter().find(|c| c["type"] == "Ready").unwrap();
        assert_eq!(ready["status"], "False");
        assert_eq!(ready["message"], "containers with unready status: [a b]");
        let scheduled = conditions.iter().find(|c| c["type"] == "PodScheduled").unwrap();
        assert_eq!(scheduled["lastTransitionTime"], "2026-01-01T00:00:00Z");
        assert!(conditions.iter().any(|c| c["type"] == "DisruptionTarget"));
        assert_eq!(
            status["containerStatuses"][0]["state"]["waiting"]["reason"],
            "ContainerCreating"
        );
        assert_eq!(
            status["containerStatuses"][1]["state"]["waiting"]["reason"],
            "ErrImagePull"
        );
        assert_eq!(status["containerStatuses"][1]["state"]["waiting"]["message"], "boom");
        assert_eq!(
            status["initContainerStatuses"][0]["state"]["terminated"]["reason"],
            "Completed"
        );
        // The typed API accepts it.
        let _: k8s_openapi::api::core::v1::PodStatus = serde_json::from_value(status).unwrap();
    }

    #[tokio::test]
    async fn running_then_terminal_status() {
        let pod = pod();
        let mut tracker = StatusTracker::new(&pod);
        let spec = |n: &str| ContainerSpec {
            namespace: "ns".into(),
            pod: "p".into(),
            pod_uid: "u1".into(),
            name: n.into(),
            image: "img".into(),
            mounts: vec![],
        };
        let a = Container::start(
            spec("a"),
            "img@sha256:1".into(),
            Memory::from_vec(vec![]),
            Origin::Fresh,
        );
        let b = Container::start(
            spec("b"),
            "img@sha256:2".into(),
            Memory::from_vec(vec![]),
            Origin::Fresh,
        );
        let views = vec![
            ("a".to_string(), "img:1".to_string(), ContainerView::Running(&a)),
            ("b".to_string(), "img:2".to_string(), ContainerView::Running(&b)),
        ];
        let status = tracker.status(&pod, &views, false);
        assert_eq!(status["phase"], "Running");
        assert_eq!(status["podIP"], POD_IP);
        assert_eq!(status["containerStatuses"][0]["ready"], true);
        assert_eq!(status["containerStatuses"][0]["imageID"], "img@sha256:1");
        for c in status["conditions"].as_array().unwrap() {
            if c["type"] != "DisruptionTarget" {
                assert_eq!(c["status"], "True", "{c}");
            }
        }
        a.stop();
        b.stop();
        let views = vec![
            ("a".to_string(), "img:1".to_string(), ContainerView::Terminated(&a)),
            ("b".to_string(), "img:2".to_string(), ContainerView::Terminated(&b)),
        ];
        let status = tracker.status(&pod, &views, true);
        assert_eq!(status["phase"], "Succeeded");
        assert_eq!(status["containerStatuses"][1]["state"]["terminated"]["exitCode"], 0);
        let _: k8s_openapi::api::core::v1::PodStatus = serde_json::from_value(status).unwrap();
    }
}
