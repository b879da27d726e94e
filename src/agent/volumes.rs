//! emptyDir contents that move with the pod (disk and `medium: Memory` alike).
//!
//! Both sides reach a pod's volume through a container that mounts it, as
//! `/proc/<pid>/root/<mount path>` (the agent runs with the host's PID namespace): that is the
//! volume the container sees, tmpfs included, wherever the kubelet keeps its pods and whatever
//! the mount propagation of the agent's own mounts. The source packs each volume from a
//! container frozen for its checkpoint, so the files match the memory image. The target
//! unpacks them through kube-migrate's restore init container (added to every replacement
//! with emptyDirs, see `replacement::add_restore_helper`), which mounts each emptyDir at
//! `/kube-migrate/volumes/<name>` and waits for the marker written last: the pod's own
//! containers start, and are restored, only once their volumes hold what they held.

use std::{
    fs::File,
    io::{self, BufWriter, Write},
    os::unix::fs::FileTypeExt,
    path::{Path, PathBuf},
};

use sha2::{Digest, Sha256};

use super::{api, freezer::Freezer, private};

/// Where the restore init container mounts the emptyDirs and the marker volume.
pub const HELPER_VOLUMES_DIR: &str = "/kube-migrate/volumes";
pub const HELPER_MARKER_DIR: &str = "/kube-migrate/restore";

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("invalid {what} {value:?}")]
    Invalid { what: &'static str, value: String },
    #[error("no process in the cgroup of container {0} (not running?)")]
    NoProcess(String),
    #[error("container cgroup: {0}")]
    Cgroup(String),
    #[error("emptyDir {volume}: {path} is not a directory (mount path {mount_path:?})")]
    NotMounted {
        volume: String,
        mount_path: String,
        path: PathBuf,
    },
    #[error("emptyDir {volume}: {path}: {source}")]
    Io {
        volume: String,
        path: PathBuf,
        source: io::Error,
    },
}

impl VolumeError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            VolumeError::Invalid { .. } => "invalid_request",
            VolumeError::NoProcess(_) | VolumeError::Cgroup(_) => "volume_container",
            VolumeError::NotMounted { .. } => "volume_not_mounted",
            VolumeError::Io { .. } => "volume_io",
        }
    }

    /// The container may not be running yet (the target's init container is being started).
    pub fn may_pass(&self) -> bool {
        matches!(self, VolumeError::NoProcess(_) | VolumeError::Cgroup(_))
    }
}

/// Finds containers' root file systems as the host sees them.
#[derive(Debug, Clone)]
pub struct ContainerRoots {
    /// The host's `/proc` (another directory in tests).
    pub proc_dir: PathBuf,
    pub unpacker: Unpacker,
}

/// How the target agent unpacks into a container's volume.
#[derive(Debug, Clone)]
pub enum Unpacker {
    /// A child of this program (`kube-migrate-agent unpack-volume`) that chroots into the
    /// container's root first. `/proc/<pid>/root` is a magic link: path canonicalization (the
    /// `tar` crate's containment check) reads it as the agent's own `/` (met on real nodes:
    /// "No such file or directory while canonicalizing /proc/<pid>/root/..."), and an absolute
    /// symlink in the volume would resolve in the agent's file system. Inside the chroot both
    /// resolve in the container.
    Chrooted(PathBuf),
    /// In this process, into the path as given: for tests, whose container roots are plain
    /// directories.
    InProcess,
}

impl Unpacker {
    /// Unpack the tar at `tar_path` into `dir` (absolute, as the container sees it) of the
    /// container whose root is `root`.
    pub fn unpack(&self, volume: &str, tar_path: &Path, root: &Path, dir: &str) -> Result<(), VolumeError> {
        let target = inside(root, dir)?;
        match self {
            Unpacker::InProcess => unpack(volume, tar_path, &target),
            Unpacker::Chrooted(program) => {
                let io = |source| VolumeError::Io {
                    volume: volume.to_string(),
                    path: target.clone(),
                    source,
                };
                let tar = File::open(tar_path).map_err(|source| VolumeError::Io {
                    volume: volume.to_string(),
                    path: tar_path.to_owned(),
                    source,
                })?;
                let out = std::process::Command::new(program)
                    .arg("unpack-volume")
                    .arg("--root")
                    .arg(root)
                    .arg("--dir")
                    .arg(dir)
                    .arg("--volume")
                    .arg(volume)
                    .stdin(tar)
                    .stdout(std::process::Stdio::null())
                    .output()
                    .map_err(io)?;
                if out.status.success() {
                    Ok(())
                } else {
                    Err(io(io::Error::other(
                        String::from_utf8_lossy(&out.stderr).trim().to_string(),
                    )))
                }
            }
        }
    }
}

impl ContainerRoots {
    /// `/proc/<pid>/root` of the first process in container `id`'s cgroup.
    pub fn root_of(&self, freezer: &Freezer, id: &str) -> Result<PathBuf, VolumeError> {
        let cgroup = freezer.find(id).map_err(|e| VolumeError::Cgroup(e.to_string()))?;
        let procs = cgroup.join("cgroup.procs");
        let pids =
            std::fs::read_to_string(&procs).map_err(|e| VolumeError::Cgroup(format!("{}: {e}", procs.display())))?;
        let pid = pids
            .lines()
            .find_map(|l| l.trim().parse::<u32>().ok())
            .ok_or_else(|| VolumeError::NoProcess(id.to_string()))?;
        Ok(self.proc_dir.join(pid.to_string()).join("root"))
    }
}

/// `root` joined with an absolute container path, refusing anything but plain components.
pub fn inside(root: &Path, container_path: &str) -> Result<PathBuf, VolumeError> {
    let rel = Path::new(container_path);
    let plain = rel.is_absolute()
        && rel.components().count() > 1
        && rel
            .components()
            .skip(1)
            .all(|c| matches!(c, std::path::Component::Normal(_)));
    if !plain {
        return Err(VolumeError::Invalid {
            what: "mount path",
            value: container_path.to_string(),
        });
    }
    Ok(root.join(rel.strip_prefix("/").unwrap_or(rel)))
}

/// A writer that hashes and counts what it writes.
struct Hashing<W> {
    inner: W,
    hasher: Sha256,
    count: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// What [`pack`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packed {
    pub digest: String,
    pub size: u64,
    pub files: usize,
    /// Sockets and FIFOs: they hold no data at rest and cannot be recreated by unpacking.
    pub skipped: Vec<String>,
}

/// Pack the directory `dir` (a mounted emptyDir) into `out` (`0600`, fsynced): regular files,
/// directories and symlinks (never followed) with their modes, owners and times, names
/// relative to `dir`.
pub fn pack(volume: &str, dir: &Path, out: &Path) -> Result<Packed, VolumeError> {
    let io = |path: &Path| {
        let volume = volume.to_string();
        let path = path.to_owned();
        move |source| VolumeError::Io { volume, path, source }
    };
    let meta = std::fs::symlink_metadata(dir).map_err(io(dir))?;
    if !meta.is_dir() {
        return Err(VolumeError::Io {
            volume: volume.to_string(),
            path: dir.to_owned(),
            source: io::Error::other("not a directory"),
        });
    }
    let file = private::create(out).map_err(io(out))?;
    let mut builder = tar::Builder::new(Hashing {
        inner: BufWriter::with_capacity(1 << 20, file),
        hasher: Sha256::new(),
        count: 0,
    });
    builder.follow_symlinks(false);
    builder.mode(tar::HeaderMode::Complete);
    let mut packed = Packed {
        digest: String::new(),
        size: 0,
        files: 0,
        skipped: Vec::new(),
    };
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let here = dir.join(&rel);
        let mut entries: Vec<_> = std::fs::read_dir(&here)
            .map_err(io(&here))?
            .collect::<Result<_, _>>()
            .map_err(io(&here))?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let name = rel.join(entry.file_name());
            let path = entry.path();
            let kind = entry.file_type().map_err(io(&path))?;
            if kind.is_socket() || kind.is_fifo() || kind.is_block_device() || kind.is_char_device() {
                packed.skipped.push(name.display().to_string());
                continue;
            }
            builder.append_path_with_name(&path, &name).map_err(io(&path))?;
            packed.files += 1;
            if kind.is_dir() {
                stack.push(name);
            }
        }
    }
    let hashing = builder.into_inner().map_err(io(out))?;
    let file = hashing.inner.into_inner().map_err(|e| VolumeError::Io {
        volume: volume.to_string(),
        path: out.to_owned(),
        source: e.into_error(),
    })?;
    file.sync_all().map_err(io(out))?;
    packed.digest = format!("sha256:{}", hex::encode(hashing.hasher.finalize()));
    packed.size = hashing.count;
    Ok(packed)
}

/// Unpack a received (validated) volume tar into `dir`, keeping modes, owners and times.
/// Existing files of the same names are replaced: what the replacement's own init containers
/// wrote is superseded by the source's state.
pub fn unpack(volume: &str, tar_path: &Path, dir: &Path) -> Result<(), VolumeError> {
    let file = File::open(tar_path).map_err(|source| VolumeError::Io {
        volume: volume.to_string(),
        path: tar_path.to_owned(),
        source,
    })?;
    unpack_from(volume, file, dir)
}

/// [`unpack`] from a reader (the chrooted child reads the tar on its stdin, opened before the
/// chroot).
pub fn unpack_from(volume: &str, tar: impl io::Read, dir: &Path) -> Result<(), VolumeError> {
    let io = |path: &Path| {
        let volume = volume.to_string();
        let path = path.to_owned();
        move |source| VolumeError::Io { volume, path, source }
    };
    if !std::fs::symlink_metadata(dir).map_err(io(dir))?.is_dir() {
        return Err(VolumeError::NotMounted {
            volume: volume.to_string(),
            mount_path: format!("{HELPER_VOLUMES_DIR}/{volume}"),
            path: dir.to_owned(),
        });
    }
    let mut archive = tar::Archive::new(io::BufReader::with_capacity(1 << 20, tar));
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_preserve_mtime(true);
    archive.set_overwrite(true);
    // `unpack` refuses entries that would land outside `dir` (`..`, links through symlinks).
    // Its errors wrap their cause: keep the whole chain in the message.
    archive.unpack(dir).map_err(|e| {
        let mut why = e.to_string();
        let mut cause = std::error::Error::source(&e);
        while let Some(c) = cause {
            why.push_str(&format!(": {c}"));
            cause = c.source();
        }
        io(dir)(io::Error::new(e.kind(), why))
    })?;
    sync_tree(dir).map_err(io(dir))
}

/// fsync every regular file and directory under `dir` (a disk emptyDir must hold its
/// contents through a node crash once the marker says they are in place).
fn sync_tree(dir: &Path) -> io::Result<()> {
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                stack.push(entry.path());
            } else if kind.is_file() {
                File::open(entry.path())?.sync_all()?;
            }
        }
        File::open(&d)?.sync_all()?;
    }
    Ok(())
}

/// Write the marker the restore init container waits for (atomically: it must never see a
/// partial one). Readable by the init container's unprivileged user.
pub fn release(marker_dir: &Path, migration: &str) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let tmp = marker_dir.join(format!(".{}.tmp", api::RESTORED_MARKER));
    std::fs::write(&tmp, migration.as_bytes())?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))?;
    std::fs::rename(&tmp, marker_dir.join(api::RESTORED_MARKER))
}

/// Whether the marker is there already.
pub fn released(marker_dir: &Path) -> bool {
    marker_dir.join(api::RESTORED_MARKER).exists()
}

/// The restore init container's program (`kube-migrate-agent await-restore`): wait until
/// `marker` exists, then exit 0 so the pod's containers start. Exits 1 after `timeout`
/// (the kubelet restarts it; the controller's restore deadline decides the migration).
pub fn await_marker(marker: &Path, timeout: std::time::Duration) -> bool {
    let until = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < until {
        if marker.exists() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    marker.exists()
}

#[cfg(test)]
#[path = "volumes_tests.rs"]
mod tests;
