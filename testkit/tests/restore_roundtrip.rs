//! Round trip of a container's state: the test kubelet writes a checkpoint archive,
//! kube-migrate builds its checkpoint image and serves it from the agent's OCI endpoint over
//! HTTPS, and the test kubelet pulls it back and gets the very same counter and memory.

use std::{path::Path, sync::Arc};

use k8s_openapi::jiff::Timestamp;
use kube_migrate::{
    agent::{archive, image, registry, store::Store},
    certs::{Request, issue},
    server::serve_tls,
    tls::{CertReloader, install_crypto_provider, server_config},
};
use kube_migrate_testkit::{
    checkpoint::{Snapshot, write_archive, write_tar},
    container::{Memory, Mount},
    restore::{ImageRef, Puller, REASON_CREATE, REASON_PULL, RestoreError, read_layer},
};
use tokio_util::sync::CancellationToken;

const ID: &str = "3f2a9c1e-0000-4000-8000-00000000abcd";

fn snapshot(memory: Memory, counter: u64) -> Snapshot {
    Snapshot {
        container_id: "c0ffee".into(),
        namespace: "shop".into(),
        pod: "db-0".into(),
        pod_uid: "uid-1".into(),
        container: "app".into(),
        image: "registry.local/db:1".into(),
        image_ref: "registry.local/db@sha256:00".into(),
        mounts: vec![Mount {
            volume: "data".into(),
            destination: "/data".into(),
            read_only: false,
        }],
        created: Timestamp::now(),
        checkpointed: Timestamp::now(),
        counter,
        memory,
    }
}

/// Build the checkpoint image of `archive_path` under tag `tag`, as the target agent does.
fn build_image(store: &Store, tag: &str, archive_path: &Path) -> image::BuiltImage {
    let info = archive::validate_file(archive_path).expect("kube-migrate accepts the archive");
    assert_eq!(info.config.name, "app");
    let layout = store.layout(ID).unwrap();
    image::build(&layout, tag, "app", archive_path, &info, "2026-11-23T10:05:00Z").unwrap()
}

/// A reference carrying the pull credential the registry below expects for `ID`.
fn authed(image: &str) -> Option<ImageRef> {
    let mut reference = ImageRef::parse(image)?;
    reference.auth = Some("Basic a3ViZS1taWdyYXRlOnB3".into()); // kube-migrate:pw
    Some(reference)
}

struct Registry {
    host: String,
    ca: std::path::PathBuf,
    store: Store,
    shutdown: CancellationToken,
    _dir: tempfile::TempDir,
}

/// The agent's registry endpoint over TLS with certificates of a fresh kube-migrate CA.
async fn registry() -> Registry {
    install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    issue(
        &certs,
        &Request {
            extra_sans: vec!["127.0.0.1".into()],
            days: 1,
            ..Default::default()
        },
    )
    .unwrap();
    let store = Store::open(dir.path().join("agent")).unwrap();
    let record = kube_migrate::agent::store::Record {
        pull_digest: Some(kube_migrate::agent::api::pull_digest("pw")),
        ..Default::default()
    };
    store.save(ID, &record).unwrap();
    let reloader = CertReloader::new(certs.join("agent.crt"), certs.join("agent.key")).unwrap();
    let config = server_config(Arc::clone(&reloader), None).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let host = listener.local_addr().unwrap().to_string();
    let shutdown = CancellationToken::new();
    tokio::spawn(serve_tls(
        listener,
        config,
        registry::router(registry::Registry {
            store: store.clone(),
            own: Default::default(),
        }),
        shutdown.clone(),
    ));
    Registry {
        host,
        ca: certs.join("ca.crt"),
        store,
        shutdown,
        _dir: dir,
    }
}

#[tokio::test]
async fn a_checkpoint_image_restores_the_exact_counter_and_memory() {
    let registry = registry().await;
    let work = tempfile::tempdir().unwrap();
    let memory = Memory::generate(3 * 1024 * 1024 + 17, 99).unwrap();
    let archive_path = write_archive(work.path(), &snapshot(memory.clone(), 4242)).unwrap();
    let built = build_image(&registry.store, "app", &archive_path);

    let image = format!("{}/kube-migrate/{ID}:app", registry.host);
    let reference = authed(&image).expect("a checkpoint image reference");
    let restored = Puller::new(&registry.ca).unwrap().pull(&reference).await.unwrap();
    assert_eq!(restored.counter, 4242);
    assert_eq!(restored.memory.len(), memory.len());
    assert_eq!(restored.memory.sha256(), memory.sha256());
    assert_eq!(restored.memory.as_slice(), memory.as_slice());
    assert_eq!(restored.manifest_digest, built.manifest_digest);
    assert_eq!(
        restored.image_id,
        format!("{}/kube-migrate/{ID}@{}", registry.host, built.manifest_digest)
    );

    // By digest too.
    let by_digest = authed(&format!(
        "{}/kube-migrate/{ID}@{}",
        registry.host, built.manifest_digest
    ))
    .unwrap();
    let again = Puller::new(&registry.ca).unwrap().pull(&by_digest).await.unwrap();
    assert_eq!(again.counter, 4242);
    registry.shutdown.cancel();
}

#[tokio::test]
async fn pull_and_checkpoint_failures_have_the_kubelets_reasons() {
    let registry = registry().await;
    let work = tempfile::tempdir().unwrap();
    let puller = Puller::new(&registry.ca).unwrap();

    // Unknown image: 404 from the registry.
    let missing = authed(&format!("{}/kube-migrate/{ID}:nope", registry.host)).unwrap();
    let err = puller.pull(&missing).await.unwrap_err();
    assert!(matches!(err, RestoreError::Status { status: 404, .. }), "{err}");
    assert_eq!(err.reason(), REASON_PULL);

    // Nothing listening.
    let closed = authed(&format!("127.0.0.1:1/kube-migrate/{ID}:app")).unwrap();
    let err = puller.pull(&closed).await.unwrap_err();
    assert_eq!(err.reason(), REASON_PULL, "{err}");

    // A registry certificate from another CA.
    let other = tempfile::tempdir().unwrap();
    issue(
        other.path(),
        &Request {
            namespace: "x".into(),
            webhook_service: "w".into(),
            agent_name: "a".into(),
            extra_sans: vec![],
            days: 1,
        },
    )
    .unwrap();
    let memory = Memory::generate(1000, 1).unwrap();
    let good = write_archive(work.path(), &snapshot(memory.clone(), 7)).unwrap();
    build_image(&registry.store, "good", &good);
    let good_ref = authed(&format!("{}/kube-migrate/{ID}:good", registry.host)).unwrap();
    let err = Puller::new(&other.path().join("ca.crt"))
        .unwrap()
        .pull(&good_ref)
        .await
        .unwrap_err();
    assert_eq!(err.reason(), REASON_PULL, "{err}");
    assert!(puller.pull(&good_ref).await.is_ok());

    // A checkpoint whose memory does not match its header: the container cannot be created.
    let lying = snapshot(Memory::from_hashed(memory.as_slice().to_vec(), "00".repeat(32)), 7);
    let bad_dir = work.path().join("bad");
    let bad = write_archive(&bad_dir, &lying).unwrap();
    build_image(&registry.store, "bad", &bad);
    let bad_ref = authed(&format!("{}/kube-migrate/{ID}:bad", registry.host)).unwrap();
    let err = puller.pull(&bad_ref).await.unwrap_err();
    assert!(matches!(err, RestoreError::MemoryDigest { .. }), "{err}");
    assert_eq!(err.reason(), REASON_CREATE);
    registry.shutdown.cancel();
}

#[test]
fn reading_a_layer_checks_its_digest_and_the_state() {
    let memory = Memory::generate(70_000, 5).unwrap();
    let layer = write_tar(Vec::new(), &snapshot(memory.clone(), 11)).unwrap();
    let (digest, _) = archive::HashingReader::new(layer.as_slice()).finish().unwrap();

    let (header, restored) = read_layer(layer.as_slice(), Some(&digest)).unwrap();
    assert_eq!(header.counter, 11);
    assert_eq!(restored.sha256(), memory.sha256());

    let err = read_layer(layer.as_slice(), Some(&format!("sha256:{}", "0".repeat(64)))).unwrap_err();
    assert!(matches!(err, RestoreError::LayerDigest { .. }), "{err}");

    // One flipped memory byte.
    let mut corrupt = layer.clone();
    let offset = corrupt.windows(32).position(|w| w == &memory.as_slice()[..32]).unwrap();
    corrupt[offset + 100] ^= 0xff;
    let err = read_layer(corrupt.as_slice(), None).unwrap_err();
    assert!(matches!(err, RestoreError::MemoryDigest { .. }), "{err}");

    // No state at all.
    let mut empty = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(2);
    h.set_mode(0o600);
    empty.append_data(&mut h, "config.dump", &b"{}"[..]).unwrap();
    let empty = empty.into_inner().unwrap();
    assert!(matches!(
        read_layer(empty.as_slice(), None),
        Err(RestoreError::MissingState)
    ));
}
