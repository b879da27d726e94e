//! `test-kubelet`: options and the main loop.

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use kube::{
    Client,
    config::{KubeConfigOptions, Kubeconfig, KubeconfigError},
};
use kube_migrate::{
    server::serve_tls,
    telemetry::LogFormat,
    tls::{CertReloader, TlsError, server_config},
};
use tokio_util::sync::CancellationToken;

use crate::{
    auth::Authorizer,
    crun::{Crun, CrunConfig},
    node::{NodeConfig, NodeKeeper, parse_label},
    pods::{PodManager, Runtime},
    restore::{Puller, RestoreError},
    server::{ServerState, router},
};

#[derive(clap::Parser, Debug)]
#[command(
    name = "test-kubelet",
    version,
    about = "Plays the kubelet of one node for a local control plane: registers the Node, runs its pods as \
             simulated containers, serves the checkpoint API and container logs, restores from checkpoint images"
)]
pub struct Options {
    /// Name of the node this kubelet plays.
    #[arg(long, env = "TEST_KUBELET_NODE_NAME")]
    pub node_name: String,
    /// The node's kubeconfig (identity `system:node:<node>` in group `system:nodes`).
    #[arg(long, env = "TEST_KUBELET_KUBECONFIG")]
    pub kubeconfig: PathBuf,
    /// HTTPS address of the kubelet API; its port becomes `daemonEndpoints.kubeletEndpoint.Port`.
    #[arg(long, env = "TEST_KUBELET_LISTEN", default_value = "127.0.0.1:10250")]
    pub listen: SocketAddr,
    /// Serving certificate (PEM) of the kubelet API.
    #[arg(long, env = "TEST_KUBELET_TLS_CERT")]
    pub tls_cert: PathBuf,
    /// Key (PEM) of the serving certificate.
    #[arg(long, env = "TEST_KUBELET_TLS_KEY")]
    pub tls_key: PathBuf,
    /// CA (PEM) trusted when pulling checkpoint images (the kube-migrate CA).
    #[arg(long, env = "TEST_KUBELET_REGISTRY_CA")]
    pub registry_ca: PathBuf,
    /// Where checkpoint archives are written.
    #[arg(long, env = "TEST_KUBELET_CHECKPOINT_DIR")]
    pub checkpoint_dir: PathBuf,
    /// Stand-in cgroup v2 tree of the simulated containers (the node agent's `--cgroup-root`).
    #[arg(long, env = "TEST_KUBELET_CGROUP_ROOT")]
    pub cgroup_root: PathBuf,
    /// Node capacity: CPUs.
    #[arg(long, env = "TEST_KUBELET_CPU", default_value = "4")]
    pub cpu: String,
    /// Node capacity: memory.
    #[arg(long, env = "TEST_KUBELET_MEMORY", default_value = "8Gi")]
    pub memory: String,
    /// Node capacity: pods.
    #[arg(long, env = "TEST_KUBELET_PODS", default_value = "110")]
    pub pods: String,
    /// Extra node labels, `key=value[,key=value...]`.
    #[arg(long, env = "TEST_KUBELET_LABELS", value_delimiter = ',', value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Value of the node's `Hostname` address (default: the node name). The API server dials
    /// the first address of its `--kubelet-preferred-address-types` for logs; with its default
    /// order (Hostname first) a node name that does not resolve breaks `kubectl logs`.
    #[arg(long, env = "TEST_KUBELET_HOSTNAME_ADDRESS")]
    pub hostname_address: Option<String>,
    /// `nodeInfo.kubeletVersion` to report.
    #[arg(long, env = "TEST_KUBELET_VERSION", default_value = "v1.33.13")]
    pub kubelet_version: String,
    /// How often the node Lease is renewed.
    #[arg(long, env = "TEST_KUBELET_LEASE_INTERVAL_SECONDS", default_value_t = 10)]
    pub lease_interval_seconds: u64,
    /// How often the Ready condition's heartbeat is updated.
    #[arg(long, env = "TEST_KUBELET_STATUS_INTERVAL_SECONDS", default_value_t = 30)]
    pub status_interval_seconds: u64,
    #[arg(long, env = "TEST_KUBELET_LOG_FORMAT", value_enum, default_value = "plain")]
    pub log_format: LogFormat,
    /// Run `kube-migrate.test/<name>` images as real containers with crun and CRIU: the
    /// directory holding `<name>/rootfs` and `<name>/image.json`. Needs the `--crun-*` options.
    /// Without it every container is simulated.
    #[arg(long, env = "TEST_KUBELET_CRUN_IMAGES", requires_all = ["crun_enter", "crun_shim", "crun_state"])]
    pub crun_images: Option<PathBuf>,
    /// `criu/enter.sh`: runs crun inside the CRIU root.
    #[arg(long, env = "TEST_KUBELET_CRUN_ENTER")]
    pub crun_enter: Option<PathBuf>,
    /// The `km-shim` binary (`criu/km-shim.c`), one per container.
    #[arg(long, env = "TEST_KUBELET_CRUN_SHIM")]
    pub crun_shim: Option<PathBuf>,
    /// This node's crun state directory (crun root, bundles, logs); one per node.
    #[arg(long, env = "TEST_KUBELET_CRUN_STATE")]
    pub crun_state: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("serving certificate: {0}")]
    Tls(#[from] TlsError),
    #[error("registry trust: {0}")]
    Registry(#[from] RestoreError),
    #[error("kubeconfig {path}: {source}")]
    Kubeconfig { path: PathBuf, source: KubeconfigError },
    #[error("API client: {0}")]
    Client(#[from] kube::Error),
    #[error("checkpoint directory {path}: {source}")]
    CheckpointDir { path: PathBuf, source: std::io::Error },
    #[error("listening on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
}

async fn client(path: &PathBuf) -> Result<Client, RunError> {
    let kubeconfig_error = |source| RunError::Kubeconfig {
        path: path.clone(),
        source,
    };
    let kubeconfig = Kubeconfig::read_from(path).map_err(kubeconfig_error)?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(kubeconfig_error)?;
    Ok(Client::try_from(config)?)
}

/// Run until `shutdown`.
pub async fn run(opts: Options, shutdown: CancellationToken) -> Result<(), RunError> {
    let certs = CertReloader::new(&opts.tls_cert, &opts.tls_key)?;
    let tls = server_config(Arc::clone(&certs), None)?;
    certs.spawn_poll(Duration::from_secs(30));
    let puller = Puller::new(&opts.registry_ca)?;
    let client = client(&opts.kubeconfig).await?;
    std::fs::create_dir_all(&opts.checkpoint_dir).map_err(|source| RunError::CheckpointDir {
        path: opts.checkpoint_dir.clone(),
        source,
    })?;
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .map_err(|source| RunError::Listen {
            addr: opts.listen,
            source,
        })?;
    let port = listener.local_addr().map_or(opts.listen.port(), |a| a.port());

    let runtime = Runtime::default();
    let state = ServerState {
        runtime: runtime.clone(),
        authorizer: Authorizer::new(client.clone(), opts.node_name.clone()),
        checkpoint_dir: opts.checkpoint_dir.clone(),
    };
    let server = tokio::spawn(serve_tls(listener, tls, router(state), shutdown.clone()));
    tracing::info!(node = %opts.node_name, listen = %opts.listen, "kubelet API listening");

    let keeper = Arc::new(NodeKeeper::new(
        client.clone(),
        NodeConfig {
            name: opts.node_name.clone(),
            port,
            hostname_address: opts.hostname_address.clone().unwrap_or_else(|| opts.node_name.clone()),
            cpu: opts.cpu.clone(),
            memory: opts.memory.clone(),
            pods: opts.pods.clone(),
            kubelet_version: opts.kubelet_version.clone(),
            extra_labels: opts.labels.iter().cloned().collect::<BTreeMap<_, _>>(),
            lease_interval: Duration::from_secs(opts.lease_interval_seconds.max(1)),
            status_interval: Duration::from_secs(opts.status_interval_seconds.max(1)),
        },
    ));
    // The API server may not be up yet: keep trying.
    loop {
        match keeper.register().await {
            Ok(()) => break,
            Err(error) => {
                tracing::warn!(%error, "node registration failed; retrying in 2 s");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                }
            }
        }
    }
    tokio::spawn(Arc::clone(&keeper).keep_alive(shutdown.clone()));

    let crun = match (&opts.crun_images, &opts.crun_enter, &opts.crun_shim, &opts.crun_state) {
        (Some(images), Some(enter), Some(shim), Some(state)) => {
            let crun = Crun::new(CrunConfig {
                enter: enter.clone(),
                shim: shim.clone(),
                state_dir: state.clone(),
                images_dir: images.clone(),
                cgroup_parent: format!("kube-migrate-{}", opts.node_name),
            });
            crun.clean_up().await;
            tracing::info!(images = %images.display(), state = %state.display(), "kube-migrate.test/* images run with crun");
            Some(crun)
        }
        _ => None,
    };
    let pods = Arc::new(
        PodManager::new(client, opts.node_name.clone(), runtime, puller, crun)
            .with_checkpoint_dir(opts.checkpoint_dir.clone())
            .with_cgroup_root(opts.cgroup_root.clone()),
    );
    pods.run(shutdown.clone()).await;
    let _ = server.await;
    Ok(())
}
