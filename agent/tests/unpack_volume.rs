//! `kube-migrate-agent unpack-volume`, the child the target agent runs to fill a replacement's
//! emptyDir: chrooted into the container's root, so that the volume path and any symlink in
//! the tar resolve inside the container (through `/proc/<pid>/root` they would not). Needs
//! root (chroot); skipped, saying so, without it.

use std::{path::Path, process::Command};

fn unpack(root: &Path, tar: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kube-migrate-agent"))
        .args(["unpack-volume", "--root"])
        .arg(root)
        .args(["--dir", "/kube-migrate/volumes/state", "--volume", "state"])
        .stdin(std::fs::File::open(tar).unwrap())
        .output()
        .unwrap()
}

fn tar_of(path: &Path, entries: &[(&str, Option<&str>, &[u8])]) {
    let mut b = tar::Builder::new(std::fs::File::create(path).unwrap());
    for (name, link, data) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o640);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        match link {
            Some(target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                b.append_link(&mut h, name, target).unwrap();
            }
            None => {
                h.set_size(data.len() as u64);
                b.append_data(&mut h, name, *data).unwrap();
            }
        }
    }
    b.finish().unwrap();
}

#[test]
fn unpacks_inside_the_container_root_and_never_through_a_link() {
    if !rustix_is_root() {
        eprintln!("SKIPPED: unpack-volume chroots, which needs root");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("container-root");
    let volume = root.join("kube-migrate/volumes/state");
    std::fs::create_dir_all(&volume).unwrap();
    let good = tmp.path().join("good.tar");
    tar_of(
        &good,
        &[
            ("db/wal", None, b"written before the drain"),
            ("current", Some("/db/wal"), b""),
        ],
    );
    let out = unpack(&root, &good);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        std::fs::read(volume.join("db/wal")).unwrap(),
        b"written before the drain"
    );
    assert_eq!(
        std::fs::read_link(volume.join("current")).unwrap(),
        Path::new("/db/wal")
    );

    // A link to the container's root, then a file through it: refused, nothing written
    // outside the volume (neither in the container's root nor on the host).
    let evil = tmp.path().join("evil.tar");
    tar_of(&evil, &[("up", Some("/"), b""), ("up/escaped", None, b"oops")]);
    let out = unpack(&root, &evil);
    assert!(!out.status.success(), "an entry through a link must be refused");
    assert!(!root.join("escaped").exists());
    assert!(!Path::new("/escaped").exists());

    // No such directory in the container: a clear error, not a panic.
    let out = Command::new(env!("CARGO_BIN_EXE_kube-migrate-agent"))
        .args(["unpack-volume", "--root"])
        .arg(tmp.path().join("nowhere"))
        .args(["--dir", "/x", "--volume", "x"])
        .stdin(std::fs::File::open(&good).unwrap())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("chroot"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn rustix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}
