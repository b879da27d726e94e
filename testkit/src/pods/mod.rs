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
    container::{
        Container, ContainerError, ContainerSpec, Memory, Mount, Origin, STATE_BYTES_ENV, STATE_SEED_ENV, default_seed,
        parse_state_bytes, parse_state_seed,
    },
    crun::{Crun, CrunError, RunSpec},
    restore::{ImageRef, Puller, REASON_CREATE, RestoreError},
};

mod status;

use status::{ContainerView, StatusTracker, fake_image_id};

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

/// A new container id: 64 hex characters, like a runtime's.
fn container_id(spec: &ContainerSpec) -> String {
    hex::encode(Sha256::digest(format!(
        "{}/{}/{}",
        spec.pod_uid,
        spec.name,
        Timestamp::now().as_nanosecond()
    )))
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
    cgroup_root: Option<std::path::PathBuf>,
}

/// Fault injection for the end-to-end scenarios: a pod annotated with this key and the value
/// `truncate-archive-on-stop` has its checkpoint archives cut in half when it is deleted,
/// i.e. after its checkpoint and before the archive is sent, as a failing disk would.
pub const FAULT_ANNOTATION: &str = "test.kube-migrate.io/fault";

/// The controller's hold on a source pod (`migrate.io/state-hold`).
fn is_held(pod: &Pod) -> bool {
    pod.finalizers().iter().any(|f| f == "migrate.io/state-hold")
}

impl PodManager {
    /// Simulated containers get a stand-in cgroup under `dir` that the node agent can freeze.
    pub fn with_cgroup_root(mut self, dir: std::path::PathBuf) -> Self {
        self.cgroup_root = Some(dir);
        self
    }

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
            cgroup_root: None,
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
            cgroup_root: self.cgroup_root.clone(),
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
        if let Some(mut reference) = ImageRef::parse(&image) {
            let manifest = crate::pull_secrets::manifest(&self.client, pod, &self.puller, &mut reference).await?;
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

        let mut faulted = false;
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
                // A frozen source is held, not deleted, while its archive travels: the fault
                // strikes when the hold arrives (after the checkpoint, before the send).
                if !faulted && is_held(&pod) {
                    faulted = true;
                    self.inject_stop_faults(&pod);
                }
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
                if !faulted {
                    self.inject_stop_faults(&pod);
                }
                let grace = pod
                    .metadata
                    .deletion_grace_period_seconds
                    .map_or(Duration::from_secs(30), |s| Duration::from_secs(s.max(0) as u64));
                tracing::info!(pod = %format!("{namespace}/{name}"), %uid, ?grace, "pod deleted; stopping its containers");
                let stop_at = Instant::now() + grace.min(MAX_STOP_DELAY);
                // No more waiting for a pod that vanishes, or whose containers all exited
                // (killed through their cgroup): the kubelet's stop of those returns at once.
                let all_exited = async {
                    for c in running.values() {
                        c.stopped(MAX_STOP_DELAY).await;
                    }
                };
                let vanished = tokio::select! {
                    _ = tokio::time::timeout_at(stop_at, all_exited) => false,
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
        running.values().for_each(|c| c.report_end());
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
mod tests;
