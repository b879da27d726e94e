//! Structured tar input for the tar_validator target: a fuzzer-chosen list of entries,
//! encoded here with valid checksums (a byte-level mutator almost never gets a header
//! checksum right, so without this the validator's tree rules would stay out of reach).
//!
//! The encoder is written from the format (not through the `tar` crate, whose builder refuses
//! the hostile names this is for), and names are drawn from a small alphabet of the
//! components that matter: `..`, `.`, the checkpoint layout's names, a few plain ones.

use arbitrary::{Arbitrary, Unstructured};

const BLOCK: usize = 512;

/// Path components the names and link targets are made of.
const PARTS: &[&str] = &[
    "a",
    "b",
    "x",
    "..",
    ".",
    "",
    "checkpoint",
    "config.dump",
    "spec.dump",
    "rootfs-diff.tar",
    "pages-1.img",
    "etc",
];

/// A name or link target: components from [`PARTS`], optionally absolute.
#[derive(Debug, Clone)]
pub struct Name(pub Vec<u8>);

impl<'a> Arbitrary<'a> for Name {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let absolute = u.ratio(1, 8)?;
        let n = u.int_in_range(0..=4)?;
        let mut parts = Vec::with_capacity(n);
        for _ in 0..n {
            parts.push(*u.choose(PARTS)?);
        }
        let mut name = parts.join("/");
        if absolute {
            name.insert(0, '/');
        }
        if u.ratio(1, 8)? {
            name.push('/');
        }
        Ok(Name(name.into_bytes()))
    }
}

/// How a name too long or too odd for the header travels.
#[derive(Debug, Clone, Copy, Arbitrary)]
pub enum NameIn {
    Header,
    /// POSIX ustar `prefix` + `name` (split at the last '/').
    UstarPrefix,
    /// A GNU `L` (and `K` for the link) extension header before the member.
    GnuLong,
    /// A PAX `x` header with `path` / `linkpath` (and `size` when `pax_size` is set).
    Pax,
}

#[derive(Debug, Clone, Arbitrary)]
pub enum Body {
    Bytes(Vec<u8>),
    /// A whole nested archive (for `rootfs-diff.tar`).
    Nested(Vec<Member>),
    /// `config.dump`-like JSON.
    Config {
        name: String,
        image: String,
    },
}

#[derive(Debug, Clone, Arbitrary)]
pub struct Member {
    /// The type flag: `0`, `5`, `2`, `1`, or anything (device nodes, `g`, junk).
    pub flag: Flag,
    pub name: Name,
    pub link: Name,
    pub mode: u16,
    pub body: Body,
    pub name_in: NameIn,
    /// With [`NameIn::Pax`]: a PAX `size` that differs from the body's.
    pub pax_size: Option<u16>,
}

#[derive(Debug, Clone, Copy)]
pub struct Flag(pub u8);

impl<'a> Arbitrary<'a> for Flag {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let common = [b'0', b'0', b'5', b'5', b'2', b'1', b'\0', b'g', b'3', b'7'];
        Ok(Flag(if u.ratio(7, 8)? {
            *u.choose(&common)?
        } else {
            u.arbitrary()?
        }))
    }
}

fn octal(field: &mut [u8], value: u64) {
    let digits = field.len() - 1;
    let text = format!("{value:0digits$o}");
    let text = text.as_bytes();
    field[..digits].copy_from_slice(&text[text.len() - digits..]);
    field[digits] = 0;
}

fn copy_into(field: &mut [u8], bytes: &[u8]) {
    let n = bytes.len().min(field.len());
    field[..n].copy_from_slice(&bytes[..n]);
}

/// One 512-byte header with a valid checksum.
pub fn header(flag: u8, name: &[u8], prefix: &[u8], link: &[u8], mode: u64, size: u64) -> [u8; BLOCK] {
    let mut h = [0u8; BLOCK];
    copy_into(&mut h[..100], name);
    octal(&mut h[100..108], mode);
    octal(&mut h[108..116], 0);
    octal(&mut h[116..124], 0);
    octal(&mut h[124..136], size);
    octal(&mut h[136..148], 0);
    h[156] = flag;
    copy_into(&mut h[157..257], link);
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    copy_into(&mut h[345..500], prefix);
    h[148..156].fill(b' ');
    let sum: u64 = h.iter().map(|&b| u64::from(b)).sum();
    octal(&mut h[148..155], sum);
    h[155] = b' ';
    h
}

fn push(out: &mut Vec<u8>, header: [u8; BLOCK], body: &[u8]) {
    out.extend_from_slice(&header);
    out.extend_from_slice(body);
    out.resize(out.len().next_multiple_of(BLOCK), 0);
}

fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
    let rest_len = key.len() + value.len() + 3; // ' ', '=', '\n'
    let mut len = rest_len + 1;
    while len.to_string().len() + rest_len != len {
        len += 1;
    }
    let mut r = format!("{len} {key}=").into_bytes();
    r.extend_from_slice(value);
    r.push(b'\n');
    r
}

/// The archive for `members`, with the end-of-archive blocks when `end` is set.
pub fn encode(members: &[Member], end: bool, depth: u8) -> Vec<u8> {
    let mut out = Vec::new();
    for m in members {
        let body = match &m.body {
            Body::Bytes(b) => b.clone(),
            Body::Nested(inner) if depth == 0 => encode(inner, true, depth + 1),
            Body::Nested(_) => Vec::new(),
            Body::Config { name, image } => {
                format!(r#"{{"id":"c1","name":{name:?},"rootfsImageName":{image:?}}}"#).into_bytes()
            }
        };
        let body = if matches!(m.flag.0, b'0' | b'\0' | b'g' | b'7') {
            body
        } else {
            Vec::new()
        };
        let mode = u64::from(m.mode) & 0o7777;
        let name = &m.name.0;
        let link = &m.link.0;
        match m.name_in {
            NameIn::Header => push(
                &mut out,
                header(m.flag.0, name, b"", link, mode, body.len() as u64),
                &body,
            ),
            NameIn::UstarPrefix => {
                let split = name.iter().rposition(|&b| b == b'/').unwrap_or(0);
                let (prefix, rest) = name.split_at(split);
                let rest = rest.strip_prefix(b"/").unwrap_or(rest);
                push(
                    &mut out,
                    header(m.flag.0, rest, prefix, link, mode, body.len() as u64),
                    &body,
                );
            }
            NameIn::GnuLong => {
                let long = [name.as_slice(), b"\0"].concat();
                push(
                    &mut out,
                    header(b'L', b"././@LongLink", b"", b"", 0, long.len() as u64),
                    &long,
                );
                if !link.is_empty() {
                    let long = [link.as_slice(), b"\0"].concat();
                    push(
                        &mut out,
                        header(b'K', b"././@LongLink", b"", b"", 0, long.len() as u64),
                        &long,
                    );
                }
                push(
                    &mut out,
                    header(m.flag.0, b"long", b"", b"", mode, body.len() as u64),
                    &body,
                );
            }
            NameIn::Pax => {
                let mut records = pax_record("path", name);
                if !link.is_empty() {
                    records.extend(pax_record("linkpath", link));
                }
                if let Some(size) = m.pax_size {
                    records.extend(pax_record("size", size.to_string().as_bytes()));
                }
                push(
                    &mut out,
                    header(b'x', b"PaxHeaders/x", b"", b"", 0o644, records.len() as u64),
                    &records,
                );
                push(
                    &mut out,
                    header(m.flag.0, b"pax", b"", b"", mode, body.len() as u64),
                    &body,
                );
            }
        }
    }
    if end {
        out.extend_from_slice(&[0; 2 * BLOCK]);
    }
    out
}

/// A member for the seed corpora and the harness's own tests.
pub fn member(flag: u8, name: &str, link: &str, body: Body) -> Member {
    Member {
        flag: Flag(flag),
        name: Name(name.as_bytes().to_vec()),
        link: Name(link.as_bytes().to_vec()),
        mode: 0o644,
        body,
        name_in: NameIn::Header,
        pax_size: None,
    }
}
