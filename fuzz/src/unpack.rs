//! The slow check of an accepted archive: unpack it with the `tar` crate into a fresh
//! directory inside a sandbox directory, then require that nothing appeared beside that
//! directory and that every symlink created resolves inside it (or to nothing).
//!
//! The `tar` crate is not what runtimes unpack with (Go's archive/tar is), and it refuses
//! some archives the validator accepts: a refusal is no finding. What counts is an archive
//! the validator accepted leaving something outside the directory, or a link that leads out.

use std::{
    fs,
    path::{Path, PathBuf},
};

/// Unpack `bytes`; panics when something lands or points outside the directory.
/// `absolute_links_inside`: absolute symlink targets mean the root (a container's root file
/// system), so they are not followed on this host; links are then checked only when the tree
/// has no absolute link.
pub fn check(bytes: &[u8], absolute_links_inside: bool) {
    let sandbox = tempfile::tempdir().expect("temp dir");
    let dst = sandbox.path().join("root");
    fs::create_dir(&dst).expect("mkdir");
    let mut archive = tar::Archive::new(bytes);
    archive.set_preserve_permissions(false);
    archive.set_overwrite(false);
    let _ = archive.unpack(&dst);

    let beside: Vec<PathBuf> = fs::read_dir(sandbox.path())
        .expect("read sandbox")
        .map(|e| e.expect("entry").path())
        .filter(|p| p != &dst)
        .collect();
    assert!(
        beside.is_empty(),
        "accepted archive wrote outside its directory: {beside:?}"
    );

    let mut links = Vec::new();
    walk(&dst, &mut links);
    let has_absolute = links.iter().any(|l| fs::read_link(l).is_ok_and(|t| t.is_absolute()));
    if absolute_links_inside && has_absolute {
        return;
    }
    let root = fs::canonicalize(&dst).expect("canonical root");
    for link in &links {
        if let Ok(resolved) = fs::canonicalize(link) {
            assert!(
                resolved.starts_with(&root),
                "accepted archive has symlink {:?} -> {:?} resolving to {resolved:?}, outside {root:?}",
                link.strip_prefix(&dst).unwrap_or(link),
                fs::read_link(link).ok(),
            );
        }
    }
}

fn walk(dir: &Path, links: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        match entry.file_type() {
            Ok(t) if t.is_symlink() => links.push(path),
            Ok(t) if t.is_dir() => walk(&path, links),
            _ => {}
        }
    }
}
