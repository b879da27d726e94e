//! The files of a checkpoint archive: tarring a checkpoint's work directory into an archive,
//! and applying a checkpoint's root filesystem changes to a restored container's rootfs.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use super::{CrunError, io_error};
use crate::checkpoint::write_atomically;

/// Apply `rootfs-diff.tar` (changed files) and `deleted.files` (a JSON list of paths) of a
/// checkpoint to a fresh copy of the base image's rootfs.
pub(super) fn apply_rootfs_diff(dir: &Path, rootfs: &Path) -> Result<(), CrunError> {
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
pub(super) fn tar_dir(work: &Path, dir: &Path, name: &str) -> Result<PathBuf, CrunError> {
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
