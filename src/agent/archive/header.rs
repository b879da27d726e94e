//! The byte-level pieces of tar: numeric fields, names, PAX records, and the lexical checks
//! of a path or link target.

use std::path::{Component, Path, PathBuf};

use super::BLOCK;

/// A path inside the archive, refused when it could escape the directory it is unpacked in.
pub(super) fn safe_relative(path: &Path) -> Result<PathBuf, &'static str> {
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

/// The PAX records (`<len> <key>=<value>\n`) that change how the next member is read.
#[derive(Debug, Default)]
pub(super) struct Pax {
    pub(super) path: Option<Vec<u8>>,
    pub(super) linkpath: Option<Vec<u8>>,
    pub(super) size: Option<u64>,
}

impl Pax {
    pub(super) fn parse(mut records: &[u8]) -> Result<Self, &'static str> {
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

/// Bytes of a name field up to its first NUL: what C and Go readers see.
pub(super) fn until_nul(bytes: &[u8]) -> &[u8] {
    bytes.iter().position(|&b| b == 0).map_or(bytes, |i| &bytes[..i])
}

pub(super) fn octal(field: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(until_nul(field)).ok()?.trim();
    u64::from_str_radix(text, 8).ok()
}

/// A numeric header field: octal text, or GNU base-256 (sizes of 8 GiB and more).
pub(super) fn numeric(field: &[u8]) -> Option<u64> {
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

/// The name in a header: `prefix/name` for POSIX ustar headers, `name` otherwise (GNU
/// headers keep other fields where ustar has the prefix).
pub(super) fn header_path(h: &[u8; BLOCK]) -> Vec<u8> {
    let name = until_nul(&h[..100]);
    let ustar = &h[257..263] == b"ustar\0" && &h[263..265] == b"00";
    let prefix = until_nul(&h[345..500]);
    if ustar && !prefix.is_empty() {
        [prefix, b"/", name].concat()
    } else {
        name.to_vec()
    }
}
