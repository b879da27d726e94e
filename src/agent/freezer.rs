//! Freezing a source container's cgroup around its checkpoint, so that it never executes after
//! the checkpoint, and either killing it (state verified elsewhere) or thawing it (rollback).
//!
//! Works on both cgroup layouts: v1 (`<root>/freezer/.../freezer.state`, `FROZEN`/`THAWED`)
//! and v2 (`<root>/.../cgroup.freeze` + `cgroup.events`, `cgroup.kill`). A container's cgroup is
//! found by its runtime ID in the directory name, whatever the cgroup driver
//! (`crio-<id>`, `crio-<id>.scope`, `cri-containerd-<id>.scope`, `<id>`).
//!
//! Each frozen container has a *hold file* `<holds>/<container id>` (JSON: migration, cgroup,
//! expiry). It is the contract with the node's runtime wrapper (`deploy/node/crun-hold`): CRI-O
//! resumes every container after its checkpoint, and the wrapper turns that resume into a no-op
//! while the hold file exists. The hold files also survive an agent restart, so a rollback
//! after a restart still finds what to thaw, and an expired hold is thawed by the agent itself
//! (the controller vanished: the workload must not stay frozen for ever).

use std::{
    io,
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum FreezeError {
    #[error("invalid container id {0:?}")]
    InvalidId(String),
    #[error("no cgroup for container {id} under {root}")]
    NotFound { id: String, root: PathBuf },
    #[error("cgroup {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("cgroup {0} did not freeze within {1:?}")]
    Timeout(PathBuf, Duration),
    /// Killing was asked for a container that is not held but still runs: it was thawed
    /// (hold expired, or an operator), so it executed after its checkpoint.
    #[error("container {0} is running and no longer held: it ran after its checkpoint")]
    NotHeld(String),
    #[error("corrupt hold file {path}: {source}")]
    Hold { path: PathBuf, source: serde_json::Error },
}

impl FreezeError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            FreezeError::InvalidId(_) => "bad_request",
            FreezeError::NotFound { .. } => "freeze_unavailable",
            FreezeError::Io { .. } | FreezeError::Hold { .. } => "freeze_io",
            FreezeError::Timeout(..) => "freeze_timeout",
            FreezeError::NotHeld(_) => "not_held",
        }
    }
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> FreezeError + '_ {
    move |source| FreezeError::Io {
        path: path.to_owned(),
        source,
    }
}

/// How long a freeze may take before it is undone and reported (v1 passes through FREEZING
/// while tasks reach a safe point; a task stuck in D state keeps it there).
const FREEZE_TIMEOUT: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(1);
/// Deepest cgroup searched (kubepods.slice/…-burstable.slice/…-pod<uid>.slice/crio-<id>.scope
/// is 4 below the root; the test kubelet's layout is 3).
const MAX_DEPTH: usize = 8;

/// What a hold file records.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Hold {
    pub migration: String,
    pub cgroup: PathBuf,
    /// Seconds since the epoch after which the agent thaws the container by itself.
    pub expires_unix: u64,
}

#[derive(Debug, Clone)]
pub struct Freezer {
    /// The cgroup file system root, normally `/sys/fs/cgroup`.
    root: PathBuf,
    /// Directory of hold files, shared with the runtime wrapper.
    holds: PathBuf,
}

/// `cri-o://abc…` → `abc…`; only lowercase hex IDs are accepted (they go into paths).
pub fn bare_id(id: &str) -> Result<&str, FreezeError> {
    let bare = id.rsplit("://").next().unwrap_or(id);
    if bare.len() < 12 || bare.len() > 128 || !bare.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return Err(FreezeError::InvalidId(id.to_string()));
    }
    Ok(bare)
}

fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn is_v1(cgroup: &Path) -> bool {
    cgroup.join("freezer.state").exists()
}

fn read_trimmed(path: &Path) -> Result<String, FreezeError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(io_at(path))
}

fn write(path: &Path, value: &str) -> Result<(), FreezeError> {
    std::fs::write(path, value).map_err(io_at(path))
}

/// Whether the cgroup is frozen now (v1: `FROZEN`, not `FREEZING`; v2: `frozen 1` in events).
pub fn is_frozen(cgroup: &Path) -> Result<bool, FreezeError> {
    if is_v1(cgroup) {
        return Ok(read_trimmed(&cgroup.join("freezer.state"))? == "FROZEN");
    }
    let events = read_trimmed(&cgroup.join("cgroup.events"))?;
    Ok(events.lines().any(|l| l.trim() == "frozen 1"))
}

fn set_frozen(cgroup: &Path, frozen: bool) -> Result<(), FreezeError> {
    if is_v1(cgroup) {
        write(&cgroup.join("freezer.state"), if frozen { "FROZEN" } else { "THAWED" })
    } else {
        write(&cgroup.join("cgroup.freeze"), if frozen { "1" } else { "0" })
    }
}

impl Freezer {
    pub fn new(root: impl Into<PathBuf>, holds: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            holds: holds.into(),
        }
    }

    /// Where to search: the freezer hierarchy on v1 (hybrid included), the unified root on v2.
    fn hierarchy(&self) -> PathBuf {
        let v1 = self.root.join("freezer");
        if v1.is_dir() { v1 } else { self.root.clone() }
    }

    /// The cgroup directory of container `id` (breadth first; conmon's own cgroup is skipped).
    pub fn find(&self, id: &str) -> Result<PathBuf, FreezeError> {
        let bare = bare_id(id)?;
        let top = self.hierarchy();
        let mut level = vec![top.clone()];
        for _ in 0..MAX_DEPTH {
            let mut next = Vec::new();
            for dir in level {
                let Ok(entries) = std::fs::read_dir(&dir) else { continue };
                for entry in entries.flatten() {
                    if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                        continue;
                    }
                    let name = entry.file_name();
                    let name = name.to_string_lossy();
                    let path = entry.path();
                    if name.contains(bare)
                        && !name.contains("conmon")
                        && (path.join("freezer.state").exists() || path.join("cgroup.freeze").exists())
                    {
                        return Ok(path);
                    }
                    next.push(path);
                }
            }
            if next.is_empty() {
                break;
            }
            level = next;
        }
        Err(FreezeError::NotFound {
            id: bare.to_string(),
            root: top,
        })
    }

    fn hold_path(&self, bare: &str) -> PathBuf {
        self.holds.join(bare)
    }

    /// Freeze container `id` for `migration`, holding it for `hold_for`: the hold file is
    /// written first (the runtime's resume must find it), then the cgroup frozen and waited
    /// for. Idempotent. On failure nothing stays frozen or held.
    pub fn freeze(&self, migration: &str, id: &str, hold_for: Duration) -> Result<PathBuf, FreezeError> {
        let bare = bare_id(id)?;
        let cgroup = self.find(id)?;
        let hold = Hold {
            migration: migration.to_string(),
            cgroup: cgroup.clone(),
            expires_unix: now_unix() + hold_for.as_secs(),
        };
        super::private::dir_all(&self.holds).map_err(io_at(&self.holds))?;
        let path = self.hold_path(bare);
        super::private::write_atomic(&path, &serde_json::to_vec(&hold).unwrap_or_default()).map_err(io_at(&path))?;
        let result = set_frozen(&cgroup, true).and_then(|()| wait_frozen(&cgroup));
        if let Err(e) = result {
            let _ = set_frozen(&cgroup, false);
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        Ok(cgroup)
    }

    /// The hold of container `id`, if any.
    pub fn hold(&self, id: &str) -> Result<Option<Hold>, FreezeError> {
        let path = self.hold_path(bare_id(id)?);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| FreezeError::Hold { path, source }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_at(&path)(e)),
        }
    }

    /// Resume container `id`: drop its hold, then thaw. Idempotent (a container never frozen,
    /// or already gone, is fine).
    pub fn thaw(&self, id: &str) -> Result<(), FreezeError> {
        let bare = bare_id(id)?;
        let cgroup = match self.hold(id)? {
            Some(h) => Some(h.cgroup),
            None => self.find(id).ok(),
        };
        let path = self.hold_path(bare);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_at(&path)(e)),
        }
        match cgroup {
            Some(c) if c.exists() => set_frozen(&c, false),
            _ => Ok(()),
        }
    }

    /// Kill frozen container `id` for good: every task gets SIGKILL (v2: `cgroup.kill`), then
    /// the cgroup is thawed so the signal is delivered (a frozen task never dies), and the hold
    /// dropped. The caller deletes the pod first: otherwise the kubelet restarts the container.
    pub fn kill(&self, id: &str) -> Result<(), FreezeError> {
        let cgroup = match self.hold(id)? {
            Some(h) => Some(h.cgroup),
            None => self.find(id).ok(),
        };
        self.kill_at(bare_id(id)?, cgroup)
    }

    fn kill_at(&self, bare: &str, cgroup: Option<PathBuf>) -> Result<(), FreezeError> {
        if let Some(cgroup) = cgroup.filter(|c| c.exists()) {
            if is_v1(&cgroup) {
                let procs = cgroup.join("cgroup.procs");
                for pid in read_trimmed(&procs)?
                    .lines()
                    .filter_map(|l| l.trim().parse::<i32>().ok())
                {
                    if let Some(pid) = rustix::process::Pid::from_raw(pid) {
                        // Gone already is fine.
                        let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
                    }
                }
            } else {
                write(&cgroup.join("cgroup.kill"), "1")?;
            }
            set_frozen(&cgroup, false)?;
        }
        match std::fs::remove_file(self.hold_path(bare)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_at(&self.hold_path(bare))(e)),
            _ => Ok(()),
        }
    }

    /// [`Freezer::kill`] for the stop after a verified transfer: a container without a hold
    /// must already be dead (killed before: a retry), never running.
    pub fn kill_held(&self, id: &str) -> Result<(), FreezeError> {
        if let Some(hold) = self.hold(id)? {
            return self.kill_at(bare_id(id)?, Some(hold.cgroup));
        }
        let running = match self.find(id) {
            Ok(cgroup) => std::fs::read_to_string(cgroup.join("cgroup.procs")).is_ok_and(|p| !p.trim().is_empty()),
            Err(_) => false,
        };
        if running {
            return Err(FreezeError::NotHeld(bare_id(id)?.to_string()));
        }
        Ok(())
    }

    /// Whether a killed container's tasks are all gone: its cgroup removed, or no process left
    /// in it. Waits up to `within` (SIGKILL lands once the cgroup is thawed, and exit takes a
    /// moment for a large address space). False means "not seen gone", never "running".
    pub fn gone(&self, id: &str, within: Duration) -> bool {
        let started = Instant::now();
        let cgroup = match self.find(id) {
            Ok(cgroup) => cgroup,
            Err(FreezeError::NotFound { .. }) => return true,
            Err(_) => return false,
        };
        loop {
            // A removed cgroup has no tasks; a listed one still has some (zombies included).
            match std::fs::read_to_string(cgroup.join("cgroup.procs")) {
                Ok(procs) if procs.trim().is_empty() => return true,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return true,
                _ => {}
            }
            if started.elapsed() >= within {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Thaw every container whose hold has expired; returns their IDs.
    pub fn thaw_expired(&self) -> Vec<String> {
        let now = now_unix();
        let mut thawed = Vec::new();
        for entry in std::fs::read_dir(&self.holds).into_iter().flatten().flatten() {
            let id = entry.file_name().to_string_lossy().into_owned();
            let expired = match self.hold(&id) {
                Ok(Some(h)) => h.expires_unix <= now,
                Ok(None) => false,
                Err(_) => true, // unreadable: never leave a container frozen over it
            };
            if expired {
                match self.thaw(&id) {
                    Ok(()) => thawed.push(id),
                    Err(e) => tracing::warn!(container = %id, error = %e, "thawing an expired hold failed"),
                }
            }
        }
        thawed
    }
}

fn wait_frozen(cgroup: &Path) -> Result<(), FreezeError> {
    let started = Instant::now();
    loop {
        if is_frozen(cgroup)? {
            return Ok(());
        }
        if started.elapsed() > FREEZE_TIMEOUT {
            return Err(FreezeError::Timeout(cgroup.to_owned(), FREEZE_TIMEOUT));
        }
        std::thread::sleep(POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    /// A v1 freezer hierarchy: freezer.state reads back what was written, as the kernel's does
    /// once every task reached the refrigerator.
    fn v1(root: &Path) -> PathBuf {
        let c = root.join(format!("freezer/kubepods/besteffort/podx/crio-{ID}"));
        std::fs::create_dir_all(&c).unwrap();
        std::fs::create_dir_all(root.join(format!("freezer/kubepods/besteffort/podx/crio-conmon-{ID}"))).unwrap();
        std::fs::write(c.join("freezer.state"), "THAWED\n").unwrap();
        std::fs::write(c.join("cgroup.procs"), "").unwrap();
        c
    }

    #[test]
    fn ids_are_bare_lowercase_hex() {
        assert_eq!(bare_id(&format!("cri-o://{ID}")).unwrap(), ID);
        assert!(bare_id("cri-o://../../etc").is_err());
        assert!(bare_id("abc").is_err());
        assert!(bare_id(&ID.to_uppercase()).is_err());
    }

    #[test]
    fn finds_the_container_not_conmon_on_v1_and_v2() {
        let dir = tempfile::tempdir().unwrap();
        let c = v1(dir.path());
        let f = Freezer::new(dir.path(), dir.path().join("holds"));
        assert_eq!(f.find(&format!("cri-o://{ID}")).unwrap(), c);

        let dir2 = tempfile::tempdir().unwrap();
        let c2 = dir2
            .path()
            .join(format!("kubepods.slice/kubepods-pod1.slice/crio-{ID}.scope"));
        std::fs::create_dir_all(&c2).unwrap();
        std::fs::write(c2.join("cgroup.freeze"), "0").unwrap();
        let f2 = Freezer::new(dir2.path(), dir2.path().join("holds"));
        assert_eq!(f2.find(ID).unwrap(), c2);
        assert!(matches!(
            f2.find("fedcba9876543210").unwrap_err(),
            FreezeError::NotFound { .. }
        ));
    }

    #[test]
    fn freeze_holds_then_thaw_releases() {
        let dir = tempfile::tempdir().unwrap();
        let c = v1(dir.path());
        let f = Freezer::new(dir.path(), dir.path().join("holds"));
        f.freeze("m1", ID, Duration::from_secs(60)).unwrap();
        assert_eq!(std::fs::read_to_string(c.join("freezer.state")).unwrap(), "FROZEN");
        let hold = f.hold(ID).unwrap().expect("hold file");
        assert_eq!((hold.migration.as_str(), hold.cgroup.as_path()), ("m1", c.as_path()));
        f.thaw(ID).unwrap();
        assert_eq!(std::fs::read_to_string(c.join("freezer.state")).unwrap(), "THAWED");
        assert!(f.hold(ID).unwrap().is_none());
        f.thaw(ID).unwrap(); // idempotent
    }

    #[test]
    fn a_freeze_that_never_completes_is_undone() {
        let dir = tempfile::tempdir().unwrap();
        let c = dir.path().join(format!("pod/{ID}"));
        std::fs::create_dir_all(&c).unwrap();
        std::fs::write(c.join("cgroup.freeze"), "0").unwrap();
        // cgroup.events never says "frozen 1" (a task that cannot be frozen).
        std::fs::write(c.join("cgroup.events"), "populated 1\nfrozen 0\n").unwrap();
        let f = Freezer::new(dir.path(), dir.path().join("holds"));
        let err = f.freeze("m", ID, Duration::from_secs(60)).unwrap_err();
        assert!(matches!(err, FreezeError::Timeout(..)), "{err}");
        assert_eq!(std::fs::read_to_string(c.join("cgroup.freeze")).unwrap(), "0");
        assert!(f.hold(ID).unwrap().is_none());
    }

    #[test]
    fn kill_signals_v2_before_thawing_and_expired_holds_thaw() {
        let dir = tempfile::tempdir().unwrap();
        let c = dir.path().join(format!("pod/testkit-{ID}"));
        std::fs::create_dir_all(&c).unwrap();
        std::fs::write(c.join("cgroup.freeze"), "0").unwrap();
        std::fs::write(c.join("cgroup.events"), "frozen 1\n").unwrap();
        std::fs::write(c.join("cgroup.kill"), "").unwrap();
        let f = Freezer::new(dir.path(), dir.path().join("holds"));
        f.freeze("m", ID, Duration::from_secs(60)).unwrap();
        f.kill(ID).unwrap();
        assert_eq!(std::fs::read_to_string(c.join("cgroup.kill")).unwrap(), "1");
        assert_eq!(std::fs::read_to_string(c.join("cgroup.freeze")).unwrap(), "0");
        assert!(f.hold(ID).unwrap().is_none());

        // No task listed: gone; a task left: not seen gone within the wait.
        assert!(f.gone(ID, Duration::ZERO));
        std::fs::write(c.join("cgroup.procs"), "4242\n").unwrap();
        assert!(!f.gone(ID, Duration::from_millis(20)));
        std::fs::write(c.join("cgroup.procs"), "").unwrap();

        f.freeze("m", ID, Duration::ZERO).unwrap();
        assert_eq!(f.thaw_expired(), vec![ID.to_string()]);
        assert_eq!(std::fs::read_to_string(c.join("cgroup.freeze")).unwrap(), "0");
    }
}
