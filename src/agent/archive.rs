//! Checkpoint archives (the kubelet's `checkpoint-<pod>_<ns>-<ctr>-<time>.tar`, CRI-O layout):
//! hashing, and validation before anything uses them.
//!
//! A received archive becomes an image layer that a runtime unpacks as root, so entries with
//! absolute paths, `..` components, links that leave the archive, or device nodes are refused.
//!
//! [`Validator`] is push-based: it takes the archive's bytes in whatever chunks they arrive,
//! hashes them and parses the tar structure on the same pass, so an upload is checked while
//! it is written and never read back. Its memory is one header plus small bounded bodies.

use std::{
    ffi::OsStr,
    io::{self, Read},
    os::unix::ffi::OsStrExt,
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

const BLOCK: usize = 512;
/// How much of `config.dump` is kept (as much as any real one needs).
const MAX_CONFIG: usize = 1 << 20;
/// Largest GNU long name/link or PAX body accepted: far above PATH_MAX, and what keeps a
/// hostile archive from growing the validator's memory.
const MAX_EXTENSION: u64 = 1 << 20;
/// Read size of [`validate`].
const READ_CHUNK: usize = 1 << 20;

/// The PAX records (`<len> <key>=<value>\n`) that change how the next member is read.
#[derive(Debug, Default)]
struct Pax {
    path: Option<Vec<u8>>,
    linkpath: Option<Vec<u8>>,
    size: Option<u64>,
}

impl Pax {
    fn parse(mut records: &[u8]) -> Result<Self, &'static str> {
        const MALFORMED: &str = "malformed PAX record";
        let mut pax = Pax::default();
        while !records.is_empty() {
            let space = records.iter().position(|&b| b == b' ').ok_or(MALFORMED)?;
            let len: usize = std::str::from_utf8(&records[..space])
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or(MALFORMED)?;
            if len <= space + 1 || len > records.len() || records[len - 1] != b'\n' {
                return Err(MALFORMED);
            }
            let record = &records[space + 1..len - 1];
            let eq = record.iter().position(|&b| b == b'=').ok_or(MALFORMED)?;
            let value = &record[eq + 1..];
            // Later records win, as in Go's archive/tar (what runtimes unpack layers with).
            match &record[..eq] {
                b"path" => pax.path = Some(value.to_vec()),
                b"linkpath" => pax.linkpath = Some(value.to_vec()),
                b"size" => {
                    let size = std::str::from_utf8(value).ok().and_then(|s| s.parse().ok());
                    pax.size = Some(size.ok_or("PAX size is not a number")?);
                }
                _ => {}
            }
            records = &records[len..];
        }
        Ok(pax)
    }
}

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
}

/// Bytes of a name field up to its first NUL: what C and Go readers see.
fn until_nul(bytes: &[u8]) -> &[u8] {
    bytes.iter().position(|&b| b == 0).map_or(bytes, |i| &bytes[..i])
}

fn octal(field: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(until_nul(field)).ok()?.trim();
    u64::from_str_radix(text, 8).ok()
}

/// A numeric header field: octal text, or GNU base-256 (sizes of 8 GiB and more).
fn numeric(field: &[u8]) -> Option<u64> {
    if field[0] & 0x80 == 0 {
        return octal(field);
    }
    let (high, low) = field.split_at(field.len() - 8);
    // Anything above 64 bits, or negative, is no size.
    if high[0] != 0x80 || high[1..].iter().any(|&b| b != 0) {
        return None;
    }
    Some(u64::from_be_bytes(low.try_into().ok()?))
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
            config: None,
            has_spec: false,
            has_checkpoint: false,
            ended: false,
            error: None,
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
        match kind {
            tar::EntryType::Regular | tar::EntryType::Directory | tar::EntryType::Continuous => {}
            tar::EntryType::Symlink | tar::EntryType::Link => {
                let target = match (
                    &pending.long_link,
                    pending.pax.as_ref().and_then(|p| p.linkpath.as_ref()),
                ) {
                    (Some(link), _) | (None, Some(link)) => Some(until_nul(link)),
                    (None, None) => Some(until_nul(&h[157..257])).filter(|l| !l.is_empty()),
                }
                .ok_or(ArchiveError::Unsafe {
                    path: display.clone(),
                    why: "link without target",
                })?;
                link_stays_inside(
                    &path,
                    Path::new(OsStr::from_bytes(target)),
                    kind == tar::EntryType::Link,
                )
                .map_err(|why| ArchiveError::Unsafe {
                    path: display.clone(),
                    why,
                })?;
            }
            tar::EntryType::XGlobalHeader => {}
            _ => {
                return Err(ArchiveError::Unsafe {
                    path: display,
                    why: "device, fifo or unknown entry type",
                });
            }
        }
        let first = path.components().next().map(|c| c.as_os_str());
        if first == Some(OsStr::new("checkpoint")) {
            self.has_checkpoint = true;
        } else if first == Some(OsStr::new("spec.dump")) {
            self.has_spec = true;
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
        }
        Ok(())
    }
}

/// The name in a header: `prefix/name` for POSIX ustar headers, `name` otherwise (GNU
/// headers keep other fields where ustar has the prefix).
fn header_path(h: &[u8; BLOCK]) -> Vec<u8> {
    let name = until_nul(&h[..100]);
    let ustar = &h[257..263] == b"ustar\0" && &h[263..265] == b"00";
    let prefix = until_nul(&h[345..500]);
    if ustar && !prefix.is_empty() {
        [prefix, b"/", name].concat()
    } else {
        name.to_vec()
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
mod tests {
    use super::*;

    const CONFIG: &[u8] = br#"{"id":"c1","name":"app","rootfsImageName":"registry.local/app:1"}"#;

    fn header(flag: u8, name: &[u8], size: u64, link: &[u8]) -> [u8; BLOCK] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::new(flag));
        h.set_size(size);
        h.set_mode(0o644);
        // Raw fields: the builder's own checks would refuse the hostile names tested here.
        let old = h.as_old_mut();
        old.name[..name.len()].copy_from_slice(name);
        old.linkname[..link.len()].copy_from_slice(link);
        h.set_cksum();
        *h.as_bytes()
    }

    #[derive(Default)]
    struct Tar(Vec<u8>);

    impl Tar {
        fn raw(mut self, header: [u8; BLOCK], body: &[u8]) -> Self {
            self.0.extend_from_slice(&header);
            self.0.extend_from_slice(body);
            self.0.resize(self.0.len().next_multiple_of(BLOCK), 0);
            self
        }
        fn file(self, name: &str, body: &[u8]) -> Self {
            self.raw(header(b'0', name.as_bytes(), body.len() as u64, b""), body)
        }
        fn entry(self, flag: u8, name: &str, link: &str) -> Self {
            self.raw(header(flag, name.as_bytes(), 0, link.as_bytes()), b"")
        }
        fn pax(self, records: &[(&str, &str)]) -> Self {
            let mut body = Vec::new();
            for (k, v) in records {
                let rest = format!(" {k}={v}\n");
                // The length counts its own digits.
                let mut len = rest.len() + 1;
                while format!("{len}").len() + rest.len() != len {
                    len += 1;
                }
                body.extend_from_slice(format!("{len}{rest}").as_bytes());
            }
            self.raw(header(b'x', b"PaxHeaders/x", body.len() as u64, b""), &body)
        }
        fn end(mut self) -> Vec<u8> {
            self.0.extend_from_slice(&[0; 2 * BLOCK]);
            self.0
        }
    }

    fn pages(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    /// config.dump, spec.dump, checkpoint/ and 100,000 bytes of pages (not block-aligned).
    fn good() -> Tar {
        Tar::default()
            .file("config.dump", CONFIG)
            .file("spec.dump", b"{}")
            .entry(b'5', "checkpoint/", "")
            .file("checkpoint/pages-1.img", &pages(100_000))
    }

    fn feed(bytes: &[u8], chunk: usize) -> (String, Result<ArchiveInfo, ArchiveError>) {
        let mut v = Validator::new();
        for c in bytes.chunks(chunk) {
            v.update(c);
        }
        v.finish()
    }

    fn sha(bytes: &[u8]) -> String {
        format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
    }

    fn corrupt_why(result: Result<ArchiveInfo, ArchiveError>) -> &'static str {
        match result {
            Err(ArchiveError::Corrupt { why, .. }) => why,
            other => panic!("expected a corrupt archive, got {other:?}"),
        }
    }

    fn unsafe_why(bytes: &[u8]) -> &'static str {
        match feed(bytes, 4096).1 {
            Err(ArchiveError::Unsafe { why, .. }) => why,
            other => panic!("expected an unsafe archive, got {other:?}"),
        }
    }

    #[test]
    fn a_good_archive_validates_in_any_chunking() {
        let bytes = good().end();
        for chunk in [1, 7, 100, 511, 512, 513, 4096, 65_536, bytes.len()] {
            let (digest, info) = feed(&bytes, chunk);
            let info = info.unwrap_or_else(|e| panic!("chunk {chunk}: {e}"));
            assert_eq!(digest, sha(&bytes));
            assert_eq!(info.digest, digest);
            assert_eq!(info.size, bytes.len() as u64);
            assert_eq!(info.entries, 4);
            assert_eq!(info.config.name, "app");
            assert_eq!(info.config.rootfs_image_name, "registry.local/app:1");
        }
        // The Read-based entry point is the same validator.
        assert_eq!(validate(&bytes[..]).unwrap(), feed(&bytes, 4096).1.unwrap());
    }

    #[test]
    fn archives_written_by_the_tar_crate_validate_with_long_and_prefixed_names() {
        let long = format!("checkpoint/{}/pages-1.img", "d".repeat(150));
        let mut out = Vec::new();
        {
            let mut b = tar::Builder::new(&mut out);
            let mut add = |mut h: tar::Header, name: &str, body: &[u8]| {
                h.set_size(body.len() as u64);
                h.set_mode(0o600);
                b.append_data(&mut h, name, body).unwrap();
            };
            add(tar::Header::new_gnu(), "config.dump", CONFIG);
            add(tar::Header::new_ustar(), "spec.dump", b"{}");
            add(tar::Header::new_gnu(), &long, &pages(3000)); // GNU long name entry
            add(
                tar::Header::new_ustar(),
                &format!("checkpoint/{}/x", "p".repeat(90)),
                b"x",
            ); // ustar prefix
            b.finish().unwrap();
        }
        let info = feed(&out, 333).1.unwrap();
        assert_eq!(info.entries, 4);
        assert_eq!(info.digest, sha(&out));
    }

    #[test]
    fn trailing_bytes_after_the_end_are_hashed_but_not_parsed() {
        let mut bytes = good().end();
        bytes.extend_from_slice(b"not a header at all");
        let (digest, info) = feed(&bytes, 1000);
        assert_eq!(digest, sha(&bytes));
        assert_eq!(info.unwrap().size, bytes.len() as u64);
    }

    #[test]
    fn an_archive_ending_on_a_header_boundary_is_accepted_as_tar_does() {
        let bytes = good().0;
        assert!(feed(&bytes, 512).1.is_ok());
    }

    #[test]
    fn truncated_archives_are_refused() {
        let bytes = good().end();
        let pages_header = 5 * 512; // after config.dump and spec.dump (header + body), checkpoint/
        for (cut, why) in [
            (100, "truncated inside a header"),
            (pages_header + 100, "truncated inside a header"),
            (pages_header + 512 + 50_000, "truncated inside an entry"),
            (pages_header + 512 + 100_000 + 10, "truncated inside an entry"), // in the padding
        ] {
            let (digest, result) = feed(&bytes[..cut], 4096);
            assert_eq!(corrupt_why(result), why, "cut at {cut}");
            assert_eq!(digest, sha(&bytes[..cut]));
        }
    }

    #[test]
    fn a_bad_header_checksum_is_refused_where_it_is() {
        let mut bytes = good().end();
        bytes[1024 + 3] ^= 0x20; // name of the spec.dump header
        match feed(&bytes, 4096).1 {
            Err(ArchiveError::Corrupt { offset, why }) => {
                assert_eq!((offset, why), (1024, "header checksum mismatch"));
            }
            other => panic!("{other:?}"),
        }
        let noise: Vec<u8> = pages(4096).iter().map(|b| b | 1).collect();
        assert_eq!(corrupt_why(feed(&noise, 4096).1), "header checksum is not a number");
    }

    #[test]
    fn after_a_problem_the_rest_is_still_hashed() {
        let mut bytes = good().end();
        bytes[3] ^= 0x20;
        let mut v = Validator::new();
        for c in bytes.chunks(1000) {
            v.update(c);
        }
        assert!(!v.is_ok());
        assert_eq!(v.size(), bytes.len() as u64);
        assert_eq!(v.finish().0, sha(&bytes));
    }

    #[test]
    fn archives_missing_required_entries_are_incomplete() {
        let cases = [
            (
                Tar::default().file("spec.dump", b"{}").entry(b'5', "checkpoint", ""),
                "no config.dump",
            ),
            (
                Tar::default().file("config.dump", CONFIG).entry(b'5', "checkpoint", ""),
                "no spec.dump",
            ),
            (
                Tar::default().file("config.dump", CONFIG).file("spec.dump", b"{}"),
                "no checkpoint/ directory",
            ),
        ];
        for (tar, why) in cases {
            match feed(&tar.end(), 4096).1 {
                Err(ArchiveError::Incomplete(got)) => assert_eq!(got, why),
                other => panic!("{why}: {other:?}"),
            }
        }
        let bad_config = Tar::default().file("config.dump", b"{not json").end();
        assert!(matches!(feed(&bad_config, 7).1, Err(ArchiveError::Config(_))));
    }

    #[test]
    fn entries_that_could_escape_the_layer_are_refused() {
        let cases: Vec<(Tar, &str)> = vec![
            (good().file("../x", b""), "'..' component"),
            (good().file("checkpoint/../../x", b""), "'..' component"),
            (good().file("/etc/passwd", b""), "absolute path"),
            // Long names are the names that count: checked like any other.
            (
                good()
                    .raw(header(b'L', b"././@LongLink", 12, b""), b"../../etc/x\0")
                    .file("checkpoint/ok", b""),
                "'..' component",
            ),
            // A NUL ends a name for C and Go readers: "..\0x" is "..".
            (
                good()
                    .raw(header(b'L', b"././@LongLink", 4, b""), b"..\0x")
                    .file("checkpoint/ok", b""),
                "'..' component",
            ),
            (
                good().pax(&[("path", "/etc/cron.d/x")]).file("checkpoint/ok", b""),
                "absolute path",
            ),
            (
                good().entry(b'2', "checkpoint/l", "/etc/shadow"),
                "link to an absolute path",
            ),
            (
                good().entry(b'2', "checkpoint/l", "../../etc"),
                "link pointing outside the archive",
            ),
            (
                good().entry(b'1', "checkpoint/h", "../x"),
                "link pointing outside the archive",
            ),
            (
                good()
                    .pax(&[("linkpath", "../../../x")])
                    .entry(b'2', "checkpoint/l", "ok"),
                "link pointing outside the archive",
            ),
            (good().entry(b'2', "checkpoint/l", ""), "link without target"),
            (
                good().entry(b'3', "checkpoint/tty", ""),
                "device, fifo or unknown entry type",
            ),
            (
                good().entry(b'4', "checkpoint/sda", ""),
                "device, fifo or unknown entry type",
            ),
            (
                good().entry(b'6', "checkpoint/fifo", ""),
                "device, fifo or unknown entry type",
            ),
            (
                good().entry(b'S', "checkpoint/sparse", ""),
                "device, fifo or unknown entry type",
            ),
        ];
        for (tar, why) in cases {
            assert_eq!(unsafe_why(&tar.end()), why);
        }
        // Links that stay inside are fine.
        let ok = good()
            .entry(b'2', "checkpoint/l", "../spec.dump")
            .entry(b'1', "checkpoint/h", "spec.dump")
            .end();
        assert!(feed(&ok, 4096).1.is_ok());
    }

    #[test]
    fn extension_headers_are_bounded_and_must_describe_a_member() {
        let two_names = good()
            .raw(header(b'L', b"././@LongLink", 2, b""), b"a\0")
            .raw(header(b'L', b"././@LongLink", 2, b""), b"b\0")
            .file("checkpoint/x", b"");
        assert_eq!(
            corrupt_why(feed(&two_names.end(), 4096).1),
            "two extension headers of one kind for the same member"
        );
        let huge = good().raw(header(b'L', b"././@LongLink", MAX_EXTENSION + 1, b""), b"");
        assert_eq!(
            corrupt_why(feed(&huge.end(), 4096).1),
            "extension header larger than 1 MiB"
        );
        let dangling = good().pax(&[("path", "checkpoint/x")]);
        assert_eq!(
            corrupt_why(feed(&dangling.end(), 4096).1),
            "extension headers without the member they describe"
        );
        let malformed = good()
            .raw(header(b'x', b"PaxHeaders/x", 9, b""), b"99 path=x")
            .file("checkpoint/x", b"");
        assert_eq!(corrupt_why(feed(&malformed.end(), 4096).1), "malformed PAX record");
    }

    #[test]
    fn a_pax_size_overrides_the_header_size() {
        // Header says 0 bytes, PAX says 600: the 600 bytes are the body, not a header.
        let tar = good()
            .pax(&[("size", "600")])
            .raw(header(b'0', b"checkpoint/big", 0, b""), &[0xAB; 600])
            .end();
        let info = feed(&tar, 100).1.unwrap();
        assert_eq!(info.entries, 5);
    }

    #[test]
    fn numeric_fields_in_octal_and_base_256() {
        assert_eq!(numeric(b"00000001750\0"), Some(1000));
        assert_eq!(numeric(b" 1750 \0\0\0\0\0\0"), Some(1000));
        let mut big = [0u8; 12];
        big[0] = 0x80;
        big[4..].copy_from_slice(&(10u64 << 30).to_be_bytes());
        assert_eq!(numeric(&big), Some(10 << 30));
        big[1] = 1; // more than 64 bits
        assert_eq!(numeric(&big), None);
        assert_eq!(numeric(b"12x\0\0\0\0\0\0\0\0\0"), None);
        assert_eq!(numeric(&[0; 12]), None);
    }
}
