//! The agent's checkpoint-image registry (`agent::registry::router`), request parsing end to
//! end: the router's path matching and percent-decoding, `parse` of the repository path, the
//! Basic credentials, the migration id and the digest or tag that name a file.
//!
//! Input: `<method byte><request target>\n<Authorization header value>`; the request goes
//! through the router as the agent serves it, against a store holding one migration (`m1`,
//! pull password `secret`) with one image (tag `app`) and a file beside the layout.
//!
//! Checked beyond "no panic":
//! * the status is one the registry means to send (200, 400, 401, 403, 404, 405), never 500;
//! * 200 only for migration `m1` with its password, and what it serves is content-addressed:
//!   the body hashes to the `docker-content-digest` header (so no other file can be served),
//!   and a HEAD's content-length is that blob's size.
#![no_main]

use std::sync::OnceLock;

use http::{Method, Request, StatusCode, header};
use http_body_util::BodyExt;
use kube_migrate::agent::{
    api::pull_digest,
    registry,
    store::{Record, Store},
};
use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};
use tower::ServiceExt;

struct Fixture {
    _dir: tempfile::TempDir,
    store: Store,
    runtime: tokio::runtime::Runtime,
}

fn write_blob(layout: &std::path::Path, bytes: &[u8]) -> String {
    let hex = hex::encode(Sha256::digest(bytes));
    let dir = layout.join("blobs/sha256");
    std::fs::create_dir_all(&dir).expect("blob dir");
    std::fs::write(dir.join(&hex), bytes).expect("blob");
    format!("sha256:{hex}")
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("store");
        let record = Record {
            namespace: "shop".into(),
            pod: "db-0".into(),
            pull_digest: Some(pull_digest("secret")),
            ..Default::default()
        };
        store.save("m1", &record).expect("record");
        let layout = store.layout("m1").expect("layout");
        let layer = write_blob(&layout, b"layer bytes");
        let manifest = format!(r#"{{"schemaVersion":2,"layers":[{{"digest":"{layer}","size":11}}]}}"#);
        let manifest = write_blob(&layout, manifest.as_bytes());
        let index = format!(
            r#"{{"schemaVersion":2,"manifests":[{{"digest":"{manifest}","annotations":{{"org.opencontainers.image.ref.name":"app"}}}}]}}"#
        );
        std::fs::write(layout.join("index.json"), index).expect("index");
        // Files a path traversal would find: not content-addressed, so serving one fails the
        // digest check.
        std::fs::write(dir.path().join("secret.txt"), b"not to be served").expect("secret");
        std::fs::write(layout.join("blobs/sha256/not-a-digest"), b"not to be served").expect("decoy");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        Fixture {
            _dir: dir,
            store,
            runtime,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&m, rest)) = data.split_first() else { return };
    let method = if m & 1 == 0 { Method::GET } else { Method::HEAD };
    let (target, auth) = match rest.iter().position(|&b| b == b'\n') {
        Some(i) => (&rest[..i], Some(&rest[i + 1..])),
        None => (rest, None),
    };
    let mut builder = Request::builder().method(method.clone()).uri(target);
    if let Some(auth) = auth {
        builder = builder.header(header::AUTHORIZATION, auth);
    }
    // What the HTTP server would refuse before routing (bad URI or header bytes).
    let Ok(request) = builder.body(axum::body::Body::empty()) else {
        return;
    };
    let path = request.uri().path().to_string();
    let fx = fixture();
    let router = registry::router(registry::Registry {
        store: fx.store.clone(),
        own: Default::default(),
    });
    let (status, headers, body) = fx.runtime.block_on(async {
        let response = router.oneshot(request).await.expect("infallible");
        let (parts, body) = response.into_parts();
        let body = body.collect().await.expect("body").to_bytes();
        (parts.status, parts.headers, body)
    });
    assert!(
        matches!(status.as_u16(), 200 | 400 | 401 | 403 | 404 | 405),
        "{method} {path:?}: unexpected status {status}"
    );
    if status != StatusCode::OK || path == "/v2/" {
        return;
    }
    let auth = auth.and_then(|a| std::str::from_utf8(a).ok()).unwrap_or_default();
    assert!(
        path.contains("/m1/") || path.contains("%"),
        "served {path:?}, not migration m1"
    );
    assert!(!auth.is_empty(), "served {path:?} without credentials");
    let digest = headers
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .expect("200 carries docker-content-digest");
    let served_len: u64 = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .expect("content-length");
    if method == Method::GET {
        assert_eq!(
            format!("sha256:{}", hex::encode(Sha256::digest(&body))),
            digest,
            "{path:?} served bytes that are not the blob it names"
        );
        assert_eq!(served_len, body.len() as u64);
    } else {
        let blob = fx
            .store
            .layout("m1")
            .expect("layout")
            .join("blobs/sha256")
            .join(&digest[7..]);
        assert_eq!(std::fs::metadata(blob).expect("served blob exists").len(), served_len);
    }
});
