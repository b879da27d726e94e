//! The agent's on-disk state: one directory per migration under the state root.
//!
//! ```text
//! <root>/migrations/<id>/record.json          what this node holds for the migration
//! <root>/migrations/<id>/archives/<ctr>.tar   archives received from the source node
//! <root>/migrations/<id>/volumes/<vol>.tar    emptyDir contents, packed here or received
//! <root>/migrations/<id>/image/               OCI image layout of the checkpoint images
//! ```
//! Archives checkpointed on this node stay where the kubelet wrote them; the record lists
//! them so that deletion and garbage collection remove them too.

use std::{
    collections::BTreeMap,
    io,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};

use super::{
    api::{self, ArchiveRecord},
    private,
};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid migration id {0:?}")]
    InvalidId(String),
    #[error("invalid container name {0:?}")]
    InvalidContainer(String),
    #[error("store I/O at {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("corrupt record {path}: {source}")]
    Record { path: PathBuf, source: serde_json::Error },
}

impl StoreError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            StoreError::InvalidId(_) | StoreError::InvalidContainer(_) => "invalid_request",
            StoreError::Io { .. } => "store_io",
            StoreError::Record { .. } => "store_record",
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What one node holds for one migration.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    pub namespace: String,
    pub pod: String,
    /// Archives checkpointed here (paths written by the kubelet).
    #[serde(default)]
    pub checkpointed: BTreeMap<String, ArchiveRecord>,
    /// Archives received (and validated) here, by container.
    #[serde(default)]
    pub received: BTreeMap<String, ArchiveRecord>,
    /// emptyDir contents packed here (source), by volume name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub volumes: BTreeMap<String, ArchiveRecord>,
    /// emptyDir contents received (and validated) here, by volume name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub received_volumes: BTreeMap<String, ArchiveRecord>,
    /// The replacement pod whose volumes were filled (and released) from them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volumes_placed_in: Option<String>,
    /// What the controller said this node may receive (target side; see [`api::ExpectRequest`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected: Option<api::ExpectRequest>,
    /// `sha256:<hex>` of the password that may pull this migration's images; none: nobody may.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull_digest: Option<String>,
    /// How each container's image was first described: every later build of the same archive
    /// gives the same manifest, so a build after the agent's own (see
    /// [`api::ExpectRequest::prepull`]) changes nothing the runtime pulled.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub images: BTreeMap<String, ImageMeta>,
}

/// What a checkpoint image's manifest was made from, besides its layer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageMeta {
    pub archive_digest: String,
    pub created: String,
    /// For the informational base-image annotations; empty when the image was described
    /// before its archive arrived.
    #[serde(default)]
    pub base_image: String,
}

#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let root = root.into();
        let migrations = root.join("migrations");
        private::dir_all(&migrations).map_err(io_err(&migrations))?;
        private::dir_all(&root).map_err(io_err(&root))?;
        Ok(Self { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn dir(&self, id: &str) -> Result<PathBuf, StoreError> {
        if !api::valid_id(id) {
            return Err(StoreError::InvalidId(id.to_string()));
        }
        Ok(self.root.join("migrations").join(id))
    }

    pub fn create_dir(&self, id: &str) -> Result<PathBuf, StoreError> {
        let dir = self.dir(id)?;
        for sub in ["archives", "volumes"] {
            let path = dir.join(sub);
            private::dir_all(&path).map_err(io_err(&path))?;
        }
        Ok(dir)
    }

    pub fn archive_path(&self, id: &str, container: &str) -> Result<PathBuf, StoreError> {
        if !api::valid_container(container) {
            return Err(StoreError::InvalidContainer(container.to_string()));
        }
        Ok(self.dir(id)?.join("archives").join(format!("{container}.tar")))
    }

    /// Where an emptyDir's contents are kept (volume names are DNS labels, like containers).
    pub fn volume_path(&self, id: &str, volume: &str) -> Result<PathBuf, StoreError> {
        if !api::valid_container(volume) {
            return Err(StoreError::InvalidContainer(volume.to_string()));
        }
        Ok(self.dir(id)?.join("volumes").join(format!("{volume}.tar")))
    }

    /// Where a transferred file of `kind` named `name` is kept.
    pub fn path_of(&self, kind: api::Kind, id: &str, name: &str) -> Result<PathBuf, StoreError> {
        match kind {
            api::Kind::Archive => self.archive_path(id, name),
            api::Kind::Volume => self.volume_path(id, name),
        }
    }

    pub fn layout(&self, id: &str) -> Result<PathBuf, StoreError> {
        Ok(self.dir(id)?.join("image"))
    }

    pub fn load(&self, id: &str) -> Result<Option<Record>, StoreError> {
        let path = self.dir(id)?.join("record.json");
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| StoreError::Record { path, source }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::Io { path, source: e }),
        }
    }

    pub fn save(&self, id: &str, record: &Record) -> Result<(), StoreError> {
        let dir = self.create_dir(id)?;
        let path = dir.join("record.json");
        let bytes = serde_json::to_vec_pretty(record).map_err(|source| StoreError::Record {
            path: path.clone(),
            source,
        })?;
        private::write_atomic(&path, &bytes).map_err(io_err(&path))
    }

    /// Remove everything held for `id`, including the kubelet archives it checkpointed.
    /// Returns whether anything was there.
    pub fn delete(&self, id: &str) -> Result<bool, StoreError> {
        let dir = self.dir(id)?;
        if let Some(record) = self.load(id)? {
            for archive in record.checkpointed.values() {
                match std::fs::remove_file(&archive.path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => {
                        return Err(StoreError::Io {
                            path: archive.path.clone().into(),
                            source: e,
                        });
                    }
                }
            }
        }
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(StoreError::Io { path: dir, source: e }),
        }
    }

    /// Delete migrations untouched for longer than `max_age` (the controller deletes
    /// finished ones itself; this catches those whose PodMigration vanished meanwhile).
    pub fn gc(&self, max_age: Duration, now: SystemTime) -> Result<Vec<String>, StoreError> {
        let base = self.root.join("migrations");
        let mut deleted = Vec::new();
        for entry in std::fs::read_dir(&base).map_err(io_err(&base))? {
            let entry = entry.map_err(io_err(&base))?;
            let id = entry.file_name().to_string_lossy().into_owned();
            if !api::valid_id(&id) {
                continue;
            }
            let modified = newest_mtime(&entry.path()).map_err(io_err(&entry.path()))?;
            if now.duration_since(modified).unwrap_or_default() > max_age {
                self.delete(&id)?;
                deleted.push(id);
            }
        }
        Ok(deleted)
    }

    /// Bytes under the store root (archives checkpointed in place are not counted twice).
    pub fn stored_bytes(&self) -> u64 {
        fn walk(p: &Path) -> u64 {
            let Ok(meta) = std::fs::symlink_metadata(p) else {
                return 0;
            };
            if meta.is_dir() {
                std::fs::read_dir(p)
                    .map(|rd| rd.flatten().map(|e| walk(&e.path())).sum())
                    .unwrap_or(0)
            } else {
                meta.len()
            }
        }
        walk(&self.root.join("migrations"))
    }
}

fn newest_mtime(dir: &Path) -> io::Result<SystemTime> {
    let mut newest = std::fs::metadata(dir)?.modified()?;
    for name in ["record.json", "image/index.json"] {
        if let Ok(m) = std::fs::metadata(dir.join(name)).and_then(|m| m.modified()) {
            newest = newest.max(m);
        }
    }
    Ok(newest)
}
