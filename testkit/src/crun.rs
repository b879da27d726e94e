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
    collections::BTreeMap,
    io,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use k8s_openapi::jiff::Timestamp;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::process::Command;

use crate::checkpoint::{archive_file_name, rfc3339, write_atomically};

/// Images under this prefix are local root filesystems run with crun.
pub const LOCAL_IMAGE_PREFIX: &str = "kube-migrate.test/";
/// `config.dump`'s `runtime` for archives made here.
pub const RUNTIME: &str = "crun";
/// Any one crun/CRIU command (a 1 GiB dump or restore takes a few seconds).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(300);
/// After TERM, how long a container gets before KILL.
const TERM_GRACE: Duration = Duration::from_millis(500);
const PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

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

/// The parts of an OCI image config that `image.json` holds.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ImageConfig {
    #[serde(default)]
    pub entrypoint: Vec<String>,
    #[serde(default)]
    pub cmd: Vec<String>,
    #[serde(default)]
    pub env: Vec<String>,
}

/// The `<name>` of a local image reference (`kube-migrate.test/<name>[:tag|@digest]`).
pub fn local_image_name(image: &str) -> Option<&str> {
    let rest = image.strip_prefix(LOCAL_IMAGE_PREFIX)?;
    let name = rest.split('@').next().unwrap_or(rest);
    let name = name.split(':').next().unwrap_or(name);
    (!name.is_empty() && !name.contains('/') && name != "." && name != "..").then_some(name)
}

/// The process a container runs, by Kubernetes' rules: `command` replaces the entrypoint (and
/// drops the image's cmd), `args` replaces the cmd.
pub fn process_args(image: &ImageConfig, command: &[String], args: &[String]) -> Vec<String> {
    match (command.is_empty(), args.is_empty()) {
        (false, false) => command.iter().chain(args).cloned().collect(),
        (false, true) => command.to_vec(),
        (true, false) => image.entrypoint.iter().chain(args).cloned().collect(),
        (true, true) => image.entrypoint.iter().chain(&image.cmd).cloned().collect(),
    }
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

/// An OCI runtime config for a container of this test kubelet (what `crun spec` gives, with
/// the changes criu/README.md explains: no terminal, a cgroup path per container, a tmpfs
/// `/tmp`, a read-only rootfs, so nothing but CRIU's images carries state).
fn runtime_config(spec: &RunSpec, image: &ImageConfig, cgroup: &str) -> Value {
    let mut env = vec![PATH_ENV.to_string(), "TERM=xterm".to_string()];
    env.extend(image.env.iter().cloned());
    env.extend(spec.env.iter().cloned());
    let caps = json!(["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]);
    json!({
        "ociVersion": "1.0.0",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": process_args(image, &spec.command, &spec.args),
            "env": env,
            "cwd": "/",
            "capabilities": {"bounding": caps, "effective": caps, "inheritable": [], "permitted": caps, "ambient": caps},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs", "readonly": true},
        "hostname": spec.pod,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=1777", "size=16m"]}
        ],
        "annotations": {
            "io.kubernetes.pod.name": spec.pod,
            "io.kubernetes.pod.namespace": spec.namespace,
            "io.kubernetes.pod.uid": spec.pod_uid,
            "io.kubernetes.container.name": spec.container,
            "io.kubernetes.cri-o.ImageName": spec.image,
        },
        "linux": {
            "cgroupsPath": cgroup,
            "namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}],
            "maskedPaths": ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
                            "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware", "/proc/scsi"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
        }
    })
}

/// `spec.dump` made into the config of a restored container: same process, mounts and
/// namespaces (CRIU restores into exactly those), this pod's cgroup and annotations.
pub fn restored_config(spec_dump: &Value, spec: &RunSpec, cgroup: &str) -> Result<Value, CrunError> {
    let mut config = spec_dump.clone();
    if config.get("process").is_none() || config.get("root").is_none() {
        return Err(CrunError::Checkpoint("spec.dump has no process or root".into()));
    }
    config["root"]["path"] = json!("rootfs");
    config["linux"]["cgroupsPath"] = json!(cgroup);
    for (key, value) in [
        ("io.kubernetes.pod.name", &spec.pod),
        ("io.kubernetes.pod.namespace", &spec.namespace),
        ("io.kubernetes.pod.uid", &spec.pod_uid),
        ("io.kubernetes.container.name", &spec.container),
    ] {
        config["annotations"][key] = json!(value);
    }
    Ok(config)
}

/// `config.dump` of a checkpoint (the fields CRI-O writes and kube-migrate reads).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigDump {
    #[serde(default)]
    pub runtime: String,
    #[serde(default)]
    pub rootfs_image_name: String,
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

/// Apply `rootfs-diff.tar` (changed files) and `deleted.files` (a JSON list of paths) of a
/// checkpoint to a fresh copy of the base image's rootfs.
fn apply_rootfs_diff(dir: &Path, rootfs: &Path) -> Result<(), CrunError> {
    let diff = dir.join("rootfs-diff.tar");
    if diff.is_file() {
        let file = std::fs::File::open(&diff).map_err(io_error("opening rootfs-diff.tar"))?;
        let mut archive = tar::Archive::new(file);
        archive.set_preserve_permissions(true);
        // `unpack` refuses entries that would land outside `rootfs` (`..`, absolute paths).
        archive
            .unpack(rootfs)
            .map_err(|e| CrunError::Checkpoint(format!("rootfs-diff.tar: {e}")))?;
    }
    if let Ok(bytes) = std::fs::read(dir.join("deleted.files")) {
        let deleted: Vec<String> =
            serde_json::from_slice(&bytes).map_err(|e| CrunError::Checkpoint(format!("deleted.files: {e}")))?;
        for path in deleted {
            let relative = Path::new(&path).strip_prefix("/").unwrap_or(Path::new(&path));
            if relative
                .components()
                .any(|c| !matches!(c, std::path::Component::Normal(_)))
            {
                return Err(CrunError::Checkpoint(format!("deleted.files: invalid path {path:?}")));
            }
            let _ = std::fs::remove_file(rootfs.join(relative));
        }
    }
    Ok(())
}

/// Tar the contents of `work` (entries at the archive root, uncompressed, as the kubelet
/// leaves them) into `dir/name`, atomically, readable by the owner only.
fn tar_dir(work: &Path, dir: &Path, name: &str) -> Result<PathBuf, CrunError> {
    std::fs::create_dir_all(dir).map_err(io_error(format!("creating {}", dir.display())))?;
    let path = dir.join(name);
    write_atomically(&path, |out| {
        let mut tar = tar::Builder::new(out);
        tar.follow_symlinks(false);
        let mut entries: BTreeMap<String, PathBuf> = BTreeMap::new();
        for entry in std::fs::read_dir(work)? {
            let entry = entry?;
            entries.insert(entry.file_name().to_string_lossy().into_owned(), entry.path());
        }
        for (name, path) in entries {
            if path.is_dir() {
                tar.append_dir_all(&name, &path)?;
            } else {
                tar.append_path_with_name(&path, &name)?;
            }
        }
        tar.finish()
    })
    .map_err(|source| CrunError::Io {
        what: format!("writing {}", path.display()),
        source,
    })?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> RunSpec {
        RunSpec {
            id: "0123456789abcdef0123".into(),
            pod_uid: "uid-1".into(),
            namespace: "ns".into(),
            pod: "counter-0".into(),
            container: "app".into(),
            image: "kube-migrate.test/counter:1".into(),
            command: vec![],
            args: vec![],
            env: vec!["START=5".into()],
        }
    }

    #[test]
    fn local_image_names() {
        assert_eq!(local_image_name("kube-migrate.test/counter"), Some("counter"));
        assert_eq!(local_image_name("kube-migrate.test/memory:1"), Some("memory"));
        assert_eq!(local_image_name("kube-migrate.test/memory@sha256:ab"), Some("memory"));
        assert_eq!(local_image_name("kube-migrate.test/a/b"), None);
        assert_eq!(local_image_name("kube-migrate.test/.."), None);
        assert_eq!(local_image_name("registry.local/counter:1"), None);
    }

    #[test]
    fn process_args_follow_kubernetes_rules() {
        let image = ImageConfig {
            entrypoint: vec!["/bin/sh".into()],
            cmd: vec!["/counter.sh".into()],
            env: vec![],
        };
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(process_args(&image, &[], &[]), s(&["/bin/sh", "/counter.sh"]));
        assert_eq!(process_args(&image, &[], &s(&["-c", "x"])), s(&["/bin/sh", "-c", "x"]));
        assert_eq!(process_args(&image, &s(&["/bin/memhog"]), &[]), s(&["/bin/memhog"]));
        assert_eq!(
            process_args(&image, &s(&["/bin/echo"]), &s(&["hi"])),
            s(&["/bin/echo", "hi"])
        );
    }

    #[test]
    fn runtime_config_is_checkpointable() {
        let image = ImageConfig {
            entrypoint: vec!["/bin/sh".into(), "/counter.sh".into()],
            cmd: vec![],
            env: vec!["A=1".into()],
        };
        let c = runtime_config(&spec(), &image, "/km-node-a/uid-1/0123");
        assert_eq!(
            c["process"]["terminal"], false,
            "CRIU cannot dump a pty without a console socket"
        );
        assert_eq!(c["root"]["readonly"], true);
        assert_eq!(c["linux"]["cgroupsPath"], "/km-node-a/uid-1/0123");
        let env: Vec<&str> = c["process"]["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert!(env.starts_with(&[PATH_ENV]));
        assert!(env.ends_with(&["A=1", "START=5"]), "pod env after image env: {env:?}");
        assert!(
            c["mounts"]
                .as_array()
                .unwrap()
                .iter()
                .any(|m| m["destination"] == "/tmp")
        );
    }

    #[test]
    fn restored_config_takes_the_new_pods_cgroup_and_identity() {
        let dump = runtime_config(&spec(), &ImageConfig::default(), "/km-node-a/uid-1/0123");
        let mut target = spec();
        target.pod_uid = "uid-2".into();
        target.pod = "counter-1".into();
        let c = restored_config(&dump, &target, "/km-node-b/uid-2/4567").unwrap();
        assert_eq!(c["linux"]["cgroupsPath"], "/km-node-b/uid-2/4567");
        assert_eq!(c["annotations"]["io.kubernetes.pod.uid"], "uid-2");
        assert_eq!(
            c["process"], dump["process"],
            "the process is CRIU's to restore, unchanged"
        );
        assert!(restored_config(&json!({}), &target, "/x").is_err());
    }

    #[test]
    fn archives_have_entries_at_the_root() {
        let work = tempfile::tempdir().unwrap();
        let out = tempfile::tempdir().unwrap();
        std::fs::create_dir(work.path().join("checkpoint")).unwrap();
        std::fs::write(work.path().join("checkpoint/inventory.img"), b"inv").unwrap();
        std::fs::write(work.path().join("config.dump"), b"{}").unwrap();
        let path = tar_dir(work.path(), out.path(), "a.tar").unwrap();
        let mut names: Vec<String> = tar::Archive::new(std::fs::File::open(&path).unwrap())
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["checkpoint/", "checkpoint/inventory.img", "config.dump"]);
        assert!(!out.path().join(".a.tar.tmp").exists());
    }

    #[test]
    fn rootfs_diff_is_applied_and_deleted_files_removed() {
        let dir = tempfile::tempdir().unwrap();
        let rootfs = tempfile::tempdir().unwrap();
        std::fs::write(rootfs.path().join("old"), b"x").unwrap();
        let mut tar = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(3);
        h.set_mode(0o644);
        tar.append_data(&mut h, "etc/new", &b"new"[..]).unwrap();
        std::fs::write(dir.path().join("rootfs-diff.tar"), tar.into_inner().unwrap()).unwrap();
        std::fs::write(dir.path().join("deleted.files"), br#"["/old"]"#).unwrap();
        apply_rootfs_diff(dir.path(), rootfs.path()).unwrap();
        assert_eq!(std::fs::read(rootfs.path().join("etc/new")).unwrap(), b"new");
        assert!(!rootfs.path().join("old").exists());
        std::fs::write(dir.path().join("deleted.files"), br#"["/../../etc/passwd"]"#).unwrap();
        assert!(apply_rootfs_diff(dir.path(), rootfs.path()).is_err());
    }
}
