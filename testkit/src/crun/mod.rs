//! Real containers: `crun` + CRIU 4 inside the Debian trixie root of `criu/` (entered with
//! `criu/enter.sh`), one `km-shim` supervisor per container (what conmon is to CRI-O).
//!
//! Images named `kube-migrate.test/<name>[:tag]` are local images: `<images-dir>/<name>/rootfs`
//! plus `<images-dir>/<name>/image.json` (`{"entrypoint": [...], "cmd": [...], "env": [...]}`,
//! the parts of an OCI image config a container needs). `criu/images.sh` builds them; no
//! registry is involved for base images. Every other image stays simulated (see `container`).
//!
//! * run: copy the rootfs into a new bundle, write its `config.json`, and start
//!   `km-shim -- enter.sh -- crun run --detach` (the shim gives the container pipes, which
//!   CRIU needs, and reaps it);
//! * checkpoint: `crun checkpoint --leave-running` into `<dir>/checkpoint`, plus `config.dump`,
//!   `spec.dump` (the bundle's config), `rootfs-diff.tar`, tarred in the CRI-O layout;
//! * restore (from an unpacked checkpoint image): a new bundle from the base image named by
//!   `config.dump`, `rootfs-diff.tar` applied, `spec.dump` with this pod's cgroup, then
//!   `km-shim -- enter.sh -- crun restore --detach`;
//! * stop: `crun kill` TERM, then KILL, `crun delete`, and the cgroups removed in every
//!   hierarchy (CRIU also creates them in cgroup2's `unified`, which crun never removes).

use std::{
    io,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use k8s_openapi::jiff::Timestamp;
use serde_json::{Value, json};
use tokio::process::Command;

use crate::checkpoint::{archive_file_name, rfc3339};

mod archive;
mod config;

use archive::{apply_rootfs_diff, tar_dir};
use config::runtime_config;
pub use config::{ConfigDump, ImageConfig, process_args, restored_config};

/// Images under this prefix are local root filesystems run with crun.
pub const LOCAL_IMAGE_PREFIX: &str = "kube-migrate.test/";
/// `config.dump`'s `runtime` for archives made here.
pub const RUNTIME: &str = "crun";
/// Any one crun/CRIU command (a 1 GiB dump or restore takes a few seconds).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(300);
/// After TERM, how long a container gets before KILL.
const TERM_GRACE: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum CrunError {
    #[error("image {image} is not in {dir}")]
    ImageNotFound { image: String, dir: PathBuf },
    #[error("image {image}: {message}")]
    ImageConfig { image: String, message: String },
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error("crun {op} {id} failed: {detail}")]
    Command {
        op: &'static str,
        id: String,
        detail: String,
    },
    #[error("crun {op} {id}: no answer within {} s", COMMAND_TIMEOUT.as_secs())]
    Timeout { op: &'static str, id: String },
    #[error("invalid checkpoint: {0}")]
    Checkpoint(String),
}

impl CrunError {
    /// The waiting reason a kubelet would report.
    pub fn reason(&self) -> &'static str {
        match self {
            CrunError::ImageNotFound { .. } => "ErrImageNeverPull",
            CrunError::ImageConfig { .. } => "CreateContainerConfigError",
            _ => "CreateContainerError",
        }
    }
}

fn io_error(what: impl Into<String>) -> impl FnOnce(io::Error) -> CrunError {
    let what = what.into();
    move |source| CrunError::Io { what, source }
}

/// Where the pieces are.
#[derive(Debug, Clone)]
pub struct CrunConfig {
    /// `criu/enter.sh`
    pub enter: PathBuf,
    /// The `km-shim` binary (built from `criu/km-shim.c`).
    pub shim: PathBuf,
    /// This node's state: crun's `--root`, bundles, logs, checkpoint work directories. Bound
    /// into the CRIU root at the same path, so host and crun see the same paths.
    pub state_dir: PathBuf,
    /// Local images: `<name>/rootfs` and `<name>/image.json`.
    pub images_dir: PathBuf,
    /// First component of every cgroup path of this node (`/<parent>/<pod uid>/<id>`).
    pub cgroup_parent: String,
}

/// The `<name>` of a local image reference (`kube-migrate.test/<name>[:tag|@digest]`).
pub fn local_image_name(image: &str) -> Option<&str> {
    let rest = image.strip_prefix(LOCAL_IMAGE_PREFIX)?;
    let name = rest.split('@').next().unwrap_or(rest);
    let name = name.split(':').next().unwrap_or(name);
    (!name.is_empty() && !name.contains('/') && name != "." && name != "..").then_some(name)
}

/// What to run.
#[derive(Debug, Clone)]
pub struct RunSpec {
    /// The crun container id (unique on this node).
    pub id: String,
    pub pod_uid: String,
    pub namespace: String,
    pub pod: String,
    pub container: String,
    /// The image reference as the pod spec says.
    pub image: String,
    pub command: Vec<String>,
    pub args: Vec<String>,
    /// `NAME=value`, after the image's.
    pub env: Vec<String>,
}

/// One container crun runs, and its files.
#[derive(Debug, Clone)]
pub struct Handle {
    pub id: String,
    /// The base image (`kube-migrate.test/...`), for `config.dump`.
    pub image: String,
    pub bundle: PathBuf,
    /// Everything the container writes, with the shim's own lines (`... km-shim[pid]: ...`).
    pub log: PathBuf,
    /// Written by the shim when the container's init exits.
    pub exit_file: PathBuf,
    pid_file: PathBuf,
    shim_pid_file: PathBuf,
    cgroup: String,
}

impl Handle {
    /// The container's init process (host pid), once crun has written it.
    pub fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(&self.pid_file).ok()?.trim().parse().ok()
    }

    pub fn exited(&self) -> bool {
        self.exit_file.exists()
    }
}

/// A node's crun runtime.
#[derive(Debug, Clone)]
pub struct Crun {
    config: CrunConfig,
}

impl Crun {
    pub fn new(config: CrunConfig) -> Self {
        Self { config }
    }

    fn crun_root(&self) -> PathBuf {
        self.config.state_dir.join("crun")
    }

    /// Is `image` a local image crun runs here?
    pub fn handles(&self, image: &str) -> bool {
        local_image_name(image).is_some()
    }

    /// The rootfs and config of local image `image`.
    pub fn image(&self, image: &str) -> Result<(PathBuf, ImageConfig), CrunError> {
        let not_found = || CrunError::ImageNotFound {
            image: image.to_string(),
            dir: self.config.images_dir.clone(),
        };
        let dir = self
            .config
            .images_dir
            .join(local_image_name(image).ok_or_else(not_found)?);
        let rootfs = dir.join("rootfs");
        if !rootfs.is_dir() {
            return Err(not_found());
        }
        let config = match std::fs::read(dir.join("image.json")) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| CrunError::ImageConfig {
                image: image.to_string(),
                message: format!("image.json: {e}"),
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => ImageConfig::default(),
            Err(e) => return Err(io_error(format!("reading {}/image.json", dir.display()))(e)),
        };
        Ok((rootfs, config))
    }

    fn handle(&self, id: &str, pod_uid: &str, image: &str) -> Handle {
        let run = self.config.state_dir.join("run");
        Handle {
            id: id.to_string(),
            image: image.to_string(),
            bundle: self.config.state_dir.join("bundles").join(id),
            log: self.config.state_dir.join("logs").join(format!("{id}.log")),
            exit_file: run.join(format!("{id}.exit")),
            pid_file: run.join(format!("{id}.pid")),
            shim_pid_file: run.join(format!("{id}.shim")),
            cgroup: format!("/{}/{pod_uid}/{}", self.config.cgroup_parent, &id[..id.len().min(16)]),
        }
    }

    /// `enter.sh -b <state> -- crun --root <state>/crun ARGS...` (not for run/restore, whose
    /// container must not inherit our stdio: those go through the shim).
    async fn crun(&self, op: &'static str, id: &str, args: &[&str]) -> Result<String, CrunError> {
        let mut command = Command::new(&self.config.enter);
        command
            .arg("-b")
            .arg(&self.config.state_dir)
            .args(["--", "crun", "--root"])
            .arg(self.crun_root())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let output = tokio::time::timeout(COMMAND_TIMEOUT, command.output())
            .await
            .map_err(|_| CrunError::Timeout { op, id: id.to_string() })?
            .map_err(io_error(format!("running {}", self.config.enter.display())))?;
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        } else {
            Err(CrunError::Command {
                op,
                id: id.to_string(),
                detail: format!("{}: {}", output.status, String::from_utf8_lossy(&output.stderr).trim()),
            })
        }
    }

    /// Start `crun <op> --detach ...` under a new shim; returns once crun has returned.
    async fn spawn(&self, op: &'static str, handle: &Handle, crun_args: &[&Path]) -> Result<(), CrunError> {
        for dir in [handle.log.parent(), handle.exit_file.parent()].into_iter().flatten() {
            std::fs::create_dir_all(dir).map_err(io_error(format!("creating {}", dir.display())))?;
        }
        let mut command = Command::new(&self.config.shim);
        command
            .arg("-l")
            .arg(&handle.log)
            .arg("-p")
            .arg(&handle.pid_file)
            .arg("-e")
            .arg(&handle.exit_file)
            .arg("-s")
            .arg(&handle.shim_pid_file)
            .arg("--")
            .arg(&self.config.enter)
            .arg("-b")
            .arg(&self.config.state_dir)
            .args(["--", "crun", "--root"])
            .arg(self.crun_root())
            .arg(op)
            .arg("--detach")
            .args(crun_args)
            .arg("--pid-file")
            .arg(&handle.pid_file)
            .arg(&handle.id)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let output = tokio::time::timeout(COMMAND_TIMEOUT, command.output())
            .await
            .map_err(|_| CrunError::Timeout {
                op,
                id: handle.id.clone(),
            })?
            .map_err(io_error(format!("running {}", self.config.shim.display())))?;
        if output.status.success() {
            return Ok(());
        }
        // crun's own error went to the container log (the shim's pipes).
        let log = std::fs::read_to_string(&handle.log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(8).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        let _ = self.remove_cgroups(handle);
        Err(CrunError::Command {
            op,
            id: handle.id.clone(),
            detail: format!(
                "{}: {} | {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim(),
                tail.join(" | ")
            ),
        })
    }

    /// A fresh bundle directory with a copy of `rootfs` (crun creates mount points in it, and
    /// CRIU checks restored executables against it, so every container gets its own copy).
    async fn new_bundle(&self, handle: &Handle, rootfs: &Path) -> Result<(), CrunError> {
        let _ = std::fs::remove_dir_all(&handle.bundle);
        std::fs::create_dir_all(&handle.bundle).map_err(io_error(format!("creating {}", handle.bundle.display())))?;
        let status = Command::new("cp")
            .arg("-a")
            .arg(rootfs)
            .arg(handle.bundle.join("rootfs"))
            .stdin(Stdio::null())
            .status()
            .await
            .map_err(io_error("running cp"))?;
        if !status.success() {
            return Err(CrunError::Io {
                what: format!("copying {} into {}", rootfs.display(), handle.bundle.display()),
                source: io::Error::other(status.to_string()),
            });
        }
        Ok(())
    }

    fn write_config(handle: &Handle, config: &Value) -> Result<(), CrunError> {
        let path = handle.bundle.join("config.json");
        let bytes = serde_json::to_vec_pretty(config).map_err(|e| CrunError::Checkpoint(e.to_string()))?;
        std::fs::write(&path, bytes).map_err(io_error(format!("writing {}", path.display())))
    }

    /// Run a new container.
    pub async fn run(&self, spec: &RunSpec) -> Result<Handle, CrunError> {
        let (rootfs, image) = self.image(&spec.image)?;
        let handle = self.handle(&spec.id, &spec.pod_uid, &spec.image);
        self.new_bundle(&handle, &rootfs).await?;
        Self::write_config(&handle, &runtime_config(spec, &image, &handle.cgroup))?;
        if let Err(e) = self
            .spawn("run", &handle, &[Path::new("--bundle"), &handle.bundle])
            .await
        {
            let _ = std::fs::remove_dir_all(&handle.bundle);
            return Err(e);
        }
        Ok(handle)
    }

    /// Restore a container from an unpacked checkpoint (`dir` holds `config.dump`, `spec.dump`,
    /// `checkpoint/`, `rootfs-diff.tar`). `dir` is consumed: removed once the restore is done.
    pub async fn restore(&self, spec: &RunSpec, dir: &Path) -> Result<Handle, CrunError> {
        let result = self.restore_from(spec, dir).await;
        let _ = std::fs::remove_dir_all(dir);
        result
    }

    async fn restore_from(&self, spec: &RunSpec, dir: &Path) -> Result<Handle, CrunError> {
        let read = |name: &str| -> Result<Value, CrunError> {
            let bytes = std::fs::read(dir.join(name)).map_err(|e| CrunError::Checkpoint(format!("{name}: {e}")))?;
            serde_json::from_slice(&bytes).map_err(|e| CrunError::Checkpoint(format!("{name}: {e}")))
        };
        let config_dump: ConfigDump = serde_json::from_value(read("config.dump")?)
            .map_err(|e| CrunError::Checkpoint(format!("config.dump: {e}")))?;
        if config_dump.runtime != RUNTIME {
            return Err(CrunError::Checkpoint(format!(
                "made by runtime {:?}, not {RUNTIME:?}",
                config_dump.runtime
            )));
        }
        if !dir.join("checkpoint").join("inventory.img").is_file() {
            return Err(CrunError::Checkpoint(
                "no checkpoint/inventory.img (CRIU images)".into(),
            ));
        }
        let spec_dump = read("spec.dump")?;
        let (rootfs, _) = self.image(&config_dump.rootfs_image_name)?;
        let handle = self.handle(&spec.id, &spec.pod_uid, &config_dump.rootfs_image_name);
        self.new_bundle(&handle, &rootfs).await?;
        let result = async {
            apply_rootfs_diff(dir, &handle.bundle.join("rootfs"))?;
            Self::write_config(&handle, &restored_config(&spec_dump, spec, &handle.cgroup)?)?;
            let images = dir.join("checkpoint");
            self.spawn(
                "restore",
                &handle,
                &[
                    Path::new("--bundle"),
                    &handle.bundle,
                    Path::new("--image-path"),
                    &images,
                    Path::new("--work-path"),
                    dir,
                ],
            )
            .await
        }
        .await;
        if let Err(e) = result {
            // restore.log says why CRIU failed.
            if let Ok(log) = std::fs::read_to_string(dir.join("restore.log")) {
                let errors: Vec<&str> = log.lines().filter(|l| l.contains("Error")).take(5).collect();
                tracing::warn!(id = %spec.id, criu = %errors.join(" | "), "crun restore failed");
            }
            let _ = std::fs::remove_dir_all(&handle.bundle);
            return Err(e);
        }
        Ok(handle)
    }

    /// Checkpoint a running container (it keeps running) into a CRI-O-layout archive in
    /// `archive_dir`; returns its path. `created` is when the container started.
    pub async fn checkpoint(
        &self,
        handle: &Handle,
        pod: &str,
        namespace: &str,
        container: &str,
        created: Timestamp,
        archive_dir: &Path,
    ) -> Result<PathBuf, CrunError> {
        let now = Timestamp::now();
        let work = self
            .config
            .state_dir
            .join("checkpoints")
            .join(format!("{}-{}", handle.id, now.as_nanosecond()));
        let images = work.join("checkpoint");
        std::fs::create_dir_all(&images).map_err(io_error(format!("creating {}", images.display())))?;
        let result = async {
            self.crun(
                "checkpoint",
                &handle.id,
                &[
                    "checkpoint",
                    "--leave-running",
                    "--image-path",
                    &images.to_string_lossy(),
                    "--work-path",
                    &work.to_string_lossy(),
                    &handle.id,
                ],
            )
            .await?;
            let config_dump = json!({
                "id": handle.id,
                "name": container,
                "rootfsImage": handle.image,
                "rootfsImageRef": handle.image,
                "rootfsImageName": handle.image,
                "runtime": RUNTIME,
                "createdTime": rfc3339(created),
                "checkpointedTime": rfc3339(now),
            });
            let write = |name: &str, bytes: &[u8]| {
                std::fs::write(work.join(name), bytes).map_err(io_error(format!("writing {name}")))
            };
            write(
                "config.dump",
                &serde_json::to_vec_pretty(&config_dump).unwrap_or_default(),
            )?;
            let spec =
                std::fs::read(handle.bundle.join("config.json")).map_err(io_error("reading the bundle config"))?;
            write("spec.dump", &spec)?;
            // The rootfs is read-only (/tmp is a tmpfs, which CRIU dumps): no changes to carry.
            write("rootfs-diff.tar", &[0u8; 1024])?;
            let name = archive_file_name(pod, namespace, container, now);
            let dir = archive_dir.to_path_buf();
            let work = work.clone();
            tokio::task::spawn_blocking(move || tar_dir(&work, &dir, &name))
                .await
                .map_err(|e| io_error("tar")(io::Error::other(e)))?
        }
        .await;
        let _ = std::fs::remove_dir_all(&work);
        result
    }

    /// Stop and remove a container: TERM, KILL after a moment, `crun delete`, cgroups, bundle.
    pub async fn stop(&self, handle: &Handle) {
        if !handle.exited() {
            let _ = self.crun("kill", &handle.id, &["kill", &handle.id, "TERM"]).await;
            wait_for(|| handle.exited(), TERM_GRACE).await;
        }
        if !handle.exited() {
            let _ = self.crun("kill", &handle.id, &["kill", &handle.id, "KILL"]).await;
            wait_for(|| handle.exited(), Duration::from_secs(5)).await;
        }
        if let Err(error) = self
            .crun("delete", &handle.id, &["delete", "--force", &handle.id])
            .await
        {
            tracing::debug!(id = %handle.id, %error, "crun delete");
        }
        if let Err(error) = self.remove_cgroups(handle) {
            tracing::warn!(id = %handle.id, %error, "could not remove the container's cgroups");
        }
        let _ = std::fs::remove_dir_all(&handle.bundle);
    }

    /// Remove `/sys/fs/cgroup/*/<cgroup path>` and its empty parents up to this node's parent.
    fn remove_cgroups(&self, handle: &Handle) -> io::Result<()> {
        let mut last = Ok(());
        for hierarchy in std::fs::read_dir("/sys/fs/cgroup")?.flatten() {
            let leaf = hierarchy.path().join(handle.cgroup.trim_start_matches('/'));
            if let Err(e) = remove_cgroup_tree(&leaf) {
                last = Err(e);
            }
            // The pod's directory, once its last container is gone.
            if let Some(pod_dir) = leaf.parent() {
                let _ = std::fs::remove_dir(pod_dir);
            }
        }
        last
    }

    /// Remove every container a previous run of this kubelet left (containers are not
    /// re-adopted across restarts), and their cgroups.
    pub async fn clean_up(&self) {
        if let Ok(entries) = std::fs::read_dir(self.crun_root()) {
            for entry in entries.flatten() {
                let id = entry.file_name().to_string_lossy().into_owned();
                let _ = self.crun("kill", &id, &["kill", &id, "KILL"]).await;
                let _ = self.crun("delete", &id, &["delete", "--force", &id]).await;
                tracing::info!(%id, "removed a container left by a previous run");
            }
        }
        if let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") {
            for hierarchy in hierarchies.flatten() {
                let _ = remove_cgroup_tree(&hierarchy.path().join(&self.config.cgroup_parent));
            }
        }
        for dir in ["bundles", "checkpoints", "restore", "run"] {
            let _ = std::fs::remove_dir_all(self.config.state_dir.join(dir));
        }
    }

    /// Where a checkpoint image is unpacked before a restore.
    pub fn restore_dir(&self, id: &str) -> PathBuf {
        self.config.state_dir.join("restore").join(id)
    }
}

async fn wait_for(done: impl Fn() -> bool, limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    while !done() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// rmdir a cgroup directory tree, deepest first (cgroup directories hold only control files,
/// which rmdir takes with them).
fn remove_cgroup_tree(dir: &Path) -> io::Result<()> {
    match std::fs::read_dir(dir) {
        Ok(entries) => {
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    remove_cgroup_tree(&entry.path())?;
                }
            }
            std::fs::remove_dir(dir)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests;
