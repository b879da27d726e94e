//! Files that hold checkpoint memory, or say where it is: `0600` in `0700` directories,
//! whatever the umask, and written atomically and durably (a crash leaves the old file or the
//! new one, never half of it). A checkpoint is a copy of a process's memory: its keys,
//! tokens and sessions.

use std::{
    fs::{DirBuilder, File, OpenOptions, Permissions},
    io::{self, Write},
    os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
    path::Path,
};

pub const FILE_MODE: u32 = 0o600;
pub const DIR_MODE: u32 = 0o700;

/// Create `path` and its missing parents as `0700`, and make `path` itself `0700` if it
/// existed (a hostPath the kubelet created `0755`).
pub fn dir_all(path: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(DIR_MODE).create(path)?;
    std::fs::set_permissions(path, Permissions::from_mode(DIR_MODE))
}

/// Create (or truncate) a `0600` file for writing.
pub fn create(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(FILE_MODE)
        .open(path)
}

/// Make a rename or a new entry in `dir` durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Write `bytes` to `path` through a temporary file: fsync, rename, fsync of the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = Path::new(&tmp_name);
    let mut file = create(tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(tmp, path)?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    #[test]
    fn modes_hold_whatever_the_umask_and_existing_dirs_are_tightened() {
        let root = tempfile::tempdir().unwrap();
        let open = root.path().join("state");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, Permissions::from_mode(0o755)).unwrap();
        let deep = open.join("a/b");
        dir_all(&deep).unwrap();
        dir_all(&open).unwrap();
        for d in [&open, &open.join("a"), &deep] {
            assert_eq!(std::fs::metadata(d).unwrap().mode() & 0o777, DIR_MODE, "{d:?}");
        }
        let file = deep.join("record.json");
        write_atomic(&file, b"{}").unwrap();
        write_atomic(&file, b"{\"v\":2}").unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), b"{\"v\":2}");
        assert_eq!(std::fs::metadata(&file).unwrap().mode() & 0o777, FILE_MODE);
        assert!(!deep.join("record.json.tmp").exists());
    }
}
