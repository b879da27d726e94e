//! A read-only OCI distribution endpoint serving this node's checkpoint images to this
//! node's container runtime (`GET`/`HEAD` of `/v2/kube-migrate/<id>/manifests/<tag>` and
//! `/v2/kube-migrate/<id>/blobs/<digest>`).
//!
//! Checkpoint images hold the full memory of a container, secrets included, so the agent
//! listens for this on loopback only (the DaemonSet uses the host network), and serves a
//! migration's images only to a pull that presents its credential: HTTP Basic with the
//! password whose digest the controller gave with the image build (the kubelet hands the
//! runtime that password from the replacement pod's `imagePullSecrets`). Anonymous requests
//! get 401 with a Basic challenge (what makes a client send its credentials), wrong ones 403.
//! The agent's own pulls ([`super::prepull`]) present the agent's own password, and other
//! pulls of a migration being pulled that way wait for it before they get the manifest.

use axum::{
    Router,
    body::Body,
    extract::{Path, State},
    http::{HeaderMap, HeaderValue, Method, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use serde_json::json;

use super::{api, chunks, image, prepull::OwnPulls, store::Store};

/// Repository prefix of every checkpoint image.
pub const REPOSITORY_PREFIX: &str = "kube-migrate";

/// The longest a pull waits for the agent's own pull of the same migration.
pub const HOLD_MAX: std::time::Duration = std::time::Duration::from_secs(120);

#[derive(Clone)]
pub struct Registry {
    pub store: Store,
    pub own: OwnPulls,
}

pub fn router(registry: Registry) -> Router {
    Router::new()
        .route("/v2/", get(ping))
        .route("/v2/{*path}", get(serve).head(serve))
        .with_state(registry)
}

/// The API version check: clients learn here that credentials are needed.
async fn ping(headers: HeaderMap) -> Response {
    if basic_password(&headers).is_none() {
        return challenge("credentials required".into());
    }
    ([("docker-distribution-api-version", "registry/2.0")], "{}").into_response()
}

fn challenge(message: String) -> Response {
    let mut response = oci_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", message);
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"kube-migrate\""),
    );
    response
}

/// The password of an `Authorization: Basic` header for [`api::PULL_USER`].
fn basic_password(headers: &HeaderMap) -> Option<String> {
    use base64::Engine;
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let encoded = value.strip_prefix("Basic ").or_else(|| value.strip_prefix("basic "))?;
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).ok()?;
    let (user, password) = std::str::from_utf8(&decoded).ok()?.split_once(':')?;
    (user == api::PULL_USER).then(|| password.to_string())
}

/// Who reads migration `id`'s images.
#[derive(Debug, PartialEq, Eq)]
enum Reader {
    /// This agent's own pull.
    Own,
    /// A pull with the migration's credential (the kubelet's).
    Migration,
}

/// May this request read migration `id`'s images? `Ok`: yes, and who it is; else the
/// refusal to send.
fn reader(registry: &Registry, id: &str, headers: &HeaderMap) -> Result<Reader, Box<Response>> {
    let Some(password) = basic_password(headers) else {
        return Err(Box::new(challenge(format!("credentials required for migration {id}"))));
    };
    if registry.own.is_own(&password) {
        return Ok(Reader::Own);
    }
    let expected = registry.store.load(id).ok().flatten().and_then(|r| r.pull_digest);
    match expected {
        Some(digest) if digest == api::pull_digest(&password) => Ok(Reader::Migration),
        _ => Err(Box::new(oci_error(
            StatusCode::FORBIDDEN,
            "DENIED",
            format!("these credentials may not pull migration {id}"),
        ))),
    }
}

fn oci_error(status: StatusCode, code: &str, message: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        json!({"errors": [{"code": code, "message": message}]}).to_string(),
    )
        .into_response()
}

/// `kube-migrate/<id>/manifests/<ref>` → (id, "manifests", ref)
fn parse(path: &str) -> Option<(&str, &str, &str)> {
    let rest = path.strip_prefix(REPOSITORY_PREFIX)?.strip_prefix('/')?;
    let (id, rest) = rest.split_once('/')?;
    let (kind, reference) = rest.split_once('/')?;
    (matches!(kind, "manifests" | "blobs") && !reference.contains('/')).then_some((id, kind, reference))
}

async fn serve(
    State(registry): State<Registry>,
    method: Method,
    headers: HeaderMap,
    Path(path): Path<String>,
) -> Response {
    let Some((id, kind, reference)) = parse(&path) else {
        return oci_error(
            StatusCode::NOT_FOUND,
            "NAME_UNKNOWN",
            format!("no repository at {path}"),
        );
    };
    let reader = match reader(&registry, id, &headers) {
        Ok(r) => r,
        Err(denied) => return *denied,
    };
    if kind == "manifests" && reader == Reader::Migration && registry.own.wait(id, HOLD_MAX).await {
        tracing::debug!(id, "a pull waited for the agent's own pull of the same images");
    }
    let layout = match registry.store.layout(id) {
        Ok(l) => l,
        Err(e) => return oci_error(StatusCode::NOT_FOUND, "NAME_UNKNOWN", e.to_string()),
    };
    let digest = if kind == "manifests" {
        match image::resolve(&layout, reference) {
            Ok(d) => d,
            Err(e) => return oci_error(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN", e.to_string()),
        }
    } else {
        reference.to_string()
    };
    let blob = match image::blob_path(&layout, &digest) {
        Ok(p) => p,
        Err(e) => return oci_error(StatusCode::BAD_REQUEST, "DIGEST_INVALID", e.to_string()),
    };
    let file = match tokio::fs::File::open(&blob).await {
        Ok(f) => f,
        Err(_) => {
            // A layer still arriving, for this agent's own pull only: streamed as it comes.
            if kind == "blobs"
                && reader == Reader::Own
                && let Some((size, stream)) = registry.own.incoming.read(&digest)
            {
                tracing::debug!(id, %digest, "serving a layer while it arrives");
                let headers = found(BLOB_TYPE, size, &digest);
                if method == Method::HEAD {
                    return (StatusCode::OK, headers).into_response();
                }
                return (StatusCode::OK, headers, Body::from_stream(stream)).into_response();
            }
            let code = if kind == "manifests" {
                "MANIFEST_UNKNOWN"
            } else {
                "BLOB_UNKNOWN"
            };
            return oci_error(StatusCode::NOT_FOUND, code, format!("{digest} not found"));
        }
    };
    let len = match file.metadata().await {
        Ok(m) => m.len(),
        Err(e) => return oci_error(StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN", e.to_string()),
    };
    let content_type = if kind == "manifests" {
        image::MANIFEST_MEDIA_TYPE
    } else {
        BLOB_TYPE
    };
    let headers = found(content_type, len, &digest);
    if method == Method::HEAD {
        return (StatusCode::OK, headers).into_response();
    }
    let body = Body::from_stream(chunks::file_stream(file.into_std().await));
    (StatusCode::OK, headers, body).into_response()
}

const BLOB_TYPE: &str = "application/octet-stream";

/// Headers of a manifest or blob answer.
fn found(content_type: &'static str, len: u64, digest: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    if let Ok(v) = HeaderValue::from_str(digest) {
        headers.insert("docker-content-digest", v);
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn parses_only_our_repositories() {
        assert_eq!(
            parse("kube-migrate/abc-1/manifests/app"),
            Some(("abc-1", "manifests", "app"))
        );
        assert_eq!(
            parse("kube-migrate/abc/blobs/sha256:00"),
            Some(("abc", "blobs", "sha256:00"))
        );
        assert_eq!(parse("library/busybox/manifests/latest"), None);
        assert_eq!(parse("kube-migrate/abc/tags/list"), None);
        assert_eq!(parse("kube-migrate/abc/manifests/a/b"), None);
    }
}
