//! `kube-migrate-agent`: the per-node agent (DaemonSet).

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;

use crate::{
    agent::{
        authz::{Access, Callers},
        client::AgentClient,
        consent::Consent,
        cri::Cri,
        freezer::Freezer,
        identity::Identity,
        kubelet::{KubeletClient, kubelet_tls},
        prepull::Prepull,
        registry::{self, Registry},
        server::{AgentState, router, spawn_gc},
        source::spawn_expiry,
        store::Store,
        volumes::{ContainerRoots, Unpacker},
    },
    metrics::Metrics,
    server::{Health, admin_router, serve_admin, serve_tls},
    telemetry::LogFormat,
    tls::{CertReloader, agent_client_config, server_config},
};

#[derive(clap::Parser, Debug)]
#[command(
    name = "kube-migrate-agent",
    version,
    about = "kube-migrate node agent: checkpoint, transfer, checkpoint images"
)]
pub struct Options {
    /// Name of this node (downward API `spec.nodeName`).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// mTLS address of the agent API (controller and other agents).
    #[arg(long, env = "KM_LISTEN", default_value = "0.0.0.0:9443")]
    pub listen: SocketAddr,
    /// Address of the read-only image endpoint for this node's runtime. Loopback only:
    /// checkpoint images hold the containers' memory.
    #[arg(long, env = "KM_REGISTRY_LISTEN", default_value = "127.0.0.1:5443")]
    pub registry_listen: SocketAddr,
    /// `host:port` the node's runtime pulls checkpoint images from (defaults to the
    /// registry address).
    #[arg(long, env = "KM_REGISTRY_HOST")]
    pub registry_host: Option<String>,
    /// The node runtime's CRI socket (the kubelet's `--container-runtime-endpoint`): checkpoint
    /// images are pulled into the runtime through it as soon as they are built, before the
    /// replacement's start asks for them. Empty, or no socket there at start: not pulled
    /// ahead (the kubelet pulls them as it starts the replacement).
    #[arg(long, env = "KM_RUNTIME_ENDPOINT", default_value = "unix:///run/crio/crio.sock")]
    pub runtime_endpoint: String,
    /// Plain-HTTP address of /metrics, /livez and /readyz.
    #[arg(long, env = "KM_ADMIN_LISTEN", default_value = "0.0.0.0:9090")]
    pub admin_listen: SocketAddr,
    /// The kubelet of this node (`https://$(NODE_IP):10250`).
    #[arg(long, env = "KM_KUBELET_URL")]
    pub kubelet_url: String,
    /// CA of the kubelet's serving certificate. The default, the cluster CA, fits kubelets
    /// whose serving certificates the cluster signs (`serverTLSBootstrap`); a kubelet that
    /// self-signs needs its own CA here, or `--kubelet-insecure-tls`.
    #[arg(
        long,
        env = "KM_KUBELET_CA",
        default_value = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
    )]
    pub kubelet_ca: PathBuf,
    /// Do not verify the kubelet's serving certificate: an explicit opt-in, never the default
    /// (the agent sends a token that may checkpoint any pod of the node).
    #[arg(long, env = "KM_KUBELET_INSECURE_TLS")]
    pub kubelet_insecure_tls: bool,
    /// ServiceAccount token presented to the kubelet (re-read on every call).
    #[arg(
        long,
        env = "KM_TOKEN_FILE",
        default_value = "/var/run/secrets/kubernetes.io/serviceaccount/token"
    )]
    pub token_file: PathBuf,
    /// Where archives and images are kept.
    #[arg(long, env = "KM_STATE_DIR", default_value = "/var/lib/kube-migrate")]
    pub state_dir: PathBuf,
    /// Where this agent's certificate comes from: `csr` asks the controller for one naming
    /// this node through the CertificateSigningRequest API (key in memory only, renewed at two
    /// thirds of its life); `files` reads the one certificate all agents share from
    /// `--tls-cert`/`--tls-key` (then any agent may push to any other: see README "Decisions").
    #[arg(long, env = "KM_IDENTITY", value_enum, default_value = "csr")]
    pub identity: IdentityMode,
    /// No API server (benches of the transfer path): needs `--identity files`, and every
    /// checkpoint request is refused, as none can be checked against a PodMigration.
    #[arg(long, env = "KM_STANDALONE")]
    pub standalone: bool,
    /// Lifetime asked for a `csr` certificate (the controller gives at most a week).
    #[arg(long, env = "KM_CERTIFICATE_SECONDS", default_value_t = 86_400)]
    pub certificate_seconds: u64,
    #[arg(long, env = "KM_TLS_CERT", default_value = "/etc/kube-migrate/tls/tls.crt")]
    pub tls_cert: PathBuf,
    #[arg(long, env = "KM_TLS_KEY", default_value = "/etc/kube-migrate/tls/tls.key")]
    pub tls_key: PathBuf,
    /// CA of every kube-migrate certificate: clients must present one signed by it.
    #[arg(long, env = "KM_CA", default_value = "/etc/kube-migrate/tls/ca.crt")]
    pub ca: PathBuf,
    /// Name in the other agents' certificates (the only callers that may push archives here).
    #[arg(long, env = "KM_AGENT_SERVER_NAME", default_value = "kube-migrate-agent")]
    pub agent_server_name: String,
    /// Name in the controller's certificate (the only caller that may checkpoint, push,
    /// build images and delete here).
    #[arg(long, env = "KM_CONTROLLER_NAME", default_value = "kube-migrate-webhook")]
    pub controller_name: String,
    /// The node's cgroup file system (v1 with a freezer hierarchy, or v2): source containers
    /// are frozen there around their checkpoint.
    #[arg(long, env = "KM_CGROUP_ROOT", default_value = "/sys/fs/cgroup")]
    pub cgroup_root: PathBuf,
    /// Hold files of frozen containers, read by the node's runtime wrapper
    /// (docs/install-cri-o.md): while one exists, the runtime's resume of that container is
    /// a no-op. Must be the same host directory the wrapper reads.
    #[arg(long, env = "KM_HOLD_DIR", default_value = "/run/kube-migrate/holds")]
    pub hold_dir: PathBuf,
    /// Remove a migration's files this long after they were last touched.
    #[arg(long, env = "KM_RETENTION_SECONDS", default_value_t = 86_400)]
    pub retention_seconds: u64,
    /// Upper bound of a transfer to another agent.
    #[arg(long, env = "KM_TRANSFER_TIMEOUT_SECONDS", default_value_t = 3_600)]
    pub transfer_timeout_seconds: u64,
    /// The host's `/proc` (the DaemonSet shares the host's PID namespace): pods' emptyDirs
    /// are read and filled through `/proc/<pid>/root` of a container that mounts them.
    #[arg(long, env = "KM_PROC_DIR", default_value = "/proc")]
    pub proc_dir: PathBuf,
    #[arg(long, env = "KM_LOG_FORMAT", value_enum, default_value = "json")]
    pub log_format: LogFormat,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityMode {
    Csr,
    Files,
}

/// `kube-migrate-agent await-restore`: the program of the restore init container that
/// kube-migrate adds to a replacement with emptyDir volumes. It waits until the target agent
/// has put the volumes' contents in place and written the marker.
#[derive(clap::Parser, Debug)]
#[command(name = "kube-migrate-agent await-restore")]
pub struct AwaitRestore {
    #[arg(long, default_value = "/kube-migrate/restore/restored")]
    pub marker: PathBuf,
    /// Give up (exit 1: the kubelet starts the init container again) after this long.
    #[arg(long, default_value_t = 3_600)]
    pub timeout_seconds: u64,
}

/// `kube-migrate-agent unpack-volume`: the agent's own child that unpacks an emptyDir's tar
/// (on stdin) into a directory of a container, chrooted into that container's root first (see
/// `agent::volumes::Unpacker`).
#[derive(clap::Parser, Debug)]
#[command(name = "kube-migrate-agent unpack-volume")]
pub struct UnpackVolume {
    /// The container's root as the agent sees it (`/proc/<pid>/root`).
    #[arg(long)]
    pub root: PathBuf,
    /// The directory inside it.
    #[arg(long)]
    pub dir: PathBuf,
    #[arg(long)]
    pub volume: String,
}

impl UnpackVolume {
    pub const COMMAND: &'static str = "unpack-volume";

    pub fn run(&self) -> Result<(), String> {
        std::os::unix::fs::chroot(&self.root).map_err(|e| format!("chroot {}: {e}", self.root.display()))?;
        std::env::set_current_dir("/").map_err(|e| format!("chdir /: {e}"))?;
        crate::agent::volumes::unpack_from(&self.volume, std::io::stdin().lock(), &self.dir).map_err(|e| e.to_string())
    }
}

impl AwaitRestore {
    /// The first argument that selects this program instead of the agent.
    pub const COMMAND: &'static str = "await-restore";

    pub fn run(&self) -> bool {
        crate::agent::volumes::await_marker(&self.marker, Duration::from_secs(self.timeout_seconds))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("state directory: {0}")]
    Store(#[from] crate::agent::store::StoreError),
    #[error("listening on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("Kubernetes client: {0}")]
    Kube(#[from] kube::Error),
    #[error("stopped before this node's agent certificate was signed")]
    NoCertificate,
    #[error("--standalone needs --identity files (no API server to ask for a certificate)")]
    StandaloneCsr,
}

/// Pre-pulling through the runtime at `endpoint`, if there is one: the DaemonSet starts
/// after the runtime, so a socket missing now is a node without it (or another path).
fn prepull(endpoint: &str) -> Prepull {
    let socket = endpoint.strip_prefix("unix://").unwrap_or(endpoint);
    let cri = match (endpoint.is_empty(), std::path::Path::new(socket).exists()) {
        (true, _) => None,
        (false, false) => {
            tracing::info!(
                endpoint,
                "no runtime socket: checkpoint images are pulled by the kubelet, not ahead"
            );
            None
        }
        (false, true) => Cri::new(endpoint, registry::HOLD_MAX)
            .inspect_err(|error| tracing::warn!(endpoint, %error, "checkpoint images are not pulled ahead"))
            .ok(),
    };
    Prepull {
        cri,
        own: Default::default(),
    }
}

async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, RunError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| RunError::Listen { addr, source })
}

/// This node's agent certificate: read from files, or asked for (and renewed) through the
/// CertificateSigningRequest API.
async fn own_certificate(
    opts: &Options,
    client: Option<&kube::Client>,
    shutdown: &CancellationToken,
) -> Result<Arc<CertReloader>, RunError> {
    match (opts.identity, client) {
        (IdentityMode::Csr, None) => Err(RunError::StandaloneCsr),
        (IdentityMode::Files, _) => {
            let certs = CertReloader::new(&opts.tls_cert, &opts.tls_key)?;
            certs.spawn_poll(Duration::from_secs(10));
            Ok(certs)
        }
        (IdentityMode::Csr, Some(client)) => {
            let identity = Identity {
                csrs: kube::Api::all(client.clone()),
                node: opts.node_name.clone(),
                agent_name: opts.agent_server_name.clone(),
                seconds: opts.certificate_seconds,
                wait: Duration::from_secs(60),
            };
            let (chain, key) = tokio::select! {
                pair = identity.first() => pair,
                _ = shutdown.cancelled() => return Err(RunError::NoCertificate),
            };
            let certs = CertReloader::from_pem(chain.as_bytes(), key.as_bytes())?;
            tracing::info!(node = %opts.node_name, "this node's agent certificate is signed");
            identity.spawn_renewal(Arc::clone(&certs));
            Ok(certs)
        }
    }
}

pub async fn run(opts: Options, shutdown: CancellationToken) -> Result<(), RunError> {
    let metrics = Arc::new(Metrics::new());
    let health = Health::default();
    // Probes and metrics answer while the certificate is being signed (not Ready meanwhile).
    let admin = tokio::spawn(serve_admin(
        opts.admin_listen,
        admin_router(Arc::clone(&metrics), health.clone()),
        shutdown.clone(),
    ));
    let client = match opts.standalone {
        true => None,
        false => Some(kube::Client::try_default().await?),
    };
    let certs = own_certificate(&opts, client.as_ref(), &shutdown).await?;

    let kubelet_tls = if opts.kubelet_insecure_tls {
        tracing::warn!("--kubelet-insecure-tls: the kubelet's serving certificate is not verified");
        kubelet_tls(None)?
    } else {
        kubelet_tls(Some(&opts.kubelet_ca))?
    };
    let store = Store::open(&opts.state_dir)?;
    let registry_host = opts
        .registry_host
        .clone()
        .unwrap_or_else(|| opts.registry_listen.to_string());
    let state = AgentState::new(
        opts.node_name.clone(),
        store.clone(),
        (
            KubeletClient::new(kubelet_tls, opts.kubelet_url.clone(), opts.token_file.clone()),
            Freezer::new(&opts.cgroup_root, &opts.hold_dir),
            ContainerRoots {
                proc_dir: opts.proc_dir.clone(),
                // This very program, as `unpack-volume` (see `Unpacker`).
                unpacker: Unpacker::Chrooted(std::env::current_exe().unwrap_or_else(|_| "/proc/self/exe".into())),
            },
        ),
        AgentClient::new(
            agent_client_config(&opts.ca, Arc::clone(&certs), &opts.agent_server_name)?,
            Duration::from_secs(opts.transfer_timeout_seconds),
        ),
        Arc::clone(&metrics),
        (registry_host, prepull(&opts.runtime_endpoint)),
        Access {
            callers: Callers {
                controller: opts.controller_name.clone(),
                agent: opts.agent_server_name.clone(),
            },
            require_node: opts.identity == IdentityMode::Csr,
            consent: Some(client.map_or(Consent::RefuseAll, Consent::new)),
        },
    );
    spawn_expiry(Arc::clone(&state), Duration::from_secs(10));
    spawn_gc(
        Arc::clone(&state),
        Duration::from_secs(opts.retention_seconds),
        Duration::from_secs(300),
    );

    let registry = registry::router(Registry {
        store,
        own: state.prepull.own.clone(),
    });
    let api = serve_tls(
        bind(opts.listen).await?,
        server_config(Arc::clone(&certs), Some(&opts.ca))?,
        router(state),
        shutdown.clone(),
    );
    let images = serve_tls(
        bind(opts.registry_listen).await?,
        server_config(Arc::clone(&certs), None)?,
        registry,
        shutdown.clone(),
    );
    tracing::info!(node = %opts.node_name, api = %opts.listen, registry = %opts.registry_listen, "agent listening");
    health.set_ready(true);
    let (admin, _, _) = tokio::join!(admin, api, images);
    admin
        .unwrap_or_else(|e| Err(std::io::Error::other(e)))
        .map_err(|source| RunError::Listen {
            addr: opts.admin_listen,
            source,
        })
}
