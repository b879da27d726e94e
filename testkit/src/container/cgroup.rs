//! A stand-in for a container's cgroup v2 directory, so that the node agent's freezer works on
//! the test kubelet's simulated containers exactly as on a real node: it writes
//! `cgroup.freeze` and waits for `frozen 1` in `cgroup.events`, writes `cgroup.kill`. The
//! simulated container reads these files between ticks (see `Container::start`), so once the
//! events file says frozen, it does not tick again until thawed.

use std::path::{Path, PathBuf};

pub struct FakeCgroup {
    dir: PathBuf,
    frozen: bool,
}

fn read_flag(path: &Path) -> bool {
    std::fs::read_to_string(path).is_ok_and(|s| s.trim() == "1")
}

impl FakeCgroup {
    /// `<root>/kubepods/pod<uid>/testkit-<id>`, with a `cgroup.controllers` marker at the root
    /// (a v2 hierarchy).
    pub fn create(root: &Path, pod_uid: &str, id: &str) -> std::io::Result<Self> {
        std::fs::create_dir_all(root)?;
        std::fs::write(root.join("cgroup.controllers"), "cpu memory pids\n")?;
        let dir = root.join(format!("kubepods/pod{pod_uid}/testkit-{id}"));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("cgroup.freeze"), "0\n")?;
        std::fs::write(dir.join("cgroup.kill"), "")?;
        std::fs::write(dir.join("cgroup.procs"), "")?;
        std::fs::write(dir.join("cgroup.events"), "populated 1\nfrozen 0\n")?;
        Ok(Self { dir, frozen: false })
    }

    /// Apply what was written: Some(true) frozen, Some(false) runs, None killed. The events
    /// file follows, as the kernel's does once every task is frozen.
    pub fn poll(&mut self) -> Option<bool> {
        let frozen = read_flag(&self.dir.join("cgroup.freeze"));
        // Read after the freeze flag: the agent kills before it thaws, so a thawed cgroup read
        // here was killed first and is seen dead, never ticking in between.
        if read_flag(&self.dir.join("cgroup.kill")) {
            return None;
        }
        if frozen != self.frozen {
            self.frozen = frozen;
            let events = format!("populated 1\nfrozen {}\n", u8::from(frozen));
            let _ = std::fs::write(self.dir.join("cgroup.events"), events);
        }
        Some(frozen)
    }
}

impl Drop for FakeCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
