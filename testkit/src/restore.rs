//! Restoring a container from a kube-migrate checkpoint image: "pull" the image from the
//! agent's OCI distribution endpoint, stream its single layer (the checkpoint archive), read
//! the state from `checkpoint/pages-1.img` and verify it.
//!
//! The layer is never stored: it is hashed (and checked against the manifest) while it is
//! read, and only the memory itself is kept.

use std::{
    io::{self, Read},
    path::{Path, PathBuf},
    time::Duration,
};

use futures::TryStreamExt;
use http_body_util::{BodyDataStream, BodyExt};
use hyper::{Method, Request, StatusCode};
use kube_migrate::{
    agent::{
        archive::HashingReader,
        client::{HttpsClient, empty_body, https_client},
        image::{INDEX_MEDIA_TYPE, MANIFEST_MEDIA_TYPE},
        registry::REPOSITORY_PREFIX,
    },
    api::{CRIO_CHECKPOINT_NAME, CRIO_CHECKPOINT_ROOTFS_IMAGE},
    tls::{TlsError, client_config},
};
use sha2::{Digest, Sha256};

use crate::{
    checkpoint::{PAGES_PATH, STATE_FORMAT, StateHeader},
    container::Memory,
};

/// Upper bound of a manifest.
const MAX_MANIFEST_BYTES: usize = 4 << 20;
/// Upper bound of the state header line.
const MAX_HEADER_BYTES: u64 = 64 << 10;
/// Waiting for the registry's answer (headers) to a request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Kubernetes' waiting reason when the image cannot be pulled.
pub const REASON_PULL: &str = "ErrImagePull";
/// Kubernetes' waiting reason when the container cannot be created from what was pulled.
pub const REASON_CREATE: &str = "CreateContainerError";

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("TLS for the registry: {0}")]
    Tls(#[from] TlsError),
    #[error("pulling {url}: {message}")]
    Fetch { url: String, message: String },
    #[error("{url} answered {status}: {body}")]
    Status { url: String, status: u16, body: String },
    #[error("invalid manifest from {url}: {message}")]
    Manifest { url: String, message: String },
    #[error("manifest digest mismatch: expected {expected}, got {actual}")]
    ManifestDigest { expected: String, actual: String },
    #[error("layer {expected} arrived with digest {actual}")]
    LayerDigest { expected: String, actual: String },
    #[error("reading the layer: {0}")]
    Layer(io::Error),
    #[error("not a checkpoint image: the manifest has no {CRIO_CHECKPOINT_NAME} annotation")]
    NotCheckpoint,
    #[error("a checkpoint image has exactly one layer, this one has {0}")]
    Layers(usize),
    #[error("the checkpoint holds no {PAGES_PATH}")]
    MissingState,
    #[error("invalid {PAGES_PATH}: {0}")]
    State(String),
    #[error("memory sha256 mismatch: the checkpoint says {expected}, the memory hashes to {actual}")]
    MemoryDigest { expected: String, actual: String },
    #[error("cannot allocate {0} bytes for the restored memory")]
    Allocation(u64),
}

impl RestoreError {
    /// The container's waiting reason, as a kubelet would report it.
    pub fn reason(&self) -> &'static str {
        match self {
            RestoreError::Tls(_)
            | RestoreError::Fetch { .. }
            | RestoreError::Status { .. }
            | RestoreError::Manifest { .. }
            | RestoreError::ManifestDigest { .. }
            | RestoreError::LayerDigest { .. }
            | RestoreError::Layer(_) => REASON_PULL,
            RestoreError::NotCheckpoint
            | RestoreError::Layers(_)
            | RestoreError::MissingState
            | RestoreError::State(_)
            | RestoreError::MemoryDigest { .. }
            | RestoreError::Allocation(_) => REASON_CREATE,
        }
    }
}

/// A checkpoint image reference: `<host:port>/kube-migrate/<id>:<tag>` (or `@sha256:…`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// `host:port`
    pub registry: String,
    /// `kube-migrate/<id>`
    pub repository: String,
    /// Tag or digest.
    pub reference: String,
    /// `Authorization` header value for this registry (from the pod's pull Secrets).
    pub auth: Option<String>,
}

impl ImageRef {
    /// Some only for kube-migrate checkpoint images; every other image runs fresh.
    pub fn parse(image: &str) -> Option<Self> {
        let (registry, rest) = image.split_once('/')?;
        // The first component is a registry only if it looks like a host (Docker's rule).
        if !(registry.contains(':') || registry.contains('.') || registry == "localhost") {
            return None;
        }
        let (repository, reference) = match rest.split_once('@') {
            Some((repo, digest)) => (repo, digest.to_string()),
            None => match rest.rsplit_once(':') {
                Some((repo, tag)) if !tag.contains('/') => (repo, tag.to_string()),
                _ => (rest, "latest".to_string()),
            },
        };
        let id = repository.strip_prefix(REPOSITORY_PREFIX)?.strip_prefix('/')?;
        if id.is_empty() || id.contains('/') || reference.is_empty() {
            return None;
        }
        Some(Self {
            registry: registry.to_string(),
            repository: repository.to_string(),
            reference,
            auth: None,
        })
    }

    fn url(&self, kind: &str, reference: &str) -> String {
        format!("https://{}/v2/{}/{kind}/{reference}", self.registry, self.repository)
    }

    /// `<registry>/<repository>@<digest>`: what a kubelet reports as the imageID.
    pub fn image_id(&self, digest: &str) -> String {
        format!("{}/{}@{digest}", self.registry, self.repository)
    }
}

/// A checked checkpoint image manifest.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub manifest_digest: String,
    pub layer_digest: String,
    /// The image the checkpointed container ran (`io.kubernetes.cri-o.annotations.checkpoint.rootfsImageName`).
    pub base_image: Option<String>,
    /// `<registry>/<repository>@<manifest digest>`
    pub image_id: String,
}

/// What a pull restored.
#[derive(Debug, Clone)]
pub struct Restored {
    pub manifest_digest: String,
    pub image_id: String,
    pub counter: u64,
    pub memory: Memory,
}

/// Pulls checkpoint images over HTTPS, trusting one CA.
#[derive(Clone)]
pub struct Puller {
    http: HttpsClient,
}

async fn get(
    http: &HttpsClient,
    url: &str,
    accept: &str,
    auth: Option<&str>,
) -> Result<hyper::Response<hyper::body::Incoming>, RestoreError> {
    let fetch = |message: String| RestoreError::Fetch {
        url: url.to_string(),
        message,
    };
    let mut request = Request::builder().method(Method::GET).uri(url).header("accept", accept);
    if let Some(auth) = auth {
        request = request.header("authorization", auth);
    }
    let request = request.body(empty_body()).map_err(|e| fetch(e.to_string()))?;
    let response = tokio::time::timeout(REQUEST_TIMEOUT, http.request(request))
        .await
        .map_err(|_| fetch(format!("no answer within {} s", REQUEST_TIMEOUT.as_secs())))?
        .map_err(|e| fetch(error_chain(&e)))?;
    if response.status() != StatusCode::OK {
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        return Err(RestoreError::Status {
            url: url.to_string(),
            status,
            body: String::from_utf8_lossy(&body[..body.len().min(512)]).trim().to_string(),
        });
    }
    Ok(response)
}

/// An error and its sources, `a: b: c` (hyper's own message alone says little).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let text = e.to_string();
        if !message.contains(&text) {
            message = format!("{message}: {text}");
        }
        source = e.source();
    }
    message
}

fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// The manifest's layer digest and base image annotation, after checking it describes a
/// checkpoint image.
fn checkpoint_layer(url: &str, body: &[u8]) -> Result<(String, Option<String>), RestoreError> {
    let invalid = |message: String| RestoreError::Manifest {
        url: url.to_string(),
        message,
    };
    let manifest: serde_json::Value = serde_json::from_slice(body).map_err(|e| invalid(e.to_string()))?;
    match manifest["mediaType"].as_str() {
        None | Some(MANIFEST_MEDIA_TYPE) => {}
        Some(INDEX_MEDIA_TYPE) => return Err(invalid("an image index, not an image manifest".into())),
        Some(other) => return Err(invalid(format!("unsupported media type {other}"))),
    }
    let layers = manifest["layers"]
        .as_array()
        .ok_or_else(|| invalid("no layers".into()))?;
    if manifest["annotations"][CRIO_CHECKPOINT_NAME].as_str().is_none() {
        return Err(RestoreError::NotCheckpoint);
    }
    if layers.len() != 1 {
        return Err(RestoreError::Layers(layers.len()));
    }
    let digest = layers[0]["digest"]
        .as_str()
        .filter(|d| d.starts_with("sha256:"))
        .map(str::to_string)
        .ok_or_else(|| invalid("layer without a sha256 digest".into()))?;
    let base = manifest["annotations"][CRIO_CHECKPOINT_ROOTFS_IMAGE]
        .as_str()
        .map(str::to_string);
    Ok((digest, base))
}

impl Puller {
    /// A puller trusting the CA in `ca` (PEM).
    pub fn new(ca: &Path) -> Result<Self, RestoreError> {
        Ok(Self {
            http: https_client(client_config(ca, None)?),
        })
    }

    /// Fetch and check the manifest of checkpoint image `reference`.
    pub async fn manifest(&self, reference: &ImageRef) -> Result<Manifest, RestoreError> {
        let url = reference.url("manifests", &reference.reference);
        let response = get(&self.http, &url, MANIFEST_MEDIA_TYPE, reference.auth.as_deref()).await?;
        let header_digest = response
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = http_body_util::Limited::new(response.into_body(), MAX_MANIFEST_BYTES)
            .collect()
            .await
            .map_err(|e| RestoreError::Fetch {
                url: url.clone(),
                message: e.to_string(),
            })?
            .to_bytes();
        let manifest_digest = sha256_digest(&body);
        for expected in header_digest
            .iter()
            .chain(Some(&reference.reference).filter(|r| r.starts_with("sha256:")))
        {
            if *expected != manifest_digest {
                return Err(RestoreError::ManifestDigest {
                    expected: expected.clone(),
                    actual: manifest_digest,
                });
            }
        }
        let (layer_digest, base_image) = checkpoint_layer(&url, &body)?;
        Ok(Manifest {
            image_id: reference.image_id(&manifest_digest),
            manifest_digest,
            layer_digest,
            base_image,
        })
    }

    /// The layer of `manifest` as a blocking reader (for a blocking thread).
    async fn layer(
        &self,
        reference: &ImageRef,
        manifest: &Manifest,
    ) -> Result<impl Read + Send + 'static, RestoreError> {
        let blob_url = reference.url("blobs", &manifest.layer_digest);
        let response = get(
            &self.http,
            &blob_url,
            "application/octet-stream",
            reference.auth.as_deref(),
        )
        .await?;
        let stream = BodyDataStream::new(response.into_body()).map_err(io::Error::other);
        Ok(tokio_util::io::SyncIoBridge::new(tokio_util::io::StreamReader::new(
            stream,
        )))
    }

    /// Pull `image` (parsed as `reference`) and read a simulated container's state from it.
    pub async fn pull(&self, reference: &ImageRef) -> Result<Restored, RestoreError> {
        let manifest = self.manifest(reference).await?;
        self.read_state(reference, manifest).await
    }

    /// Read a simulated container's state from the layer of `manifest`.
    pub async fn read_state(&self, reference: &ImageRef, manifest: Manifest) -> Result<Restored, RestoreError> {
        let reader = self.layer(reference, &manifest).await?;
        let layer_digest = manifest.layer_digest.clone();
        let (header, memory) = tokio::task::spawn_blocking(move || read_layer(reader, Some(&layer_digest)))
            .await
            .map_err(|e| RestoreError::Layer(io::Error::other(e)))??;
        Ok(Restored {
            image_id: manifest.image_id,
            manifest_digest: manifest.manifest_digest,
            counter: header.counter,
            memory,
        })
    }

    /// Unpack the layer of `manifest` (a checkpoint archive) into `dest`, checking its digest
    /// on the way; `dest` is removed again if anything is wrong. Returns the layer's size.
    pub async fn unpack(&self, reference: &ImageRef, manifest: &Manifest, dest: PathBuf) -> Result<u64, RestoreError> {
        let reader = self.layer(reference, manifest).await?;
        let expected = manifest.layer_digest.clone();
        tokio::task::spawn_blocking(move || {
            let result = unpack_layer(reader, &dest, &expected);
            if result.is_err() {
                let _ = std::fs::remove_dir_all(&dest);
            }
            result
        })
        .await
        .map_err(|e| RestoreError::Layer(io::Error::other(e)))?
    }
}

/// Untar `reader` into `dest` and read it to its end; its sha256 must be `expected`.
pub fn unpack_layer<R: Read>(reader: R, dest: &Path, expected: &str) -> Result<u64, RestoreError> {
    let mut reader = HashingReader::new(reader);
    let _ = std::fs::remove_dir_all(dest);
    std::fs::create_dir_all(dest).map_err(RestoreError::Layer)?;
    {
        let mut archive = tar::Archive::new(&mut reader);
        archive.set_preserve_permissions(true);
        // `unpack` refuses entries that would land outside `dest` (`..`, absolute paths).
        archive.unpack(dest).map_err(RestoreError::Layer)?;
    }
    // `finish` reads whatever follows the end-of-archive blocks: part of the blob too.
    let (digest, size) = reader.finish().map_err(RestoreError::Layer)?;
    if digest != expected {
        return Err(RestoreError::LayerDigest {
            expected: expected.to_string(),
            actual: digest,
        });
    }
    Ok(size)
}

fn read_header_line<R: Read>(reader: &mut R) -> Result<Vec<u8>, RestoreError> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        if line.len() as u64 >= MAX_HEADER_BYTES {
            return Err(RestoreError::State("header line too long".into()));
        }
        match reader.read(&mut byte) {
            Ok(0) => return Err(RestoreError::State("no header line".into())),
            Ok(_) if byte[0] == b'\n' => return Ok(line),
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(RestoreError::Layer(e)),
        }
    }
}

/// Read and verify `checkpoint/pages-1.img` (`size` bytes) from `reader`.
pub fn read_state<R: Read>(mut reader: R, size: u64) -> Result<(StateHeader, Memory), RestoreError> {
    let line = read_header_line(&mut reader)?;
    let header: StateHeader = serde_json::from_slice(&line).map_err(|e| RestoreError::State(format!("header: {e}")))?;
    if header.format != STATE_FORMAT {
        return Err(RestoreError::State(format!(
            "format {:?}, expected {STATE_FORMAT:?}",
            header.format
        )));
    }
    let memory_len = size.saturating_sub(line.len() as u64 + 1);
    if memory_len != header.memory_bytes {
        return Err(RestoreError::State(format!(
            "{memory_len} bytes of memory follow the header, which says {}",
            header.memory_bytes
        )));
    }
    let len = usize::try_from(memory_len).map_err(|_| RestoreError::Allocation(memory_len))?;
    let mut memory = Vec::new();
    memory
        .try_reserve_exact(len)
        .map_err(|_| RestoreError::Allocation(memory_len))?;
    memory.resize(len, 0);
    let mut hasher = Sha256::new();
    for chunk in memory.chunks_mut(1 << 20) {
        reader.read_exact(chunk).map_err(RestoreError::Layer)?;
        hasher.update(&*chunk);
    }
    let actual = hex::encode(hasher.finalize());
    if actual != header.memory_sha256 {
        return Err(RestoreError::MemoryDigest {
            expected: header.memory_sha256,
            actual,
        });
    }
    Ok((header, Memory::from_hashed(memory, actual)))
}

/// Read a checkpoint layer (a tar whose files are the archive's files at the root), verify
/// its digest when `expected` is given, and return the verified state.
pub fn read_layer<R: Read>(reader: R, expected: Option<&str>) -> Result<(StateHeader, Memory), RestoreError> {
    let mut hashing = HashingReader::new(reader);
    let mut state = None;
    {
        let mut archive = tar::Archive::new(&mut hashing);
        for entry in archive.entries().map_err(RestoreError::Layer)? {
            let entry = entry.map_err(RestoreError::Layer)?;
            let path = entry.path().map_err(RestoreError::Layer)?.into_owned();
            let path = path.strip_prefix("./").unwrap_or(&path);
            if path == Path::new(PAGES_PATH) && state.is_none() {
                let size = entry.size();
                state = Some(read_state(entry, size));
            }
        }
    }
    // Drain the end-of-archive padding: the digest covers the whole blob.
    // Drain the end-of-archive padding: the digest covers the whole blob.
    let (actual, _) = hashing.finish().map_err(RestoreError::Layer)?;
    if let Some(expected) = expected
        && actual != expected
    {
        return Err(RestoreError::LayerDigest {
            expected: expected.to_string(),
            actual,
        });
    }
    state.ok_or(RestoreError::MissingState)?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_checkpoint_images_parse() {
        assert_eq!(
            ImageRef::parse("127.0.0.1:15444/kube-migrate/3f2a-11:app"),
            Some(ImageRef {
                registry: "127.0.0.1:15444".into(),
                repository: "kube-migrate/3f2a-11".into(),
                reference: "app".into(),
                auth: None,
            })
        );
        let by_digest = ImageRef::parse("localhost:5443/kube-migrate/x@sha256:ab").unwrap();
        assert_eq!(by_digest.reference, "sha256:ab");
        assert_eq!(
            by_digest.image_id("sha256:cd"),
            "localhost:5443/kube-migrate/x@sha256:cd"
        );
        assert_eq!(ImageRef::parse("registry.local/counter:1"), None);
        assert_eq!(ImageRef::parse("kube-migrate/x:app"), None);
        assert_eq!(ImageRef::parse("busybox"), None);
        assert_eq!(ImageRef::parse("127.0.0.1:5443/kube-migrate/a/b:app"), None);
        assert_eq!(
            ImageRef::parse("127.0.0.1:5443/kube-migrate/a").unwrap().reference,
            "latest"
        );
    }

    #[test]
    fn manifests_must_describe_a_checkpoint() {
        let ok = serde_json::json!({
            "mediaType": MANIFEST_MEDIA_TYPE,
            "layers": [{"digest": "sha256:aa"}],
            "annotations": {CRIO_CHECKPOINT_NAME: "app"},
        });
        assert_eq!(
            checkpoint_layer("u", ok.to_string().as_bytes()).unwrap(),
            ("sha256:aa".to_string(), None)
        );
        let based = serde_json::json!({
            "layers": [{"digest": "sha256:aa"}],
            "annotations": {CRIO_CHECKPOINT_NAME: "app", CRIO_CHECKPOINT_ROOTFS_IMAGE: "kube-migrate.test/counter:1"},
        });
        assert_eq!(
            checkpoint_layer("u", based.to_string().as_bytes())
                .unwrap()
                .1
                .as_deref(),
            Some("kube-migrate.test/counter:1")
        );
        let plain = serde_json::json!({"layers": [{"digest": "sha256:aa"}]});
        let err = checkpoint_layer("u", plain.to_string().as_bytes()).unwrap_err();
        assert!(matches!(err, RestoreError::NotCheckpoint));
        assert_eq!(err.reason(), REASON_CREATE);
        let index = serde_json::json!({"mediaType": INDEX_MEDIA_TYPE, "manifests": []});
        let err = checkpoint_layer("u", index.to_string().as_bytes()).unwrap_err();
        assert_eq!(err.reason(), REASON_PULL);
    }

    #[test]
    fn layers_unpack_only_with_their_digest() {
        let mut tar = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(3);
        h.set_mode(0o600);
        tar.append_data(&mut h, "checkpoint/inventory.img", &b"inv"[..])
            .unwrap();
        let blob = tar.into_inner().unwrap();
        let digest = sha256_digest(&blob);
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("layer");
        assert_eq!(unpack_layer(&blob[..], &dest, &digest).unwrap(), blob.len() as u64);
        assert_eq!(std::fs::read(dest.join("checkpoint/inventory.img")).unwrap(), b"inv");
        let err = unpack_layer(&blob[..], &dest, "sha256:00").unwrap_err();
        assert!(matches!(err, RestoreError::LayerDigest { .. }), "{err}");
    }
}
