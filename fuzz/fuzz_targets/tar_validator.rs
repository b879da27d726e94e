//! The archive validator (`kube_migrate::agent::archive::Validator`), both modes.
//!
//! Input: one flag byte, then either the archive's raw bytes or (flag bit 2) a structured
//! list of members that `kube_migrate_fuzz::tarfmt` encodes with valid checksums.
//! Flag bit 0: rootfs mode (`Validator::rootfs()`), else a checkpoint archive.
//! Flag bit 1: also unpack an accepted archive with the `tar` crate (slow path).
//! Flag bits 3..8: seed of the chunking.
//!
//! Checked beyond "no panic":
//! * the digest is the SHA-256 of the bytes, whatever the chunking;
//! * the verdict (accepted info, or the error's text) is the same fed whole, in seeded
//!   random chunks, and through `archive::validate` (the Read-based entry point);
//! * an accepted archive's info names its size and digest;
//! * an accepted checkpoint archive is accepted as a plain tree too (rootfs rules are the
//!   looser ones);
//! * unpacked (bit 1), nothing lands or points outside the directory.
#![no_main]

use kube_migrate::agent::archive::{self, ArchiveError, ArchiveInfo, Validator};
use kube_migrate_fuzz::{chunks, tarfmt, unpack};
use libfuzzer_sys::{
    arbitrary::{Arbitrary, Unstructured},
    fuzz_target,
};
use sha2::{Digest, Sha256};

fn verdict(r: &Result<ArchiveInfo, ArchiveError>) -> Result<ArchiveInfo, String> {
    match r {
        Ok(info) => Ok(info.clone()),
        Err(e) => Err(e.to_string()),
    }
}

fn feed<'a>(rootfs: bool, parts: impl IntoIterator<Item = &'a [u8]>) -> (String, Result<ArchiveInfo, ArchiveError>) {
    let mut v = if rootfs { Validator::rootfs() } else { Validator::new() };
    for p in parts {
        v.update(p);
    }
    v.finish()
}

/// A reader handing out the chunks as they come (short reads).
struct Chunked<'a>(std::vec::IntoIter<&'a [u8]>);

impl std::io::Read for Chunked<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self.0.next() {
            Some(c) => {
                // Chunks are shorter than validate's 1 MiB buffer.
                buf[..c.len()].copy_from_slice(c);
                Ok(c.len())
            }
            None => Ok(0),
        }
    }
}

fn check(flags: u8, bytes: &[u8]) {
    let rootfs = flags & 1 != 0;
    let seed = u64::from(flags >> 3).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ bytes.len() as u64;
    let (digest, whole) = feed(rootfs, [bytes]);
    assert_eq!(digest, format!("sha256:{}", hex::encode(Sha256::digest(bytes))));
    let parts = chunks(bytes, seed);
    let (digest2, chunked) = feed(rootfs, parts.iter().copied());
    assert_eq!(digest, digest2, "digest depends on chunking");
    assert_eq!(verdict(&whole), verdict(&chunked), "verdict depends on chunking");
    if !rootfs {
        let read = archive::validate(Chunked(parts.into_iter()));
        assert_eq!(verdict(&whole), verdict(&read), "validate() disagrees with Validator");
    }
    let Ok(info) = whole else { return };
    assert_eq!(info.digest, digest);
    assert_eq!(info.size, bytes.len() as u64);
    if !rootfs {
        let (_, as_tree) = feed(true, [bytes]);
        assert!(
            as_tree.is_ok(),
            "accepted as a checkpoint but refused as a plain tree: {as_tree:?}"
        );
    }
    if flags & 2 != 0 {
        unpack::check(bytes, rootfs);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    if flags & 4 == 0 {
        check(flags, rest);
        return;
    }
    let mut u = Unstructured::new(rest);
    let Ok(members) = Vec::<tarfmt::Member>::arbitrary(&mut u) else {
        return;
    };
    let end = u.arbitrary().unwrap_or(true);
    check(flags, &tarfmt::encode(&members, end, 0));
});
