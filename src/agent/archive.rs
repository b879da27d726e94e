//! Checkpoint archives (the kubelet's `checkpoint-<pod>_<ns>-<ctr>-<time>.tar`, CRI-O layout):
//! hashing, and validation before anything uses them.
//!
//! A received archive becomes an image layer that a runtime unpacks as root, so entries with
//! absolute paths, `..` components, links that leave the archive, or device nodes are refused.

use std::{
    io::{self, Read},
    path::{Component, Path, PathBuf},
};

use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("reading archive: {0}")]
    Io(#[from] io::Error),
    #[error("unsafe entry {path:?}: {why}")]
    Unsafe { path: String, why: &'static str },
    #[error("not a checkpoint archive: {0}")]
    Incomplete(&'static str),
    #[error("config.dump is not valid JSON: {0}")]
    Config(#[from] serde_json::Error),
    #[error("digest mismatch: expected {expected}, got {actual}")]
    Digest { expected: String, actual: String },
}

impl ArchiveError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            ArchiveError::Io(_) => "archive_io",
            ArchiveError::Unsafe { .. } => "archive_unsafe",
            ArchiveError::Incomplete(_) | ArchiveError::Config(_) => "archive_invalid",
            ArchiveError::Digest { .. } => "digest_mismatch",
        }
    }
}

/// `config.dump` as CRI-O and containerd write it (the fields used here).
#[derive(Debug, Clone, Default, serde::Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ContainerConfig {
    #[serde(default)]
    pub id: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub rootfs_image_name: String,
    #[serde(default)]
    pub rootfs_image_ref: String,
}

/// What validation learnt about an archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveInfo {
    /// `sha256:<hex>` of the whole file.
    pub digest: String,
    pub size: u64,
    pub entries: usize,
    pub config: ContainerConfig,
}

/// A reader that hashes and counts what passes through it.
pub struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }

    /// Drain the rest of the input and return (`sha256:<hex>`, bytes read).
    pub fn finish(mut self) -> io::Result<(String, u64)> {
        io::copy(&mut self, &mut io::sink())?;
        Ok((format!("sha256:{}", hex::encode(self.hasher.finalize())), self.count))
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

/// `sha256:<hex>` of a file, read in constant memory.
pub fn digest_file(path: &Path) -> io::Result<(String, u64)> {
    HashingReader::new(io::BufReader::with_capacity(1 << 20, std::fs::File::open(path)?)).finish()
}

/// A path inside the archive, refused when it could escape the directory it is unpacked in.
fn safe_relative(path: &Path) -> Result<PathBuf, &'static str> {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(c) => out.push(c),
            Component::CurDir => {}
            Component::ParentDir => return Err("'..' component"),
            Component::RootDir | Component::Prefix(_) => return Err("absolute path"),
        }
    }
    Ok(out)
}

/// Where a link with `target`, placed at `entry`, points; Err when outside the root.
fn link_stays_inside(entry: &Path, target: &Path, hard: bool) -> Result<(), &'static str> {
    if target.is_absolute() {
        return Err("link to an absolute path");
    }
    // A hard link's target is relative to the archive root, a symlink's to its directory.
    let mut depth: i64 = if hard {
        0
    } else {
        entry.parent().map_or(0, |p| p.components().count() as i64)
    };
    for component in target.components() {
        match component {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir => {
                depth -= 1;
                if depth < 0 {
                    return Err("link pointing outside the archive");
                }
            }
            Component::RootDir | Component::Prefix(_) => return Err("link to an absolute path"),
        }
    }
    Ok(())
}

/// Validate a checkpoint archive read from `reader` and hash it in the same pass.
pub fn validate<R: Read>(reader: R) -> Result<ArchiveInfo, ArchiveError> {
    let mut hashing = HashingReader::new(reader);
    let mut entries = 0usize;
    let mut config = None;
    let mut has_spec = false;
    let mut has_checkpoint = false;
    {
        let mut archive = tar::Archive::new(&mut hashing);
        for entry in archive.entries()? {
            let mut entry = entry?;
            entries += 1;
            let raw = entry.path()?.into_owned();
            let display = raw.display().to_string();
            let path = safe_relative(&raw).map_err(|why| ArchiveError::Unsafe {
                path: display.clone(),
                why,
            })?;
            let kind = entry.header().entry_type();
            match kind {
                tar::EntryType::Regular | tar::EntryType::Directory | tar::EntryType::Continuous => {}
                tar::EntryType::Symlink | tar::EntryType::Link => {
                    let target = entry
                        .link_name()?
                        .ok_or(ArchiveError::Unsafe {
                            path: display.clone(),
                            why: "link without target",
                        })?
                        .into_owned();
                    link_stays_inside(&path, &target, kind == tar::EntryType::Link).map_err(|why| {
                        ArchiveError::Unsafe {
                            path: display.clone(),
                            why,
                        }
                    })?;
                }
                // PAX and GNU long-name headers are consumed by the tar reader itself.
                tar::EntryType::XGlobalHeader
                | tar::EntryType::XHeader
                | tar::EntryType::GNULongName
                | tar::EntryType::GNULongLink => {}
                _ => {
                    return Err(ArchiveError::Unsafe {
                        path: display,
                        why: "device, fifo or unknown entry type",
                    });
                }
            }
            let first = path
                .components()
                .next()
                .map(|c| c.as_os_str().to_string_lossy().into_owned());
            match first.as_deref() {
                Some("checkpoint") => has_checkpoint = true,
                Some("spec.dump") => has_spec = true,
                Some("config.dump") if kind == tar::EntryType::Regular => {
                    let mut body = Vec::new();
                    (&mut entry).take(1 << 20).read_to_end(&mut body)?;
                    config = Some(serde_json::from_slice::<ContainerConfig>(&body)?);
                }
                _ => {}
            }
        }
    }
    let (digest, size) = hashing.finish()?;
    let config = config.ok_or(ArchiveError::Incomplete("no config.dump"))?;
    if !has_spec {
        return Err(ArchiveError::Incomplete("no spec.dump"));
    }
    if !has_checkpoint {
        return Err(ArchiveError::Incomplete("no checkpoint/ directory"));
    }
    Ok(ArchiveInfo {
        digest,
        size,
        entries,
        config,
    })
}

/// Validate the archive at `path`.
pub fn validate_file(path: &Path) -> Result<ArchiveInfo, ArchiveError> {
    validate(io::BufReader::with_capacity(1 << 20, std::fs::File::open(path)?))
}
