//! Checkpoint images as OCI image layouts.
//!
//! The image has one layer whose files are the archive's files at the root (what
//! `buildah add <img> archive.tar /` produces). A validated archive already is such a tar, so
//! the layer blob is the archive itself, hard-linked into the layout: building an image of a
//! 1 GiB checkpoint copies nothing and reads nothing beyond the hash computed on receipt.

use std::{
    collections::BTreeMap,
    io,
    path::{Path, PathBuf},
};

use serde_json::json;
use sha2::{Digest, Sha256};

use super::archive::ArchiveInfo;
use crate::api;

pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
pub const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
pub const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar";
const REF_NAME: &str = "org.opencontainers.image.ref.name";

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image layout I/O: {0}")]
    Io(#[from] io::Error),
    #[error("image layout JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("invalid digest {0:?}")]
    Digest(String),
    #[error("no image tagged {0:?} in the layout")]
    NotFound(String),
}

impl ImageError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            ImageError::Io(_) => "image_io",
            ImageError::Json(_) => "image_json",
            ImageError::Digest(_) => "image_digest",
            ImageError::NotFound(_) => "image_not_found",
        }
    }
}

/// A built image: its manifest digest and size, under `tag` in the layout.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BuiltImage {
    pub tag: String,
    pub manifest_digest: String,
    pub manifest_size: u64,
    pub base_image: String,
}

/// `sha256:<hex>` → `<layout>/blobs/sha256/<hex>`, refusing anything that is not a digest.
pub fn blob_path(layout: &Path, digest: &str) -> Result<PathBuf, ImageError> {
    let hex = digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| ImageError::Digest(digest.to_string()))?;
    Ok(layout.join("blobs").join("sha256").join(hex))
}

use super::private::{self, write_atomic};

fn write_blob(layout: &Path, bytes: &[u8]) -> Result<(String, u64), ImageError> {
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(bytes)));
    let path = blob_path(layout, &digest)?;
    if !path.exists() {
        write_atomic(&path, bytes)?;
    }
    Ok((digest, bytes.len() as u64))
}

fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

/// Add (or replace) the checkpoint image of `container` under tag `tag` in the OCI layout at
/// `layout`, with `archive` (already validated as `info`) as its only layer.
pub fn build(
    layout: &Path,
    tag: &str,
    container: &str,
    archive: &Path,
    info: &ArchiveInfo,
    created: &str,
) -> Result<BuiltImage, ImageError> {
    link_layer(layout, archive, &info.digest)?;
    let base_image = if info.config.rootfs_image_name.is_empty() {
        info.config.rootfs_image_ref.clone()
    } else {
        info.config.rootfs_image_name.clone()
    };
    describe(layout, tag, container, (&info.digest, info.size), &base_image, created)
}

/// Put `archive` into the layout as the layer blob `digest`.
pub fn link_layer(layout: &Path, archive: &Path, digest: &str) -> Result<(), ImageError> {
    private::dir_all(&layout.join("blobs").join("sha256"))?;
    let layer = blob_path(layout, digest)?;
    if !layer.exists() {
        // Same filesystem: a hard link, no copy. Elsewhere: one sequential copy.
        if std::fs::hard_link(archive, &layer).is_err() {
            std::fs::copy(archive, &layer)?;
        }
    }
    Ok(())
}

/// Write the config and manifest of the image whose only layer is `layer` (digest, size), and
/// tag it `tag`; the layer blob itself may still be arriving (see [`super::incoming`]). The same
/// arguments always give the same manifest.
pub fn describe(
    layout: &Path,
    tag: &str,
    container: &str,
    layer: (&str, u64),
    base_image: &str,
    created: &str,
) -> Result<BuiltImage, ImageError> {
    private::dir_all(&layout.join("blobs").join("sha256"))?;
    write_atomic(&layout.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    let (layer_digest, layer_size) = layer;
    blob_path(layout, layer_digest)?;
    let base_image = base_image.to_string();
    let config = json!({
        "created": created,
        "architecture": oci_arch(),
        "os": "linux",
        "config": {},
        "rootfs": { "type": "layers", "diff_ids": [layer_digest] },
        "history": [{ "created": created, "created_by": format!("kube-migrate: checkpoint of container {container}") }],
    });
    let (config_digest, config_size) = write_blob(layout, &serde_json::to_vec(&config)?)?;
    let mut annotations = BTreeMap::new();
    annotations.insert(api::CRIO_CHECKPOINT_NAME, container.to_string());
    annotations.insert(api::CRIU_CHECKPOINT_NAME, container.to_string());
    if !base_image.is_empty() {
        annotations.insert(api::CRIO_CHECKPOINT_ROOTFS_IMAGE, base_image.clone());
        annotations.insert(api::CRIU_CHECKPOINT_ROOTFS_IMAGE, base_image.clone());
        annotations.insert("org.opencontainers.image.base.name", base_image.clone());
    }
    annotations.insert("org.opencontainers.image.created", created.to_string());
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": { "mediaType": CONFIG_MEDIA_TYPE, "digest": config_digest, "size": config_size },
        "layers": [{ "mediaType": LAYER_MEDIA_TYPE, "digest": layer_digest, "size": layer_size }],
        "annotations": annotations,
    });
    let (manifest_digest, manifest_size) = write_blob(layout, &serde_json::to_vec(&manifest)?)?;

    let index_path = layout.join("index.json");
    let mut index: serde_json::Value = match std::fs::read(&index_path) {
        Ok(bytes) => serde_json::from_slice(&bytes)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            json!({ "schemaVersion": 2, "mediaType": INDEX_MEDIA_TYPE, "manifests": [] })
        }
        Err(e) => return Err(e.into()),
    };
    let manifests = index["manifests"]
        .as_array_mut()
        .ok_or_else(|| ImageError::NotFound("manifests".into()))?;
    manifests.retain(|m| m["annotations"][REF_NAME] != tag);
    manifests.push(json!({
        "mediaType": MANIFEST_MEDIA_TYPE,
        "digest": manifest_digest,
        "size": manifest_size,
        "annotations": { REF_NAME: tag },
    }));
    write_atomic(&index_path, &serde_json::to_vec_pretty(&index)?)?;
    Ok(BuiltImage {
        tag: tag.to_string(),
        manifest_digest,
        manifest_size,
        base_image,
    })
}

/// The manifest digest tagged `reference` (a tag or a digest) in the layout.
pub fn resolve(layout: &Path, reference: &str) -> Result<String, ImageError> {
    if reference.starts_with("sha256:") {
        blob_path(layout, reference)?;
        return Ok(reference.to_string());
    }
    let index: serde_json::Value = match std::fs::read(layout.join("index.json")) {
        Ok(bytes) => serde_json::from_slice(&bytes)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(ImageError::NotFound(reference.into()));
        }
        Err(e) => return Err(e.into()),
    };
    index["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["annotations"][REF_NAME] == reference)
        .and_then(|m| m["digest"].as_str())
        .map(str::to_string)
        .ok_or_else(|| ImageError::NotFound(reference.into()))
}
