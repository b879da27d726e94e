//! Validator tests: hand-made headers, so hostile archives the `tar` crate would refuse to
//! write can be fed in.

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

/// Recompute the checksum of a header edited by hand.
fn reseal(h: &mut [u8; BLOCK]) {
    h[148..156].fill(b' ');
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
}

fn with_mode(mut h: [u8; BLOCK], mode: u32) -> [u8; BLOCK] {
    h[100..108].copy_from_slice(format!("{mode:07o}\0").as_bytes());
    reseal(&mut h);
    h
}

#[test]
fn entries_are_checked_against_the_tree_before_them() {
    let cases: Vec<(Tar, &str)> = vec![
        // The symlink chain: each link alone stays inside, together they escape.
        (
            good()
                .entry(b'2', "checkpoint/a", ".")
                .entry(b'2', "checkpoint/a/b", "..")
                .file("checkpoint/a/b/etc/x", b""),
            "path through a symlink",
        ),
        (
            good().entry(b'2', "checkpoint/up", "..").file("checkpoint/up/x", b""),
            "path through a symlink",
        ),
        // A link whose target goes through an earlier symlink.
        (
            good()
                .entry(b'2', "checkpoint/a", "..")
                .entry(b'2', "checkpoint/b", "a/../.."),
            "link through a symlink",
        ),
        // A symlink put where an earlier link already points.
        (
            good()
                .entry(b'2', "checkpoint/l", "d/x")
                .entry(b'2', "checkpoint/d", ".."),
            "symlink on the way of an earlier link",
        ),
        // A later symlink on a path the target walks through and leaves again with `..`:
        // `l -> x/..` looked like the directory `l` is in, but with `x -> .` it is one level
        // up (at the archive root: outside the extraction directory). Found writing the
        // tar_validator fuzz target, whose unpack check reproduces it.
        (
            good()
                .entry(b'2', "checkpoint/l", "x/..")
                .entry(b'2', "checkpoint/x", "."),
            "symlink on the way of an earlier link",
        ),
        (
            good()
                .entry(b'2', "checkpoint/l", "x/y/../../pages-1.img")
                .entry(b'5', "checkpoint/x/", "")
                .entry(b'2', "checkpoint/x/y", ".."),
            "symlink on the way of an earlier link",
        ),
        // Replacing a directory (with entries in it) by a symlink.
        (
            good().entry(b'2', "checkpoint", ".."),
            "symlink replaces an earlier entry",
        ),
        (
            good().entry(b'1', "checkpoint/h", "nowhere"),
            "hard link to no earlier regular file",
        ),
        (
            good().raw(with_mode(header(b'0', b"checkpoint/su", 0, b""), 0o4755), b""),
            "setuid or setgid bit",
        ),
        (
            good().raw(with_mode(header(b'0', b"checkpoint/sg", 0, b""), 0o2755), b""),
            "setuid or setgid bit",
        ),
    ];
    for (tar, why) in cases {
        assert_eq!(unsafe_why(&tar.end()), why);
    }
    // A setgid directory is ordinary (group inheritance), and links inside are fine.
    let ok = good()
        .raw(with_mode(header(b'5', b"checkpoint/shared/", 0, b""), 0o2775), b"")
        .entry(b'2', "checkpoint/shared/l", "../pages-1.img")
        .end();
    assert!(feed(&ok, 4096).1.is_ok());
}

#[test]
fn an_absurd_size_is_refused_before_its_body() {
    let mut h = header(b'0', b"checkpoint/huge", 0, b"");
    // 2 TiB in GNU base-256: a header can claim it; nothing of it follows.
    h[124..136].copy_from_slice(&[0x80, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0]);
    reseal(&mut h);
    assert_eq!(unsafe_why(&good().raw(h, b"").end()), "entry larger than 1 TiB");
}

/// A checkpoint archive holding `rootfs` as its `rootfs-diff.tar`.
fn with_rootfs(rootfs: Tar) -> Vec<u8> {
    good().file("rootfs-diff.tar", &rootfs.end()).end()
}

#[test]
fn the_nested_rootfs_diff_is_checked_the_same_way() {
    let cases: Vec<(Tar, &str, &str)> = vec![
        (
            Tar::default().file("../../etc/cron.d/x", b""),
            "'..' component",
            "rootfs-diff.tar/../../etc/cron.d/x",
        ),
        (
            Tar::default().entry(b'2', "tmp/l", "../../..").file("tmp/ok", b""),
            "link pointing outside the archive",
            "rootfs-diff.tar/tmp/l",
        ),
        (
            Tar::default().entry(b'2', "tmp/a", "/").file("tmp/a/etc/shadow", b""),
            "path through a symlink",
            "rootfs-diff.tar/tmp/a/etc/shadow",
        ),
        (
            Tar::default().entry(b'2', "l", "x/..").entry(b'2', "x", "."),
            "symlink on the way of an earlier link",
            "rootfs-diff.tar/x",
        ),
        (
            Tar::default().raw(with_mode(header(b'0', b"usr/bin/su", 0, b""), 0o4755), b""),
            "setuid or setgid bit",
            "rootfs-diff.tar/usr/bin/su",
        ),
        (
            Tar::default().entry(b'3', "dev/tty9", ""),
            "device, fifo or unknown entry type",
            "rootfs-diff.tar/dev/tty9",
        ),
    ];
    for (rootfs, why, at) in cases {
        match feed(&with_rootfs(rootfs), 4096).1 {
            Err(ArchiveError::Unsafe { path, why: got }) => assert_eq!((got, path.as_str()), (why, at)),
            other => panic!("{at}: expected unsafe, got {other:?}"),
        }
    }
    // Inside a root file system an absolute symlink stays inside it: accepted.
    let ok = Tar::default()
        .entry(b'5', "etc/", "")
        .file("etc/app.conf", b"x=1\n")
        .entry(b'2', "etc/current", "/etc/app.conf")
        .file("config.dump", b"not json: a container's own file");
    assert!(feed(&with_rootfs(ok), 4096).1.is_ok());
    // Garbage where the rootfs diff should be is corruption, not a pass.
    let bad = good().file("rootfs-diff.tar", &[7u8; 1024]).end();
    assert!(matches!(feed(&bad, 4096).1, Err(ArchiveError::Corrupt { .. })));
}
