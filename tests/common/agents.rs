//! Two agents over real mTLS on loopback, with a kubelet checkpoint endpoint that checks its
//! bearer token, and stand-in cgroup and /proc trees under each agent's state directory.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use axum::{
    Json, Router,
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
    routing::post,
};
use kube_migrate::{
    agent::{
        api::{CheckpointRequest, ExpectRequest, PushRequest},
        authz::Access,
        client::AgentClient,
        freezer::Freezer,
        kubelet::{KubeletClient, kubelet_tls},
        prepull::Prepull,
        registry,
        server::{AgentState, router},
        store::Store,
        volumes::{ContainerRoots, Unpacker},
    },
    certs,
    metrics::Metrics,
    server::serve_tls,
    tls::{CertReloader, agent_client_config, install_crypto_provider, server_config},
};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

pub struct Env {
    pub _dir: tempfile::TempDir,
    pub certs: PathBuf,
    pub kubelet_dir: PathBuf,
    pub shutdown: CancellationToken,
}

impl Drop for Env {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub async fn listen(router: Router, tls: rustls::ServerConfig, shutdown: &CancellationToken) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve_tls(listener, tls, router, shutdown.clone()));
    addr
}

/// A kubelet checkpoint endpoint: bearer token required, archive in the CRI-O layout.
async fn kubelet_checkpoint(
    State(dir): State<PathBuf>,
    Path((ns, pod, container)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Result<Json<Value>, (StatusCode, String)> {
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some("Bearer test-token") {
        return Err((StatusCode::UNAUTHORIZED, "Unauthorized".into()));
    }
    if container == "missing" {
        return Err((StatusCode::NOT_FOUND, "404 page not found".into()));
    }
    let path = dir.join(format!("checkpoint-{pod}_{ns}-{container}-2026-11-23T10:05:00Z.tar"));
    super::write_archive(
        &path,
        &container,
        "registry.local/counter:1",
        &super::bytes(3 * 1024 * 1024 + 17, 9),
    );
    Ok(Json(json!({ "items": [path.display().to_string()] })))
}

pub struct Agent {
    pub url: String,
    pub registry: SocketAddr,
    pub state_dir: PathBuf,
}

/// The certificate the controller signs for node `node`'s agent (`--identity csr`), made
/// here without the CertificateSigningRequest API.
pub fn node_identity(env: &Env, node: &str) -> Arc<CertReloader> {
    let read = |f: &str| std::fs::read_to_string(env.certs.join(f)).unwrap();
    let (request, key) = certs::agent_request("kube-migrate-agent", node).unwrap();
    let leaf = certs::AgentLeaf {
        node: node.into(),
        sans: certs::agent_sans("kube-migrate-agent", "kube-migrate", &[]),
        seconds: 3600,
    };
    let chain = certs::sign_agent(&read("agent-issuer.crt"), &read("agent-issuer.key"), &request, &leaf).unwrap();
    CertReloader::from_pem(chain.as_bytes(), key.as_bytes()).unwrap()
}

/// How a push names these checkpointed archives (or emptyDir contents).
pub fn refs(records: &[kube_migrate::agent::api::ArchiveRecord]) -> Vec<kube_migrate::agent::api::ArchiveRef> {
    records.iter().map(|r| r.reference()).collect()
}

/// What the controller tells the target before a push from `source_node`.
/// The push of `archives` (no volumes, default transfer options) to the agent at `target`.
pub fn push_of(target: &str, archives: &[kube_migrate::agent::api::ArchiveRecord]) -> PushRequest {
    PushRequest {
        volumes: Vec::new(),
        target_id: None,
        transfer: Default::default(),
        target: target.into(),
        archives: refs(archives),
    }
}

pub fn expect_of(push: &PushRequest, source_node: &str) -> ExpectRequest {
    ExpectRequest {
        source_node: source_node.into(),
        archives: push.archives.clone(),
        volumes: push.volumes.clone(),
        prepull: false,
    }
}

pub async fn agent(env: &Env, name: &str, kubelet: SocketAddr, prepull: Prepull) -> Agent {
    let cert = node_identity(env, name);
    let state_dir = env._dir.path().join(name);
    let store = Store::open(&state_dir).unwrap();
    let token = env._dir.path().join("token");
    std::fs::write(&token, "test-token\n").unwrap();
    // The registry address must be known before the state is built.
    let reg_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let registry_addr = reg_listener.local_addr().unwrap();
    let state = AgentState::new(
        name.into(),
        store.clone(),
        (
            KubeletClient::new(
                kubelet_tls(Some(&env.certs.join("ca.crt"))).unwrap(),
                format!("https://127.0.0.1:{}", kubelet.port()),
                token,
            ),
            Freezer::new(state_dir.join("cgroup"), state_dir.join("holds")),
            ContainerRoots {
                proc_dir: state_dir.join("proc"),
                unpacker: Unpacker::InProcess,
            },
        ),
        AgentClient::new(
            agent_client_config(&env.certs.join("ca.crt"), Arc::clone(&cert), "kube-migrate-agent").unwrap(),
            Duration::from_secs(60),
        ),
        Arc::new(Metrics::new()),
        (registry_addr.to_string(), prepull),
        Access {
            require_node: true,
            ..Default::default()
        },
    );
    tokio::spawn(serve_tls(
        reg_listener,
        server_config(Arc::clone(&cert), None).unwrap(),
        registry::router(registry::Registry {
            store,
            own: state.prepull.own.clone(),
        }),
        env.shutdown.clone(),
    ));
    let addr = listen(
        router(state),
        server_config(cert, Some(&env.certs.join("ca.crt"))).unwrap(),
        &env.shutdown,
    )
    .await;
    Agent {
        url: format!("https://127.0.0.1:{}", addr.port()),
        registry: registry_addr,
        state_dir,
    }
}

pub async fn setup() -> (Env, Agent, Agent, AgentClient) {
    setup_with(Prepull::default()).await
}

/// [`setup`] with the target agent pre-pulling as `target_prepull` says.
pub async fn setup_with(target_prepull: Prepull) -> (Env, Agent, Agent, AgentClient) {
    install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let certs_dir = dir.path().join("certs");
    // No extra SANs: the runtime dials the registry on 127.0.0.1, which the agent
    // certificate must name by default (the pull below verifies it).
    let request = certs::Request {
        days: 1,
        ..Default::default()
    };
    certs::issue(&certs_dir, &request).unwrap();
    let kubelet_dir = dir.path().join("kubelet-checkpoints");
    std::fs::create_dir_all(&kubelet_dir).unwrap();
    let env = Env {
        _dir: dir,
        certs: certs_dir,
        kubelet_dir,
        shutdown: CancellationToken::new(),
    };
    let kubelet_cert = CertReloader::new(env.certs.join("agent.crt"), env.certs.join("agent.key")).unwrap();
    let kubelet = listen(
        Router::new()
            .route("/checkpoint/{ns}/{pod}/{container}", post(kubelet_checkpoint))
            .with_state(env.kubelet_dir.clone()),
        server_config(kubelet_cert, None).unwrap(),
        &env.shutdown,
    )
    .await;
    let source = agent(&env, "node-a", kubelet, Prepull::default()).await;
    let target = agent(&env, "node-b", kubelet, target_prepull).await;
    let controller_identity = CertReloader::new(env.certs.join("webhook.crt"), env.certs.join("webhook.key")).unwrap();
    let controller = AgentClient::new(
        agent_client_config(&env.certs.join("ca.crt"), controller_identity, "kube-migrate-agent").unwrap(),
        Duration::from_secs(60),
    );
    (env, source, target, controller)
}

pub const ID: &str = "9e9e9e9e-0000-4000-8000-000000000001";

pub fn checkpoint_request(containers: &[&str]) -> CheckpointRequest {
    CheckpointRequest {
        migration: "db-0-migration".into(),
        namespace: "shop".into(),
        pod: "db-0".into(),
        containers: containers.iter().map(|c| c.to_string()).collect(),
        timeout_seconds: 30,
        freeze: None,
        empty_dirs: Vec::new(),
    }
}

/// A stand-in container runtime on the Unix socket `socket`: every request, over HTTP/2 (the
/// CRI) or HTTP/1 (CRI-O's own endpoints such as `GET /config`, on the same socket), is
/// answered by `answer`.
pub fn serve_runtime<F, Fut>(socket: &std::path::Path, answer: F)
where
    F: Fn(hyper::Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = hyper::Response<tonic::body::Body>> + Send + 'static,
{
    let listener = tokio::net::UnixListener::bind(socket).unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let answer = answer.clone();
            let service = hyper::service::service_fn(move |request| {
                let answer = answer.clone();
                async move { Ok::<_, std::convert::Infallible>(answer(request).await) }
            });
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
}
