//! HTTP plumbing: an axum router served over rustls, and the plain-HTTP admin server that
//! exposes `/metrics`, `/livez` and `/readyz` on a port of its own.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto::Builder,
    service::TowerToHyperService,
};
use rustls::ServerConfig;
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::{metrics::Metrics, tls::PeerIdentity};

/// Bounds of a TLS listener: a peer that connects and stays silent, or opens connections by
/// the thousand, must not hold the server's memory or tasks.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once; further ones wait in the kernel's backlog.
    pub max_connections: usize,
    /// Time to complete the TLS handshake.
    pub handshake: Duration,
    /// Time to send a request's headers once the connection is up (HTTP/1).
    pub headers: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 512,
            handshake: Duration::from_secs(10),
            headers: Duration::from_secs(30),
        }
    }
}

/// Serve `router` over TLS until `shutdown` fires, with the default [`Limits`].
pub async fn serve_tls(listener: TcpListener, config: ServerConfig, router: Router, shutdown: CancellationToken) {
    serve_tls_with(listener, config, router, shutdown, Limits::default()).await
}

/// Serve `router` over TLS until `shutdown` fires. Handshake failures are logged per
/// connection and never stop the server.
pub async fn serve_tls_with(
    listener: TcpListener,
    config: ServerConfig,
    router: Router,
    shutdown: CancellationToken,
    limits: Limits,
) {
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => return,
            permit = Arc::clone(&slots).acquire_owned() => permit.expect("never closed"),
        };
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    continue;
                }
            },
        };
        let acceptor = acceptor.clone();
        let router = router.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let tls = match tokio::time::timeout(limits.handshake, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(error)) => {
                    tracing::debug!(%error, %peer, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            // Who the client proved to be (mTLS listeners), for handlers that authorise.
            let peer_identity = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| PeerIdentity::from_certificate(c))
                .unwrap_or_default();
            let service = TowerToHyperService::new(router.layer(axum::Extension(Arc::new(peer_identity))));
            let mut builder = Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.headers);
            if let Err(error) = builder.serve_connection(TokioIo::new(tls), service).await {
                tracing::debug!(%error, %peer, "connection ended with an error");
            }
        });
    }
}

/// Only callers whose client certificate names one of `names` (DNS SAN or CN) reach `router`;
/// others get 403. For a listener whose TLS config already requires a client certificate of a
/// CA (the webhook with `--client-ca`): the CA may sign more than the API server's identity.
pub fn require_peer_names(router: Router, names: Vec<String>) -> Router {
    let names = Arc::new(names);
    router.layer(axum::middleware::from_fn(
        move |request: axum::extract::Request, next: axum::middleware::Next| {
            let names = Arc::clone(&names);
            async move {
                let peer = request
                    .extensions()
                    .get::<Arc<PeerIdentity>>()
                    .cloned()
                    .unwrap_or_default();
                if names.iter().any(|n| peer.is(n)) {
                    next.run(request).await
                } else {
                    let message = format!("client certificate names {:?}, none of {:?}", peer.names, names);
                    tracing::warn!(%message, "admission request refused");
                    (axum::http::StatusCode::FORBIDDEN, message).into_response()
                }
            }
        },
    ))
}

/// A token cancelled on SIGTERM (what the kubelet sends) or Ctrl-C: every server and loop of
/// a binary stops on it.
pub fn shutdown_on_signals() -> CancellationToken {
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
        signal.cancel();
    });
    shutdown
}

/// Readiness flags set by the binaries (caches synced, certificates loaded, ...).
#[derive(Clone, Default)]
pub struct Health {
    ready: Arc<AtomicBool>,
}

impl Health {
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }
}

#[derive(Clone)]
struct AdminState {
    metrics: Arc<Metrics>,
    health: Health,
}

/// The admin router: metrics in the OpenMetrics text format and the probes.
pub fn admin_router(metrics: Arc<Metrics>, health: Health) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/livez", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(AdminState { metrics, health })
}

async fn metrics_handler(State(state): State<AdminState>) -> impl IntoResponse {
    match state.metrics.encode() {
        Ok(body) => (
            StatusCode::OK,
            [(
                "content-type",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()).into_response(),
    }
}

async fn readyz(State(state): State<AdminState>) -> impl IntoResponse {
    if state.health.is_ready() {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

/// Serve the admin router on plain HTTP.
pub async fn serve_admin(addr: SocketAddr, router: Router, shutdown: CancellationToken) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    tracing::info!(%addr, "admin server (metrics, probes) listening");
    axum::serve(listener, router)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}
