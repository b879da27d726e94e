use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};

use super::*;
use crate::agent::archive::{self, Validator, digest_file};

fn tree(dir: &Path) {
    std::fs::create_dir_all(dir.join("db/wal")).unwrap();
    std::fs::write(dir.join("db/data"), vec![7u8; 300_000]).unwrap();
    std::fs::write(dir.join("db/wal/0001"), b"written before the drain").unwrap();
    std::fs::set_permissions(dir.join("db/wal/0001"), std::fs::Permissions::from_mode(0o640)).unwrap();
    std::fs::write(dir.join("empty"), b"").unwrap();
    symlink("/etc/hostname", dir.join("abs-link")).unwrap();
    symlink("db/data", dir.join("rel-link")).unwrap();
    nix_mkfifo(&dir.join("pipe"));
}

fn nix_mkfifo(path: &Path) {
    let status = std::process::Command::new("mkfifo").arg(path).status().unwrap();
    assert!(status.success());
}

#[test]
fn a_volume_packs_validates_and_unpacks_to_the_same_tree() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    tree(&src);
    let out = tmp.path().join("scratch.tar");
    let packed = pack("scratch", &src, &out).unwrap();
    assert_eq!(packed.skipped, ["pipe"], "FIFOs hold nothing at rest");
    assert_eq!(std::fs::metadata(&out).unwrap().mode() & 0o777, 0o600);
    // The digest is the file's, as the target checks it.
    assert_eq!(digest_file(&out).unwrap(), (packed.digest.clone(), packed.size));
    // What the target's receiver accepts (absolute symlinks stay inside the volume).
    let mut v = Validator::rootfs();
    v.update(&std::fs::read(&out).unwrap());
    let (digest, verdict) = v.finish();
    assert_eq!(digest, packed.digest);
    verdict.unwrap();

    let dst = tmp.path().join("dst");
    std::fs::create_dir(&dst).unwrap();
    std::fs::write(dst.join("empty"), b"what the replacement's init container wrote").unwrap();
    unpack("scratch", &out, &dst).unwrap();
    assert_eq!(std::fs::read(dst.join("db/data")).unwrap(), vec![7u8; 300_000]);
    assert_eq!(
        std::fs::read(dst.join("db/wal/0001")).unwrap(),
        b"written before the drain"
    );
    assert_eq!(
        std::fs::metadata(dst.join("db/wal/0001")).unwrap().mode() & 0o777,
        0o640
    );
    assert_eq!(
        std::fs::read(dst.join("empty")).unwrap(),
        b"",
        "the source's state wins"
    );
    assert_eq!(
        std::fs::read_link(dst.join("abs-link")).unwrap(),
        Path::new("/etc/hostname")
    );
    assert_eq!(std::fs::read_link(dst.join("rel-link")).unwrap(), Path::new("db/data"));
    assert!(!dst.join("pipe").exists());
    assert_eq!(
        std::fs::metadata(src.join("db/data")).unwrap().mtime(),
        std::fs::metadata(dst.join("db/data")).unwrap().mtime()
    );
}

#[test]
fn packing_a_missing_or_non_directory_mount_fails() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x.tar");
    let err = pack("x", &tmp.path().join("nope"), &out).unwrap_err();
    assert_eq!(err.metric_label(), "volume_io", "{err}");
    std::fs::write(tmp.path().join("file"), b"").unwrap();
    assert!(pack("x", &tmp.path().join("file"), &out).is_err());
}

#[test]
fn unpacking_needs_the_mount_and_stays_inside_it() {
    let tmp = tempfile::tempdir().unwrap();
    let err = unpack("v", &tmp.path().join("none.tar"), &tmp.path().join("no-mount")).unwrap_err();
    assert_eq!(err.metric_label(), "volume_io", "{err}");
    // A tar whose link would lead the next entry out of the volume.
    let evil = tmp.path().join("evil.tar");
    let mut b = tar::Builder::new(std::fs::File::create(&evil).unwrap());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    h.set_mode(0o777);
    b.append_link(&mut h, "out", tmp.path()).unwrap();
    let mut f = tar::Header::new_gnu();
    f.set_size(4);
    f.set_mode(0o644);
    b.append_data(&mut f, "out/escaped", &b"oops"[..]).unwrap();
    b.finish().unwrap();
    drop(b);
    // The receiver refuses it first ...
    let mut v = Validator::rootfs();
    v.update(&std::fs::read(&evil).unwrap());
    assert!(matches!(v.finish().1, Err(archive::ArchiveError::Unsafe { .. })));
    // ... and unpacking would not follow the link either.
    let dst = tmp.path().join("vol");
    std::fs::create_dir(&dst).unwrap();
    assert!(unpack("v", &evil, &dst).is_err());
    assert!(!tmp.path().join("escaped").exists());
}

#[test]
fn container_roots_come_from_the_cgroup_and_mount_paths_stay_plain() {
    let tmp = tempfile::tempdir().unwrap();
    let id = "a".repeat(64);
    let cgroup = tmp.path().join("cgroup/kubepods/crio-".to_string() + &id + ".scope");
    std::fs::create_dir_all(&cgroup).unwrap();
    std::fs::write(cgroup.join("cgroup.freeze"), "1\n").unwrap();
    let freezer = Freezer::new(tmp.path().join("cgroup"), tmp.path().join("holds"));
    let roots = ContainerRoots {
        proc_dir: tmp.path().join("proc"),
        unpacker: Unpacker::InProcess,
    };
    std::fs::write(cgroup.join("cgroup.procs"), "").unwrap();
    let err = roots.root_of(&freezer, &format!("cri-o://{id}")).unwrap_err();
    assert!(err.may_pass(), "not started yet: {err}");
    std::fs::write(cgroup.join("cgroup.procs"), "4242\n4243\n").unwrap();
    let root = roots.root_of(&freezer, &format!("cri-o://{id}")).unwrap();
    assert_eq!(root, tmp.path().join("proc/4242/root"));
    assert_eq!(inside(&root, "/data/db").unwrap(), root.join("data/db"));
    for bad in ["data", "/data/../etc", "/", ""] {
        assert!(inside(&root, bad).is_err(), "{bad}");
    }
}

#[test]
fn the_marker_is_written_once_and_awaited() {
    let tmp = tempfile::tempdir().unwrap();
    let marker = tmp.path().join(api::RESTORED_MARKER);
    assert!(!await_marker(&marker, std::time::Duration::from_millis(150)));
    assert!(!released(tmp.path()));
    release(tmp.path(), "uid-1").unwrap();
    assert!(released(tmp.path()));
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "uid-1");
    assert_eq!(std::fs::metadata(&marker).unwrap().mode() & 0o777, 0o644);
    assert!(await_marker(&marker, std::time::Duration::from_secs(1)));
}
