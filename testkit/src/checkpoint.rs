//! Checkpoint archives in the CRI-O layout, as the kubelet's checkpoint API leaves them:
//!
//! ```text
//! config.dump               container config (id, name, rootfsImageName, ...)
//! spec.dump                 OCI-spec-like JSON; `mounts` lists the volume mount destinations
//! checkpoint/inventory.img
//! checkpoint/pages-1.img    the container's state: one JSON header line, then the memory
//! rootfs-diff.tar           an empty tar
//! dump.log
//! stats-dump
//! ```
//!
//! The archive is written straight from the container's shared memory buffer to the file, so
//! checkpointing a 1 GiB container does not hold its state twice.

use std::{
    io::{self, BufWriter, Read, Write},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

use k8s_openapi::jiff::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::container::{Container, Memory, Mount};

/// Name of the state file inside `checkpoint/`.
pub const PAGES_PATH: &str = "checkpoint/pages-1.img";
pub const INVENTORY_PATH: &str = "checkpoint/inventory.img";
/// Format tag in the state header.
pub const STATE_FORMAT: &str = "test-kubelet-state/v1";
/// The runtime name written into `config.dump`.
pub const RUNTIME: &str = "test-kubelet";

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("writing checkpoint archive {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// First line of `checkpoint/pages-1.img`; the memory bytes follow it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateHeader {
    pub format: String,
    pub counter: u64,
    pub memory_bytes: u64,
    pub memory_sha256: String,
}

impl StateHeader {
    pub fn new(counter: u64, memory: &Memory) -> Self {
        Self {
            format: STATE_FORMAT.to_string(),
            counter,
            memory_bytes: memory.len(),
            memory_sha256: memory.sha256().to_string(),
        }
    }

    /// The header as written: compact JSON and a newline.
    pub fn line(&self) -> Result<Vec<u8>, serde_json::Error> {
        let mut line = serde_json::to_vec(self)?;
        line.push(b'\n');
        Ok(line)
    }
}

/// RFC 3339 with whole seconds, in UTC: `2026-11-23T10:05:00Z`.
pub fn rfc3339(time: Timestamp) -> String {
    time.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// `checkpoint-<pod>_<namespace>-<container>-<RFC 3339 time>.tar`, the kubelet's file name.
pub fn archive_file_name(pod: &str, namespace: &str, container: &str, time: Timestamp) -> String {
    format!("checkpoint-{pod}_{namespace}-{container}-{}.tar", rfc3339(time))
}

/// Everything an archive records about one container at one moment.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub container_id: String,
    pub namespace: String,
    pub pod: String,
    pub pod_uid: String,
    pub container: String,
    pub image: String,
    pub image_ref: String,
    pub mounts: Vec<Mount>,
    pub created: Timestamp,
    pub checkpointed: Timestamp,
    pub counter: u64,
    pub memory: Memory,
}

impl Snapshot {
    /// The state of a simulated container now (it keeps running); None for a real one.
    pub fn of(container: &Container) -> Option<Self> {
        Some(Self {
            container_id: container.id.clone(),
            namespace: container.spec.namespace.clone(),
            pod: container.spec.pod.clone(),
            pod_uid: container.spec.pod_uid.clone(),
            container: container.spec.name.clone(),
            image: container.spec.image.clone(),
            image_ref: container.image_id.clone(),
            mounts: container.spec.mounts.clone(),
            created: container.started_at,
            checkpointed: Timestamp::now(),
            counter: container.counter()?,
            memory: container.memory()?.clone(),
        })
    }
}

fn config_dump(s: &Snapshot) -> serde_json::Value {
    json!({
        "id": s.container_id,
        "name": s.container,
        "rootfsImage": s.image,
        "rootfsImageRef": s.image_ref,
        "rootfsImageName": s.image,
        "runtime": RUNTIME,
        "createdTime": rfc3339(s.created),
        "checkpointedTime": rfc3339(s.checkpointed),
    })
}

fn spec_dump(s: &Snapshot) -> serde_json::Value {
    let mounts: Vec<_> = s
        .mounts
        .iter()
        .map(|m| {
            json!({
                "destination": m.destination,
                "type": "bind",
                "source": format!("/var/lib/kubelet/pods/{}/volumes/{}", s.pod_uid, m.volume),
                "options": ["rbind", "rprivate", if m.read_only { "ro" } else { "rw" }],
            })
        })
        .collect();
    json!({
        "ociVersion": "1.0.2-dev",
        "process": { "args": ["/counter"], "cwd": "/", "env": [] },
        "root": { "path": "rootfs" },
        "hostname": s.pod,
        "mounts": mounts,
        "annotations": {
            "io.kubernetes.pod.name": s.pod,
            "io.kubernetes.pod.namespace": s.namespace,
            "io.kubernetes.pod.uid": s.pod_uid,
            "io.kubernetes.container.name": s.container,
            "io.kubernetes.cri-o.ImageName": s.image,
        },
    })
}

/// An empty tar: two zero blocks.
fn empty_tar() -> Vec<u8> {
    vec![0u8; 1024]
}

fn header(kind: tar::EntryType, size: u64, mode: u32, mtime: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(mode);
    h.set_mtime(mtime);
    h.set_uid(0);
    h.set_gid(0);
    h
}

/// Write the archive of `snapshot` as a tar stream into `out`, and give `out` back.
pub fn write_tar<W: Write>(out: W, snapshot: &Snapshot) -> Result<W, io::Error> {
    let mtime = snapshot.checkpointed.as_second().max(0) as u64;
    let mut tar = tar::Builder::new(out);
    let file = |tar: &mut tar::Builder<W>, name: &str, body: &[u8]| {
        let mut h = header(tar::EntryType::Regular, body.len() as u64, 0o600, mtime);
        tar.append_data(&mut h, name, body)
    };
    let to_io = |e: serde_json::Error| io::Error::new(io::ErrorKind::InvalidData, e);
    file(
        &mut tar,
        "config.dump",
        &serde_json::to_vec_pretty(&config_dump(snapshot)).map_err(to_io)?,
    )?;
    file(
        &mut tar,
        "spec.dump",
        &serde_json::to_vec_pretty(&spec_dump(snapshot)).map_err(to_io)?,
    )?;
    let mut dir = header(tar::EntryType::Directory, 0, 0o700, mtime);
    tar.append_data(&mut dir, "checkpoint/", io::empty())?;
    let inventory = json!({
        "format": STATE_FORMAT,
        "runtime": RUNTIME,
        "container": snapshot.container,
        "images": [PAGES_PATH],
    });
    file(
        &mut tar,
        INVENTORY_PATH,
        &serde_json::to_vec(&inventory).map_err(to_io)?,
    )?;
    // The state: a header line, then the memory streamed from the shared buffer.
    let line = StateHeader::new(snapshot.counter, &snapshot.memory)
        .line()
        .map_err(to_io)?;
    let memory = snapshot.memory.as_slice();
    let mut pages = header(
        tar::EntryType::Regular,
        line.len() as u64 + memory.len() as u64,
        0o600,
        mtime,
    );
    tar.append_data(&mut pages, PAGES_PATH, line.as_slice().chain(memory))?;
    file(&mut tar, "rootfs-diff.tar", &empty_tar())?;
    let dump_log = format!(
        "({}) test-kubelet: dumping container {} of {}/{}\n({}) test-kubelet: counter={} memory_bytes={} memory_sha256={}\n({}) test-kubelet: Dumping finished successfully\n",
        rfc3339(snapshot.checkpointed),
        snapshot.container,
        snapshot.namespace,
        snapshot.pod,
        rfc3339(snapshot.checkpointed),
        snapshot.counter,
        snapshot.memory.len(),
        snapshot.memory.sha256(),
        rfc3339(snapshot.checkpointed),
    );
    file(&mut tar, "dump.log", dump_log.as_bytes())?;
    let stats = json!({
        "dump": {
            "pages_written": snapshot.memory.len().div_ceil(4096),
            "memory_bytes": snapshot.memory.len(),
            "counter": snapshot.counter,
        }
    });
    file(&mut tar, "stats-dump", &serde_json::to_vec(&stats).map_err(to_io)?)?;
    tar.into_inner()
}

/// Write the archive of `snapshot` to `dir`/<kubelet file name>, atomically (a temporary
/// file renamed into place). Blocking: call from a blocking thread.
pub fn write_archive(dir: &Path, snapshot: &Snapshot) -> Result<PathBuf, CheckpointError> {
    let io_err = |path: &Path| {
        let path = path.to_owned();
        move |source| CheckpointError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let name = archive_file_name(
        &snapshot.pod,
        &snapshot.namespace,
        &snapshot.container,
        snapshot.checkpointed,
    );
    let path = dir.join(&name);
    write_atomically(&path, |out| write_tar(out, snapshot).map(drop)).map_err(|source| CheckpointError::Io {
        path: path.clone(),
        source,
    })?;
    Ok(path)
}

/// Write `path` through `write` atomically (a temporary file next to it, fsynced, renamed into
/// place; removed on failure), readable by its owner only: an archive holds a container's
/// memory, and the kubelet's are 0600 too. Blocking.
pub fn write_atomically(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<std::fs::File>) -> io::Result<()>,
) -> io::Result<()> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let result = (|| {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        write(&mut out)?;
        let file = out.into_inner().map_err(io::IntoInnerError::into_error)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(memory: Memory) -> Snapshot {
        Snapshot {
            container_id: "c0ffee".into(),
            namespace: "shop".into(),
            pod: "db-0".into(),
            pod_uid: "uid-1".into(),
            container: "app".into(),
            image: "registry.local/db:1".into(),
            image_ref: "registry.local/db@sha256:00".into(),
            mounts: vec![
                Mount {
                    volume: "data".into(),
                    destination: "/data".into(),
                    read_only: false,
                },
                Mount {
                    volume: "kube-api-access-x".into(),
                    destination: "/var/run/secrets/kubernetes.io/serviceaccount".into(),
                    read_only: true,
                },
            ],
            created: "2026-11-23T10:00:00Z".parse().unwrap(),
            checkpointed: "2026-11-23T10:05:00.5Z".parse().unwrap(),
            counter: 1234,
            memory,
        }
    }

    #[test]
    fn file_name_is_the_kubelets() {
        let t: Timestamp = "2026-11-23T10:05:00.987Z".parse().unwrap();
        assert_eq!(
            archive_file_name("db-0", "shop", "app", t),
            "checkpoint-db-0_shop-app-2026-11-23T10:05:00Z.tar"
        );
    }

    #[test]
    fn archive_has_the_crio_layout_and_validates() {
        let dir = tempfile::tempdir().unwrap();
        let memory = Memory::generate(100_001, 3).unwrap();
        let path = write_archive(dir.path(), &snapshot(memory.clone())).unwrap();
        assert_eq!(
            path.file_name().unwrap().to_str().unwrap(),
            "checkpoint-db-0_shop-app-2026-11-23T10:05:00Z.tar"
        );
        // No temporary file left behind; only the owner may read it.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);

        let mut names = Vec::new();
        let mut archive = tar::Archive::new(std::fs::File::open(&path).unwrap());
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let name = entry.path().unwrap().display().to_string();
            match name.as_str() {
                "config.dump" => {
                    let v: serde_json::Value = serde_json::from_reader(&mut entry).unwrap();
                    assert_eq!(v["name"], "app");
                    assert_eq!(v["rootfsImageName"], "registry.local/db:1");
                    assert_eq!(v["runtime"], "test-kubelet");
                    assert_eq!(v["checkpointedTime"], "2026-11-23T10:05:00Z");
                }
                "spec.dump" => {
                    let v: serde_json::Value = serde_json::from_reader(&mut entry).unwrap();
                    assert_eq!(v["mounts"][0]["destination"], "/data");
                    assert_eq!(v["mounts"].as_array().unwrap().len(), 2);
                    assert_eq!(v["mounts"][1]["options"][2], "ro");
                }
                "rootfs-diff.tar" => {
                    let mut inner = tar::Archive::new(&mut entry);
                    assert_eq!(inner.entries().unwrap().count(), 0);
                }
                _ => {}
            }
            names.push(name);
        }
        assert_eq!(
            names,
            [
                "config.dump",
                "spec.dump",
                "checkpoint/",
                "checkpoint/inventory.img",
                "checkpoint/pages-1.img",
                "rootfs-diff.tar",
                "dump.log",
                "stats-dump"
            ]
        );
        // kube-migrate's own validation accepts it.
        let info = kube_migrate::agent::archive::validate_file(&path).unwrap();
        assert_eq!(info.config.name, "app");
        assert_eq!(info.config.rootfs_image_name, "registry.local/db:1");
        assert_eq!(info.entries, 8);
    }

    #[test]
    fn the_state_is_a_header_line_then_the_memory() {
        let memory = Memory::generate(5000, 9).unwrap();
        let bytes = write_tar(Vec::new(), &snapshot(memory.clone())).unwrap();
        let mut archive = tar::Archive::new(bytes.as_slice());
        let mut pages = Vec::new();
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            if entry.path().unwrap().to_str() == Some(PAGES_PATH) {
                entry.read_to_end(&mut pages).unwrap();
            }
        }
        let newline = pages.iter().position(|&b| b == b'\n').unwrap();
        let header: StateHeader = serde_json::from_slice(&pages[..newline]).unwrap();
        assert_eq!(header, StateHeader::new(1234, &memory));
        assert_eq!(&pages[newline + 1..], memory.as_slice());
    }
}
