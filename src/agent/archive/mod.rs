//! Checkpoint archives (the kubelet's `checkpoint-<pod>_<ns>-<ctr>-<time>.tar`, CRI-O layout):
//! hashing, and validation before anything uses them.
//!
//! A received archive becomes an image layer that a runtime unpacks as root, so entries with
//! absolute paths, `..` components, links that leave the archive, device nodes, setuid/setgid
//! files and absurd sizes are refused, each entry checked against the tree the ones before it
//! would create ([`tree`]), and the nested `rootfs-diff.tar` (unpacked into the restored
//! container) is checked the same way.
//!
//! [`Validator`] is push-based: it takes the archive's bytes in whatever chunks they arrive,
//! hashes them and parses the tar structure on the same pass, so an upload is checked while
//! it is written and never read back. Its memory is one header plus small bounded bodies.
//! That is why it parses headers itself rather than through the `tar` crate, whose reader
//! pulls from a blocking `Read` (a thread and a pipe per transfer, and a second reading of
//! the rules the runtime applies: PAX and GNU names are taken here exactly as Go's
//! archive/tar, which runtimes unpack layers with, takes them). The `tar` crate writes the
//! test archives and the checkpoint images.

use std::{
    ffi::OsStr,
    io::{self, Read},
    os::unix::ffi::OsStrExt,
    path::Path,
};

use sha2::{Digest, Sha256};

mod header;
mod tree;

use header::{Pax, header_path, numeric, octal, safe_relative, until_nul};
pub use tree::TreeError;
use tree::{Entry, Tree};

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
    #[error("corrupt archive at byte {offset}: {why}")]
    Corrupt { offset: u64, why: &'static str },
}

impl ArchiveError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            ArchiveError::Io(_) => "archive_io",
            ArchiveError::Unsafe { .. } => "archive_unsafe",
            ArchiveError::Incomplete(_) | ArchiveError::Config(_) | ArchiveError::Corrupt { .. } => "archive_invalid",
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

pub(crate) const BLOCK: usize = 512;
/// The container's file system changes, a tar inside the checkpoint archive.
const ROOTFS_DIFF: &str = "rootfs-diff.tar";
/// How much of `config.dump` is kept (as much as any real one needs).
const MAX_CONFIG: usize = 1 << 20;
/// Largest GNU long name/link or PAX body accepted: far above PATH_MAX, and what keeps a
/// hostile archive from growing the validator's memory.
const MAX_EXTENSION: u64 = 1 << 20;
/// Read size of [`validate`].
const READ_CHUNK: usize = 1 << 20;

/// Extension headers read so far, describing the next member.
#[derive(Debug, Default)]
struct Pending {
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
    pax: Option<Pax>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.long_name.is_none() && self.long_link.is_none() && self.pax.is_none()
    }
}

/// What the body of the current entry is kept for.
#[derive(Debug)]
enum Body {
    Skip,
    Config(Vec<u8>),
    LongName(Vec<u8>),
    LongLink(Vec<u8>),
    Pax(Vec<u8>),
    /// The nested `rootfs-diff.tar` (the container's file system changes), which the runtime
    /// unpacks into the restored container: checked by a validator of its own.
    Rootfs(Box<Validator>),
}

/// Streaming validator and hasher of a checkpoint archive.
///
/// [`update`](Self::update) takes the bytes in any chunking; after the first problem it only
/// hashes, so that a receiver can still tell a transfer corruption (digest mismatch) from a
/// bad archive. [`finish`](Self::finish) gives the digest and the verdict.
#[derive(Debug)]
pub struct Validator {
    hasher: Sha256,
    size: u64,
    /// Bytes parsed (stops at the end-of-archive block or at the first problem).
    offset: u64,
    header: [u8; BLOCK],
    filled: usize,
    /// Offset of the header of the entry whose body is being read.
    entry_at: u64,
    body: Body,
    body_left: u64,
    pad_left: u64,
    pending: Pending,
    entries: usize,
    tree: Tree,
    /// Checking the nested `rootfs-diff.tar` rather than a checkpoint archive.
    rootfs: bool,
    config: Option<ContainerConfig>,
    has_spec: bool,
    has_checkpoint: bool,
    ended: bool,
    error: Option<ArchiveError>,
}

impl Default for Validator {
    fn default() -> Self {
        Self::new()
    }
}

impl Validator {
    pub fn new() -> Self {
        Self {
            hasher: Sha256::new(),
            size: 0,
            offset: 0,
            header: [0; BLOCK],
            filled: 0,
            entry_at: 0,
            body: Body::Skip,
            body_left: 0,
            pad_left: 0,
            pending: Pending::default(),
            entries: 0,
            tree: Tree::new(),
            rootfs: false,
            config: None,
            has_spec: false,
            has_checkpoint: false,
            ended: false,
            error: None,
        }
    }

    /// A validator for a plain tree, such as a container root file system diff or an
    /// emptyDir's contents: the same tar rules (absolute symlink targets taken inside the
    /// root), none of a checkpoint's required entries.
    pub fn rootfs() -> Self {
        Self {
            tree: Tree::rootfs(),
            rootfs: true,
            ..Self::new()
        }
    }

    /// Hash `data` and parse it as the archive's next bytes.
    pub fn update(&mut self, data: &[u8]) {
        self.hasher.update(data);
        self.size += data.len() as u64;
        if self.ended || self.error.is_some() {
            return;
        }
        if let Err(e) = self.parse(data) {
            self.error = Some(e);
        }
    }

    /// No problem found so far.
    pub fn is_ok(&self) -> bool {
        self.error.is_none()
    }

    /// Bytes seen so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The `sha256:<hex>` of everything seen, and whether it is a complete, safe checkpoint
    /// archive.
    pub fn finish(mut self) -> (String, Result<ArchiveInfo, ArchiveError>) {
        let digest = format!("sha256:{}", hex::encode(std::mem::take(&mut self.hasher).finalize()));
        let verdict = self.verdict().map(|config| ArchiveInfo {
            digest: digest.clone(),
            size: self.size,
            entries: self.entries,
            config,
        });
        (digest, verdict)
    }

    fn verdict(&mut self) -> Result<ContainerConfig, ArchiveError> {
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        if !self.ended {
            // Ending on a header boundary without the zero blocks is accepted, as tar does.
            let why = if self.filled > 0 {
                Some("truncated inside a header")
            } else if self.body_left > 0 || self.pad_left > 0 {
                Some("truncated inside an entry")
            } else if !self.pending.is_empty() {
                Some("extension headers without the member they describe")
            } else {
                None
            };
            if let Some(why) = why {
                return Err(ArchiveError::Corrupt {
                    offset: self.offset,
                    why,
                });
            }
        }
        if self.rootfs {
            return Ok(ContainerConfig::default());
        }
        let config = self.config.take().ok_or(ArchiveError::Incomplete("no config.dump"))?;
        if !self.has_spec {
            return Err(ArchiveError::Incomplete("no spec.dump"));
        }
        if !self.has_checkpoint {
            return Err(ArchiveError::Incomplete("no checkpoint/ directory"));
        }
        Ok(config)
    }

    fn parse(&mut self, mut data: &[u8]) -> Result<(), ArchiveError> {
        while !data.is_empty() && !self.ended {
            if self.body_left > 0 {
                let n = self.body_left.min(data.len() as u64) as usize;
                self.keep(&data[..n]);
                self.body_left -= n as u64;
                self.offset += n as u64;
                data = &data[n..];
                if self.body_left == 0 {
                    self.end_body()?;
                }
            } else if self.pad_left > 0 {
                let n = self.pad_left.min(data.len() as u64) as usize;
                self.pad_left -= n as u64;
                self.offset += n as u64;
                data = &data[n..];
            } else {
                let n = (BLOCK - self.filled).min(data.len());
                self.header[self.filled..self.filled + n].copy_from_slice(&data[..n]);
                self.filled += n;
                self.offset += n as u64;
                data = &data[n..];
                if self.filled == BLOCK {
                    self.filled = 0;
                    self.on_header()?;
                }
            }
        }
        Ok(())
    }

    fn keep(&mut self, bytes: &[u8]) {
        match &mut self.body {
            Body::Skip => {}
            Body::Config(kept) => {
                let room = MAX_CONFIG.saturating_sub(kept.len());
                kept.extend_from_slice(&bytes[..bytes.len().min(room)]);
            }
            Body::LongName(kept) | Body::LongLink(kept) | Body::Pax(kept) => kept.extend_from_slice(bytes),
            Body::Rootfs(inner) => inner.update(bytes),
        }
    }

    fn corrupt(&self, why: &'static str) -> ArchiveError {
        ArchiveError::Corrupt {
            offset: self.entry_at,
            why,
        }
    }

    fn on_header(&mut self) -> Result<(), ArchiveError> {
        self.entry_at = self.offset - BLOCK as u64;
        let h = self.header;
        if h.iter().all(|&b| b == 0) {
            if !self.pending.is_empty() {
                return Err(self.corrupt("extension headers without the member they describe"));
            }
            self.ended = true;
            return Ok(());
        }
        let expected = octal(&h[148..156]).ok_or_else(|| self.corrupt("header checksum is not a number"))?;
        // The checksum field itself counts as eight spaces.
        let sum = h[..148].iter().chain(&h[156..]).map(|&b| u64::from(b)).sum::<u64>() + 8 * u64::from(b' ');
        if sum != expected {
            return Err(self.corrupt("header checksum mismatch"));
        }
        let flag = h[156];
        let mut size = numeric(&h[124..136]).ok_or_else(|| self.corrupt("size field is not a number"))?;

        // GNU long names and PAX headers describe the next member. They are taken whatever
        // the header's magic, as Go's archive/tar does, so that the name checked here is the
        // name a runtime unpacks.
        if matches!(flag, b'L' | b'K' | b'x') {
            let taken = match flag {
                b'L' => self.pending.long_name.is_some(),
                b'K' => self.pending.long_link.is_some(),
                _ => self.pending.pax.is_some(),
            };
            if taken {
                return Err(self.corrupt("two extension headers of one kind for the same member"));
            }
            if size > MAX_EXTENSION {
                return Err(self.corrupt("extension header larger than 1 MiB"));
            }
            let kept = Vec::with_capacity(size as usize);
            self.body = match flag {
                b'L' => Body::LongName(kept),
                b'K' => Body::LongLink(kept),
                _ => Body::Pax(kept),
            };
            return self.start_body(size);
        }

        let pending = std::mem::take(&mut self.pending);
        if flag != b'g'
            && let Some(pax_size) = pending.pax.as_ref().and_then(|p| p.size)
        {
            // A PAX size overrides the header's; disagreeing here would let one archive
            // look different to us and to the runtime.
            size = pax_size;
        }
        self.entries += 1;
        let raw: Vec<u8> = match (&pending.long_name, pending.pax.as_ref().and_then(|p| p.path.as_ref())) {
            (Some(name), _) | (None, Some(name)) => until_nul(name).to_vec(),
            (None, None) => header_path(&h),
        };
        let display = String::from_utf8_lossy(&raw).into_owned();
        let path = safe_relative(Path::new(OsStr::from_bytes(&raw))).map_err(|why| ArchiveError::Unsafe {
            path: display.clone(),
            why,
        })?;
        let kind = tar::EntryType::new(flag);
        let target = match (
            &pending.long_link,
            pending.pax.as_ref().and_then(|p| p.linkpath.as_ref()),
        ) {
            (Some(link), _) | (None, Some(link)) => until_nul(link),
            (None, None) => until_nul(&h[157..257]),
        };
        let target = Path::new(OsStr::from_bytes(target));
        let entry = match kind {
            tar::EntryType::Regular | tar::EntryType::Continuous => Entry::File,
            tar::EntryType::Directory => Entry::Dir,
            tar::EntryType::Symlink => Entry::Symlink(target),
            tar::EntryType::Link => Entry::HardLink(target),
            tar::EntryType::XGlobalHeader => return self.start_body(size),
            _ => {
                return Err(ArchiveError::Unsafe {
                    path: display,
                    why: "device, fifo or unknown entry type",
                });
            }
        };
        let mode = octal(&h[100..108]).ok_or_else(|| self.corrupt("mode field is not a number"))?;
        self.tree
            .add(&path, entry, mode, size)
            .map_err(|TreeError(why)| ArchiveError::Unsafe {
                path: display.clone(),
                why,
            })?;
        let first = path.components().next().map(|c| c.as_os_str());
        if self.rootfs {
            // A container's own files: nothing in them means anything to kube-migrate.
        } else if first == Some(OsStr::new("checkpoint")) {
            self.has_checkpoint = true;
        } else if first == Some(OsStr::new("spec.dump")) {
            self.has_spec = true;
        } else if path == Path::new(ROOTFS_DIFF) && kind == tar::EntryType::Regular {
            self.body = Body::Rootfs(Box::new(Validator::rootfs()));
        } else if first == Some(OsStr::new("config.dump")) && kind == tar::EntryType::Regular {
            self.body = Body::Config(Vec::with_capacity(size.min(MAX_CONFIG as u64) as usize));
        }
        self.start_body(size)
    }

    fn start_body(&mut self, size: u64) -> Result<(), ArchiveError> {
        self.body_left = size;
        self.pad_left = (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64;
        if size == 0 {
            self.end_body()?;
        }
        Ok(())
    }

    fn end_body(&mut self) -> Result<(), ArchiveError> {
        match std::mem::replace(&mut self.body, Body::Skip) {
            Body::Skip => {}
            Body::Config(bytes) => self.config = Some(serde_json::from_slice(&bytes)?),
            Body::LongName(name) => self.pending.long_name = Some(name),
            Body::LongLink(link) => self.pending.long_link = Some(link),
            Body::Pax(records) => self.pending.pax = Some(Pax::parse(&records).map_err(|why| self.corrupt(why))?),
            Body::Rootfs(inner) => match inner.finish().1 {
                Ok(_) => {}
                Err(ArchiveError::Unsafe { path, why }) => {
                    return Err(ArchiveError::Unsafe {
                        path: format!("{ROOTFS_DIFF}/{path}"),
                        why,
                    });
                }
                Err(_) => return Err(self.corrupt("rootfs-diff.tar is not a valid tar archive")),
            },
        }
        Ok(())
    }
}

/// Validate a checkpoint archive read from `reader` and hash it in the same pass.
pub fn validate<R: Read>(mut reader: R) -> Result<ArchiveInfo, ArchiveError> {
    let mut validator = Validator::new();
    let mut buf = vec![0; READ_CHUNK];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        validator.update(&buf[..n]);
        if let Some(e) = validator.error.take() {
            return Err(e);
        }
    }
    validator.finish().1
}

/// Validate the archive at `path`.
pub fn validate_file(path: &Path) -> Result<ArchiveInfo, ArchiveError> {
    validate(std::fs::File::open(path)?)
}

#[cfg(test)]
mod tests;
