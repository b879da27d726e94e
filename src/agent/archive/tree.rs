//! The tree an archive would create, entry by entry, for the checks that depend on earlier
//! entries. Each entry alone can look harmless while together they escape: `a -> .`,
//! `a/b -> ..`, then `a/b/x` writes outside the extraction directory. So no entry may pass
//! through a symlink, no symlink may replace an earlier entry or sit on the way of an earlier
//! link, and links resolve (lexically, with what is known so far) inside the root.

use std::{
    collections::{HashMap, HashSet},
    path::{Component, Path, PathBuf},
};

/// Most entries accepted in one archive (a real checkpoint has a few dozen; a rootfs diff a
/// few thousand).
pub const MAX_ENTRIES: usize = 200_000;
/// Largest entry: above any container's memory on one node.
pub const MAX_ENTRY_SIZE: u64 = 1 << 40;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TreeError(pub &'static str);

/// An entry as the tree sees it.
#[derive(Debug, Clone, Copy)]
pub enum Entry<'a> {
    Dir,
    File,
    Symlink(&'a Path),
    HardLink(&'a Path),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Dir,
    File,
    Symlink,
}

#[derive(Debug, Default)]
pub struct Tree {
    kinds: HashMap<PathBuf, Kind>,
    /// Every prefix of every link's resolved target: a later symlink there would redirect it.
    on_link_paths: HashSet<PathBuf>,
    entries: usize,
    /// Absolute symlink targets are taken relative to the root, as inside a container's
    /// root filesystem (the nested `rootfs-diff.tar`); elsewhere they are refused.
    rootfs: bool,
}

impl Tree {
    pub fn new() -> Self {
        Self::default()
    }

    /// A tree for a container root filesystem diff.
    pub fn rootfs() -> Self {
        Self {
            rootfs: true,
            ..Self::default()
        }
    }

    /// Add the entry at `path` (already relative and free of `..`).
    pub fn add(&mut self, path: &Path, entry: Entry<'_>, mode: u64, size: u64) -> Result<(), TreeError> {
        self.entries += 1;
        if self.entries > MAX_ENTRIES {
            return Err(TreeError("more entries than any checkpoint has"));
        }
        if size > MAX_ENTRY_SIZE {
            return Err(TreeError("entry larger than 1 TiB"));
        }
        if mode & 0o6000 != 0 && !matches!(entry, Entry::Dir) {
            return Err(TreeError("setuid or setgid bit"));
        }
        if path.as_os_str().is_empty() {
            // The archive root itself ("./"): only as a directory.
            return match entry {
                Entry::Dir => Ok(()),
                _ => Err(TreeError("entry at the archive root")),
            };
        }
        for ancestor in path.ancestors().skip(1) {
            if self.kinds.get(ancestor) == Some(&Kind::Symlink) {
                return Err(TreeError("path through a symlink"));
            }
        }
        let before = self.kinds.get(path).copied();
        let kind = match entry {
            Entry::Dir => {
                if matches!(before, Some(Kind::File | Kind::Symlink)) {
                    return Err(TreeError("directory replaces an earlier entry"));
                }
                Kind::Dir
            }
            Entry::File => {
                if matches!(before, Some(Kind::Dir | Kind::Symlink)) {
                    return Err(TreeError("file replaces an earlier entry"));
                }
                Kind::File
            }
            Entry::HardLink(target) => {
                if before.is_some() {
                    return Err(TreeError("link replaces an earlier entry"));
                }
                // A hard link's target is relative to the archive root. It is resolved once,
                // when unpacked: later entries cannot redirect it.
                let resolved = self.resolve(Path::new(""), target, false, &mut Vec::new())?;
                if self.kinds.get(&resolved) != Some(&Kind::File) {
                    return Err(TreeError("hard link to no earlier regular file"));
                }
                Kind::File
            }
            Entry::Symlink(target) => {
                if before.is_some() {
                    return Err(TreeError("symlink replaces an earlier entry"));
                }
                if self.on_link_paths.contains(path) {
                    return Err(TreeError("symlink on the way of an earlier link"));
                }
                let base = path.parent().unwrap_or(Path::new(""));
                let mut walked = Vec::new();
                let resolved = self.resolve(base, target, self.rootfs, &mut walked)?;
                if resolved.starts_with(path) {
                    return Err(TreeError("symlink to itself or below it"));
                }
                // A symlink is followed when used, after every entry: none of the places its
                // target walks through may become a symlink later, not even those a `..`
                // leaves again (`l -> x/..` then `x -> .` makes `l` the parent of the root).
                for prefix in resolved.ancestors() {
                    self.on_link_paths.insert(prefix.to_path_buf());
                }
                self.on_link_paths.extend(walked);
                Kind::Symlink
            }
        };
        for ancestor in path.ancestors().skip(1) {
            if ancestor.as_os_str().is_empty() {
                break;
            }
            if matches!(self.kinds.get(ancestor), Some(Kind::File)) {
                return Err(TreeError("path below a file"));
            }
            self.kinds.entry(ancestor.to_path_buf()).or_insert(Kind::Dir);
        }
        self.kinds.insert(path.to_path_buf(), kind);
        Ok(())
    }

    /// `target` seen from directory `base`, normalised; it must stay inside the root and
    /// pass through no symlink known so far. Every path it walks through (before any `..`
    /// takes it back) is added to `walked`.
    fn resolve(
        &self,
        base: &Path,
        target: &Path,
        absolute_ok: bool,
        walked: &mut Vec<PathBuf>,
    ) -> Result<PathBuf, TreeError> {
        if target.as_os_str().is_empty() {
            return Err(TreeError("link without target"));
        }
        let mut out = if target.is_absolute() {
            if !absolute_ok {
                return Err(TreeError("link to an absolute path"));
            }
            PathBuf::new()
        } else {
            base.to_path_buf()
        };
        for component in target.components() {
            match component {
                Component::Normal(c) => {
                    out.push(c);
                    if self.kinds.get(&out) == Some(&Kind::Symlink) {
                        return Err(TreeError("link through a symlink"));
                    }
                    walked.push(out.clone());
                }
                Component::CurDir | Component::RootDir => {}
                Component::ParentDir => {
                    if !out.pop() {
                        return Err(TreeError("link pointing outside the archive"));
                    }
                }
                Component::Prefix(_) => return Err(TreeError("link to an absolute path")),
            }
        }
        Ok(out)
    }
}
