//! The TLS listeners' bounds: a silent peer is dropped after the handshake timeout, and
//! connections beyond the cap wait for a slot instead of taking a task each.

use std::{sync::Arc, time::Duration};

use axum::{Router, routing::get};
use kube_migrate::{
    certs,
    server::{Limits, serve_tls_with},
    tls::{CertReloader, server_config},
};
use tokio::{
    io::AsyncReadExt,
    net::{TcpListener, TcpStream},
    time::Instant,
};
use tokio_util::sync::CancellationToken;

async fn start(limits: Limits) -> (std::net::SocketAddr, CancellationToken, tempfile::TempDir) {
    kube_migrate::tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let request = certs::Request {
        days: 1,
        ..Default::default()
    };
    certs::issue(dir.path(), &request).unwrap();
    let reloader = CertReloader::new(dir.path().join("webhook.crt"), dir.path().join("webhook.key")).unwrap();
    let config = server_config(Arc::clone(&reloader), None).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let router = Router::new().route("/", get(|| async { "ok" }));
    tokio::spawn(serve_tls_with(listener, config, router, shutdown.clone(), limits));
    (addr, shutdown, dir)
}

/// Seconds until the server closes a connection on which the peer never says anything.
async fn closed_after(addr: std::net::SocketAddr) -> f64 {
    let started = Instant::now();
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(10), silent.read(&mut buf))
        .await
        .expect("the server never closed a silent connection")
        .unwrap_or(0);
    assert_eq!(n, 0, "nothing is sent to a peer that never said hello");
    started.elapsed().as_secs_f64()
}

#[tokio::test]
async fn a_silent_peer_is_dropped_after_the_handshake_timeout() {
    let (addr, shutdown, _dir) = start(Limits {
        handshake: Duration::from_millis(300),
        ..Limits::default()
    })
    .await;
    let after = closed_after(addr).await;
    assert!((0.25..3.0).contains(&after), "closed after {after:.2} s");
    shutdown.cancel();
}

#[tokio::test]
async fn connections_beyond_the_cap_wait_for_a_slot() {
    let (addr, shutdown, _dir) = start(Limits {
        max_connections: 2,
        handshake: Duration::from_millis(800),
        ..Limits::default()
    })
    .await;
    // Two silent peers take both slots; a third is not even served until one is dropped, so
    // its own handshake timeout starts late: it is closed after about two timeouts, not one.
    let hold = [
        TcpStream::connect(addr).await.unwrap(),
        TcpStream::connect(addr).await.unwrap(),
    ];
    tokio::time::sleep(Duration::from_millis(100)).await;
    let third = closed_after(addr).await;
    assert!(third >= 1.2, "the third connection was served at once ({third:.2} s)");
    drop(hold);
    shutdown.cancel();
}
