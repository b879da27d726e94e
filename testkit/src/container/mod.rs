//! A container of the test kubelet: either simulated (a counter ticking every 100 ms, optional
//! "memory" of deterministic pseudo-random bytes) or real (a process crun runs, see [`crate::crun`]),
//! with its log.
//!
//! A simulated container's memory never changes once it runs, so it is shared (`Arc`) with
//! whoever checkpoints the container: an archive of a 1 GiB container streams from the very same
//! buffer, nothing is copied.

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use k8s_openapi::jiff::Timestamp;

use crate::crun::{Crun, Handle};
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Env var giving the size of a container's memory, in bytes.
pub const STATE_BYTES_ENV: &str = "STATE_BYTES";
/// Env var overriding the seed of a container's memory (default: derived from the pod).
pub const STATE_SEED_ENV: &str = "STATE_SEED";
/// The counter ticks this often.
pub const TICK: Duration = Duration::from_millis(100);
/// Lines kept per container; older ones are dropped.
const MAX_LOG_LINES: usize = 100_000;
/// How often a simulated container reads its stand-in cgroup's freeze and kill files.
const FREEZER_POLL: Duration = Duration::from_millis(5);
/// How often a real container's log file is read.
const LOG_POLL: Duration = Duration::from_millis(100);
/// Longest line kept whole; longer ones are split.
const MAX_LINE_BYTES: usize = 16 << 10;

/// Follows a log file that the shim appends to, line by line. The shim's own lines
/// (`<time> km-shim[<pid>]: ...`) go to the kubelet's log, not the container's.
struct LogFollower {
    path: std::path::PathBuf,
    /// Open once the shim has created the file; reads go on from where the last one ended.
    file: Option<std::fs::File>,
    /// Bytes read and not yet pushed as a line.
    partial: Vec<u8>,
}

impl LogFollower {
    fn new(path: std::path::PathBuf) -> Self {
        Self {
            path,
            file: None,
            partial: Vec::new(),
        }
    }

    fn poll(&mut self, log: &Log) {
        use std::io::Read;
        if self.file.is_none() {
            self.file = std::fs::File::open(&self.path).ok();
        }
        let Some(file) = self.file.as_mut() else { return };
        // On an error, what was read so far stays in `partial`; the next poll goes on.
        let _ = file.read_to_end(&mut self.partial);
        let mut start = 0;
        while let Some(end) = self.partial[start..]
            .iter()
            .position(|&b| b == b'\n')
            .map(|i| start + i)
        {
            self.push(log, start, end);
            start = end + 1;
        }
        self.partial.drain(..start);
        if self.partial.len() > MAX_LINE_BYTES {
            let len = self.partial.len();
            self.push(log, 0, len);
            self.partial.clear();
        }
    }

    fn push(&self, log: &Log, start: usize, end: usize) {
        let text = String::from_utf8_lossy(&self.partial[start..end]).into_owned();
        if is_shim_line(&text) {
            tracing::debug!(log = %self.path.display(), line = %text, "shim");
        } else {
            log.push(text);
        }
    }
}

/// `2026-11-23T10:00:00.000Z km-shim[123]: ...`
fn is_shim_line(line: &str) -> bool {
    line.split_once(' ')
        .is_some_and(|(time, rest)| time.ends_with('Z') && rest.starts_with("km-shim["))
}

#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("invalid {STATE_BYTES_ENV} {value:?}: expected a number of bytes")]
    StateBytes { value: String },
    #[error("invalid {STATE_SEED_ENV} {value:?}: expected an unsigned number")]
    StateSeed { value: String },
    #[error("cannot allocate {bytes} bytes of container memory")]
    Allocation { bytes: u64 },
}

/// A container's memory and its SHA-256 (hex).
#[derive(Clone)]
pub struct Memory {
    bytes: Arc<Vec<u8>>,
    sha256: String,
}

impl std::fmt::Debug for Memory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Memory")
            .field("len", &self.bytes.len())
            .field("sha256", &self.sha256)
            .finish()
    }
}

impl Memory {
    /// Takes ownership of `bytes` (no copy) and hashes them.
    pub fn from_vec(bytes: Vec<u8>) -> Self {
        let sha256 = hex::encode(Sha256::digest(&bytes));
        Self {
            bytes: Arc::new(bytes),
            sha256,
        }
    }

    /// Already hashed (the restore path hashes while it reads).
    pub fn from_hashed(bytes: Vec<u8>, sha256: String) -> Self {
        Self {
            bytes: Arc::new(bytes),
            sha256,
        }
    }

    /// `len` deterministic pseudo-random bytes from `seed` (xorshift64*). CPU-bound: call it
    /// from a blocking thread for large sizes.
    pub fn generate(len: u64, seed: u64) -> Result<Self, ContainerError> {
        let size = usize::try_from(len).map_err(|_| ContainerError::Allocation { bytes: len })?;
        let mut bytes = Vec::new();
        bytes
            .try_reserve_exact(size)
            .map_err(|_| ContainerError::Allocation { bytes: len })?;
        bytes.resize(size, 0);
        fill_pseudo_random(&mut bytes, seed);
        Ok(Self::from_vec(bytes))
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.bytes
    }

    pub fn len(&self) -> u64 {
        self.bytes.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    pub fn sha256(&self) -> &str {
        &self.sha256
    }
}

/// Fill `out` with the xorshift64* stream of `seed` (8 bytes per step, little endian).
pub fn fill_pseudo_random(out: &mut [u8], seed: u64) {
    // A zero state would stay zero forever; mix the seed first (splitmix64 finaliser).
    let mut x = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 31;
    if x == 0 {
        x = 1;
    }
    let mut next = || {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    let mut chunks = out.chunks_exact_mut(8);
    for chunk in &mut chunks {
        chunk.copy_from_slice(&next().to_le_bytes());
    }
    let rest = chunks.into_remainder();
    let last = next().to_le_bytes();
    rest.copy_from_slice(&last[..rest.len()]);
}

/// The default seed of a container's memory: FNV-1a of `<pod uid>/<container>`. Every pod
/// (even a StatefulSet's replacement with the same name) starts with memory of its own, so
/// equal memory after a restore proves the state travelled.
pub fn default_seed(pod_uid: &str, container: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in format!("{pod_uid}/{container}").bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// `STATE_BYTES` of a container's env (absent: 0).
pub fn parse_state_bytes(value: Option<&str>) -> Result<u64, ContainerError> {
    match value.map(str::trim) {
        None | Some("") => Ok(0),
        Some(v) => v
            .parse()
            .map_err(|_| ContainerError::StateBytes { value: v.to_string() }),
    }
}

/// `STATE_SEED` of a container's env, if set.
pub fn parse_state_seed(value: Option<&str>) -> Result<Option<u64>, ContainerError> {
    match value.map(str::trim) {
        None | Some("") => Ok(None),
        Some(v) => v
            .parse()
            .map(Some)
            .map_err(|_| ContainerError::StateSeed { value: v.to_string() }),
    }
}

/// One log line.
#[derive(Debug, Clone)]
pub struct LogLine {
    pub time: Timestamp,
    pub text: String,
}

#[derive(Default)]
struct LogInner {
    lines: VecDeque<LogLine>,
    /// Index (since the start) of `lines[0]`.
    first: u64,
}

/// A container's log: bounded, with a notification for followers.
pub struct Log {
    inner: Mutex<LogInner>,
    /// (lines written since the start, container stopped)
    progress: watch::Sender<(u64, bool)>,
}

impl Default for Log {
    fn default() -> Self {
        Self {
            inner: Mutex::default(),
            progress: watch::Sender::new((0, false)),
        }
    }
}

impl Log {
    pub fn push(&self, text: String) {
        let total = {
            let mut inner = self.inner.lock().expect("log lock");
            inner.lines.push_back(LogLine {
                time: Timestamp::now(),
                text,
            });
            if inner.lines.len() > MAX_LOG_LINES {
                inner.lines.pop_front();
                inner.first += 1;
            }
            inner.first + inner.lines.len() as u64
        };
        self.progress.send_modify(|p| p.0 = total);
    }

    fn close(&self) {
        self.progress.send_modify(|p| p.1 = true);
    }

    /// Lines from index `from` on (the oldest kept when `from` was dropped), and the index
    /// after the last one returned.
    pub fn since(&self, from: u64) -> (Vec<LogLine>, u64) {
        let inner = self.inner.lock().expect("log lock");
        let skip = from.saturating_sub(inner.first) as usize;
        let lines: Vec<LogLine> = inner.lines.iter().skip(skip).cloned().collect();
        (lines, inner.first + inner.lines.len() as u64)
    }

    /// The last `n` lines (all when None), and the index after them.
    pub fn tail(&self, n: Option<u64>) -> (Vec<LogLine>, u64) {
        let inner = self.inner.lock().expect("log lock");
        let len = inner.lines.len();
        let keep = n.map_or(len, |n| (n as usize).min(len));
        let lines = inner.lines.iter().skip(len - keep).cloned().collect();
        (lines, inner.first + len as u64)
    }

    /// Notified on every new line and when the container stops.
    pub fn subscribe(&self) -> watch::Receiver<(u64, bool)> {
        self.progress.subscribe()
    }
}

/// Where a container's state came from.
#[derive(Debug, Clone)]
pub enum Origin {
    Fresh,
    Restored {
        /// `<image>@<manifest digest>`
        image_ref: String,
        counter: u64,
    },
}

/// A volume mount of a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub volume: String,
    pub destination: String,
    pub read_only: bool,
}

/// What a container is, as the pod spec says.
#[derive(Debug, Clone)]
pub struct ContainerSpec {
    pub namespace: String,
    pub pod: String,
    pub pod_uid: String,
    pub name: String,
    pub image: String,
    pub mounts: Vec<Mount>,
    /// Root of the node's stand-in cgroup tree (see [`cgroup`]); None: no freezer.
    pub cgroup_root: Option<std::path::PathBuf>,
}

/// What runs a container.
pub enum Backend {
    Simulated { counter: AtomicU64, memory: Memory },
    Crun { crun: Crun, handle: Box<Handle> },
}

/// A running (or stopped) container.
pub struct Container {
    pub spec: ContainerSpec,
    /// 64 hex characters, like a runtime's container id.
    pub id: String,
    pub image_id: String,
    pub started_at: Timestamp,
    pub backend: Backend,
    pub log: Log,
    stop: CancellationToken,
    finished_at: Mutex<Option<Timestamp>>,
    /// Killed through its cgroup (`cgroup.kill`), as SIGKILL would: exit code 137.
    killed: std::sync::atomic::AtomicBool,
}

impl Container {
    /// Start the container's ticking task. Its first log line says how it started.
    pub fn start(spec: ContainerSpec, image_id: String, memory: Memory, origin: Origin) -> Arc<Self> {
        let started_at = Timestamp::now();
        let id = hex::encode(Sha256::digest(format!(
            "{}/{}/{}/{}",
            spec.pod_uid,
            spec.name,
            started_at.as_nanosecond(),
            memory.sha256()
        )));
        let (counter, first_line) = match &origin {
            Origin::Fresh => (
                0,
                format!(
                    "started fresh: counter=0 memory_bytes={} memory_sha256={}",
                    memory.len(),
                    memory.sha256()
                ),
            ),
            Origin::Restored { image_ref, counter } => (
                *counter,
                format!(
                    "restored from checkpoint image {image_ref}: counter={counter} memory_bytes={} memory_sha256={}",
                    memory.len(),
                    memory.sha256()
                ),
            ),
        };
        let container = Arc::new(Self {
            spec,
            id,
            image_id,
            started_at,
            backend: Backend::Simulated {
                counter: AtomicU64::new(counter),
                memory,
            },
            log: Log::default(),
            stop: CancellationToken::new(),
            finished_at: Mutex::new(None),
            killed: Default::default(),
        });
        container.log.push(first_line);
        let this = Arc::clone(&container);
        let mut cgroup = this.spec.cgroup_root.as_ref().and_then(|root| {
            cgroup::FakeCgroup::create(root, &this.spec.pod_uid, &this.id)
                .inspect_err(|e| tracing::warn!(error = %e, "no stand-in cgroup; the container cannot be frozen"))
                .ok()
        });
        tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + TICK, TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut poll = tokio::time::interval(FREEZER_POLL);
            let mut ticks: u64 = 0;
            loop {
                let due = tokio::select! {
                    _ = this.stop.cancelled() => break,
                    _ = tick.tick() => true,
                    _ = poll.tick(), if cgroup.is_some() => false,
                };
                // Frozen: no tick until thawed (a tick due meanwhile is lost, as CPU time is).
                match cgroup.as_mut().map(cgroup::FakeCgroup::poll) {
                    Some(None) => {
                        this.killed.store(true, Ordering::SeqCst);
                        this.stop.cancel();
                        break;
                    }
                    Some(Some(true)) => continue,
                    _ => {}
                }
                if !due {
                    continue;
                }
                let Backend::Simulated { counter, .. } = &this.backend else {
                    break;
                };
                let value = counter.fetch_add(1, Ordering::SeqCst) + 1;
                ticks += 1;
                if ticks.is_multiple_of(10) {
                    this.log.push(format!("counter={value}"));
                }
            }
            drop(cgroup);
            *this.finished_at.lock().expect("finished lock") = Some(Timestamp::now());
            this.log.close();
        });
        container
    }

    /// A container crun runs: `handle` is already running (or restored). The log file is
    /// followed into `log`; stopping kills and deletes the container.
    pub fn start_crun(spec: ContainerSpec, id: String, image_id: String, crun: Crun, handle: Handle) -> Arc<Self> {
        let container = Arc::new(Self {
            spec,
            id,
            image_id,
            started_at: Timestamp::now(),
            backend: Backend::Crun {
                crun,
                handle: Box::new(handle),
            },
            log: Log::default(),
            stop: CancellationToken::new(),
            finished_at: Mutex::new(None),
            killed: Default::default(),
        });
        let this = Arc::clone(&container);
        tokio::spawn(async move {
            let Backend::Crun { crun, handle } = &this.backend else {
                return;
            };
            let mut follower = LogFollower::new(handle.log.clone());
            let mut exited = false;
            loop {
                tokio::select! {
                    _ = this.stop.cancelled() => break,
                    _ = tokio::time::sleep(LOG_POLL) => {}
                }
                follower.poll(&this.log);
                if !exited && handle.exited() {
                    exited = true;
                    tracing::warn!(
                        pod = %format!("{}/{}", this.spec.namespace, this.spec.pod), container = %this.spec.name,
                        exit = %std::fs::read_to_string(&handle.exit_file).unwrap_or_default().trim(),
                        "container exited on its own"
                    );
                }
            }
            crun.stop(handle).await;
            follower.poll(&this.log);
            *this.finished_at.lock().expect("finished lock") = Some(Timestamp::now());
            this.log.close();
        });
        container
    }

    /// The counter of a simulated container (None for a real one: its state is its own).
    pub fn counter(&self) -> Option<u64> {
        match &self.backend {
            Backend::Simulated { counter, .. } => Some(counter.load(Ordering::SeqCst)),
            Backend::Crun { .. } => None,
        }
    }

    /// The memory of a simulated container.
    pub fn memory(&self) -> Option<&Memory> {
        match &self.backend {
            Backend::Simulated { memory, .. } => Some(memory),
            Backend::Crun { .. } => None,
        }
    }

    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// Wait until the container has stopped (after [`Container::stop`]), at most `limit`.
    pub async fn stopped(&self, limit: Duration) {
        let mut progress = self.log.subscribe();
        let _ = tokio::time::timeout(limit, progress.wait_for(|(_, closed)| *closed)).await;
    }

    pub fn is_running(&self) -> bool {
        !self.stop.is_cancelled()
    }

    /// Killed through its cgroup rather than stopped by the kubelet.
    pub fn killed(&self) -> bool {
        self.killed.load(Ordering::SeqCst)
    }

    /// Log where the container stopped, for tests to compare with a restored copy, also when
    /// the pod object went before its final status could be written (a force deletion).
    pub fn report_end(&self) {
        tracing::info!(
            pod = %format!("{}/{}", self.spec.namespace, self.spec.pod),
            uid = %self.spec.pod_uid,
            container = %self.spec.name,
            last = %self.counter().map(|n| format!("counter={n}")).unwrap_or_default(),
            killed = self.killed(),
            "container ended"
        );
    }

    /// When the ticking task ended (None while running or just stopping).
    pub fn finished_at(&self) -> Option<Timestamp> {
        *self.finished_at.lock().expect("finished lock")
    }
}

pub mod cgroup;
#[cfg(test)]
mod tests;
