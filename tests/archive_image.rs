//! Archive validation and checkpoint image building, checked by reading the built layout.

mod common;

use kube_migrate::{
    agent::{
        archive::{self, ArchiveError},
        image,
    },
    api,
};
use serde_json::Value;

type Entry<'a> = (&'a str, tar::EntryType, Option<&'a str>);

fn tar_with(entries: &[Entry<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut b = tar::Builder::new(&mut out);
        for (name, kind, link) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_mode(0o644);
            h.set_size(0);
            // Bypass the builder's own path checks to produce hostile archives on purpose.
            let raw = &mut h.as_old_mut().name;
            raw[..name.len()].copy_from_slice(name.as_bytes());
            if let Some(l) = link {
                h.as_old_mut().linkname[..l.len()].copy_from_slice(l.as_bytes());
            }
            h.set_cksum();
            b.append(&h, std::io::empty()).unwrap();
        }
        b.finish().unwrap();
    }
    out
}

fn validate(bytes: &[u8]) -> Result<archive::ArchiveInfo, ArchiveError> {
    archive::validate(bytes)
}

#[test]
fn a_kubelet_archive_validates_and_hashes_in_one_pass() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("checkpoint.tar");
    common::write_archive(&path, "app", "registry.local/counter:1", &common::bytes(300_000, 1));
    let info = archive::validate_file(&path).unwrap();
    let (digest, size) = archive::digest_file(&path).unwrap();
    assert_eq!(info.digest, digest);
    assert_eq!(info.size, size);
    assert_eq!(size, std::fs::metadata(&path).unwrap().len());
    assert_eq!(info.config.name, "app");
    assert_eq!(info.config.rootfs_image_name, "registry.local/counter:1");
    assert_eq!(info.entries, 6);
}

#[test]
fn hostile_archives_are_refused() {
    use tar::EntryType::{Block, Link, Regular, Symlink};
    let cases: &[(&[Entry<'_>], &str)] = &[
        (&[("/etc/passwd", Regular, None)], "absolute path"),
        (&[("checkpoint/../../x", Regular, None)], "'..' component"),
        (
            &[("checkpoint/l", Symlink, Some("/etc/shadow"))],
            "link to an absolute path",
        ),
        (
            &[("checkpoint/l", Symlink, Some("../../etc"))],
            "link pointing outside the archive",
        ),
        (
            &[("checkpoint/h", Link, Some("../x"))],
            "link pointing outside the archive",
        ),
        (&[("checkpoint/dev", Block, None)], "device"),
    ];
    for (entries, why) in cases {
        match validate(&tar_with(entries)) {
            Err(ArchiveError::Unsafe { why: got, .. }) => {
                assert!(got.contains(why), "{entries:?}: {got}")
            }
            other => panic!("{entries:?} must be refused, got {other:?}"),
        }
    }
    // Links that stay inside are fine.
    let ok = tar_with(&[
        ("checkpoint/l", Symlink, Some("../spec.dump")),
        ("checkpoint/inventory.img", Regular, None),
        ("spec.dump", Regular, None),
        ("config.dump", Regular, None),
    ]);
    // config.dump is empty here, so it is not valid JSON: refused for that, not for the link.
    assert!(matches!(validate(&ok), Err(ArchiveError::Config(_))));
}

#[test]
fn corrupt_or_incomplete_archives_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.tar");
    common::write_archive(&path, "app", "img", &common::bytes(10_000, 2));
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.truncate(1500); // cut inside an entry
    assert!(validate(&bytes).is_err());
    let no_checkpoint = tar_with(&[("spec.dump", tar::EntryType::Regular, None)]);
    let err = validate(&no_checkpoint).unwrap_err();
    assert!(matches!(err, ArchiveError::Incomplete(_)), "{err}");
    let garbage = common::bytes(4096, 3);
    assert!(validate(&garbage).is_err());
}

fn read_json(layout: &std::path::Path, digest: &str) -> Value {
    serde_json::from_slice(&std::fs::read(image::blob_path(layout, digest).unwrap()).unwrap()).unwrap()
}

#[test]
fn the_checkpoint_image_is_one_layer_holding_the_archive_with_both_annotations() {
    let dir = tempfile::tempdir().unwrap();
    let archive_path = dir.path().join("app.tar");
    common::write_archive(
        &archive_path,
        "app",
        "registry.local/counter:1",
        &common::bytes(200_000, 4),
    );
    let info = archive::validate_file(&archive_path).unwrap();
    let layout = dir.path().join("image");
    let built = image::build(&layout, "app", "app", &archive_path, &info, "2026-11-23T10:05:00Z").unwrap();

    assert_eq!(
        std::fs::read_to_string(layout.join("oci-layout")).unwrap(),
        r#"{"imageLayoutVersion":"1.0.0"}"#
    );
    let index: Value = serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    assert_eq!(index["manifests"].as_array().unwrap().len(), 1);
    assert_eq!(index["manifests"][0]["digest"], built.manifest_digest);
    assert_eq!(
        index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"],
        "app"
    );

    let manifest = read_json(&layout, &built.manifest_digest);
    assert_eq!(manifest["mediaType"], image::MANIFEST_MEDIA_TYPE);
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1, "exactly one layer");
    assert_eq!(layers[0]["digest"], info.digest);
    assert_eq!(layers[0]["size"], info.size);
    assert_eq!(layers[0]["mediaType"], image::LAYER_MEDIA_TYPE);
    assert_eq!(manifest["annotations"][api::CRIO_CHECKPOINT_NAME], "app");
    assert_eq!(manifest["annotations"][api::CRIU_CHECKPOINT_NAME], "app");
    assert_eq!(
        manifest["annotations"][api::CRIO_CHECKPOINT_ROOTFS_IMAGE],
        "registry.local/counter:1"
    );

    let config = read_json(&layout, manifest["config"]["digest"].as_str().unwrap());
    assert_eq!(config["rootfs"]["diff_ids"][0], info.digest);
    assert_eq!(config["os"], "linux");

    // The layer is the archive: its files sit at the root of the image.
    let layer = image::blob_path(&layout, &info.digest).unwrap();
    let mut names: Vec<String> = tar::Archive::new(std::fs::File::open(&layer).unwrap())
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().display().to_string())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "checkpoint/inventory.img",
            "checkpoint/pages-1.img",
            "config.dump",
            "dump.log",
            "rootfs-diff.tar",
            "spec.dump"
        ]
    );
    // Hard-linked, not copied.
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        std::fs::metadata(&layer).unwrap().ino(),
        std::fs::metadata(&archive_path).unwrap().ino()
    );

    // A second container adds a second tag; rebuilding replaces, never duplicates.
    let other = dir.path().join("sidecar.tar");
    common::write_archive(&other, "sidecar", "registry.local/logger:2", &common::bytes(1000, 5));
    let other_info = archive::validate_file(&other).unwrap();
    image::build(
        &layout,
        "sidecar",
        "sidecar",
        &other,
        &other_info,
        "2026-11-23T10:05:00Z",
    )
    .unwrap();
    image::build(&layout, "app", "app", &archive_path, &info, "2026-11-23T10:05:00Z").unwrap();
    let index: Value = serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    assert_eq!(index["manifests"].as_array().unwrap().len(), 2);
    assert_eq!(
        image::resolve(&layout, "sidecar").unwrap(),
        image::resolve(&layout, "sidecar").unwrap()
    );
    assert!(matches!(
        image::resolve(&layout, "nope"),
        Err(image::ImageError::NotFound(_))
    ));
    assert!(image::blob_path(&layout, "sha256:../../etc/passwd").is_err());
}
