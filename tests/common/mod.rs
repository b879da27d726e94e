//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::Path;

pub mod admission;
pub mod agents;

/// Write a checkpoint archive in the CRI-O layout with `pages` bytes of "memory".
pub fn write_archive(path: &Path, container: &str, base_image: &str, pages: &[u8]) {
    let file = std::fs::File::create(path).unwrap();
    let mut tar = tar::Builder::new(file);
    let mut add = |name: &str, body: &[u8]| {
        let mut header = tar::Header::new_gnu();
        header.set_size(body.len() as u64);
        header.set_mode(0o600);
        header.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut header, name, body).unwrap();
    };
    let config = serde_json::json!({
        "id": "3f2a", "name": container, "rootfsImageName": base_image,
        "rootfsImageRef": "sha256:0000", "runtime": "crun",
        "createdTime": "2026-11-23T10:00:00Z", "checkpointedTime": "2026-11-23T10:05:00Z"
    });
    add("config.dump", config.to_string().as_bytes());
    add("spec.dump", br#"{"ociVersion":"1.0.2","mounts":[]}"#);
    add("checkpoint/inventory.img", b"criu-inventory");
    add("checkpoint/pages-1.img", pages);
    add("rootfs-diff.tar", &[0u8; 1024]);
    add("dump.log", b"dump finished\n");
    tar.finish().unwrap();
}

/// Deterministic pseudo-random bytes.
pub fn bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
