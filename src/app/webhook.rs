//! `kube-migrate-webhook`: both admission webhooks on every replica, plus the controller on
//! the replica that holds the Lease.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use futures::StreamExt;
use k8s_openapi::api::{
    coordination::v1::Lease,
    core::v1::{Node, Pod},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, ResourceExt,
    runtime::{
        WatchStreamExt,
        reflector::{self, Store},
        watcher,
    },
};
use tokio_util::sync::CancellationToken;

use crate::{
    admission::server::{WebhookState, router},
    agent::client::AgentClient,
    api::PodMigration,
    controller::{self, Context, leader::LeaderElector},
    metrics::Metrics,
    server::{Health, admin_router, serve_admin, serve_tls},
    telemetry::LogFormat,
    tls::{CertReloader, agent_client_config, server_config},
};

#[derive(clap::Parser, Debug)]
#[command(
    name = "kube-migrate-webhook",
    version,
    about = "kube-migrate admission webhooks and migration controller"
)]
pub struct Options {
    /// HTTPS address of the admission webhooks.
    #[arg(long, env = "KM_LISTEN", default_value = "0.0.0.0:8443")]
    pub listen: SocketAddr,
    /// Plain-HTTP address of /metrics, /livez and /readyz.
    #[arg(long, env = "KM_ADMIN_LISTEN", default_value = "0.0.0.0:8080")]
    pub admin_listen: SocketAddr,
    /// Certificate (PEM) served to the API server and presented to agents; reloaded on change.
    #[arg(long, env = "KM_TLS_CERT", default_value = "/etc/kube-migrate/tls/tls.crt")]
    pub tls_cert: PathBuf,
    #[arg(long, env = "KM_TLS_KEY", default_value = "/etc/kube-migrate/tls/tls.key")]
    pub tls_key: PathBuf,
    /// CA that signed the agents' certificates.
    #[arg(long, env = "KM_CA", default_value = "/etc/kube-migrate/tls/ca.crt")]
    pub ca: PathBuf,
    /// Require the API server to authenticate to the webhooks with a client certificate from
    /// this CA (its AdmissionConfiguration's kubeConfigFile; README "Webhook trust"). Unset:
    /// any client may connect (the API server does not authenticate by default).
    #[arg(long, env = "KM_CLIENT_CA")]
    pub client_ca: Option<PathBuf>,
    /// With `--client-ca`: names (CN or DNS SAN) accepted in that client certificate,
    /// comma-separated; empty: any certificate of the CA.
    #[arg(long = "client-name", env = "KM_CLIENT_NAMES", value_delimiter = ',')]
    pub client_names: Vec<String>,
    /// Name the agents' certificates carry (they are dialled by IP).
    #[arg(long, env = "KM_AGENT_SERVER_NAME", default_value = "kube-migrate-agent")]
    pub agent_server_name: String,
    /// Namespace of the Lease and of the agent Service's EndpointSlices.
    #[arg(long, env = "KM_NAMESPACE", default_value = "kube-migrate")]
    pub namespace: String,
    /// Service whose EndpointSlices list the agents (port named `api`).
    #[arg(long, env = "KM_AGENT_SERVICE", default_value = "kube-migrate-agent")]
    pub agent_service: String,
    /// The agent DaemonSet (in `--namespace`), whose image runs the restore init container of
    /// replacements with emptyDir volumes.
    #[arg(long, env = "KM_AGENT_DAEMONSET", default_value = "kube-migrate-agent")]
    pub agent_daemonset: String,
    /// Image of that init container, instead of the agent DaemonSet's.
    #[arg(long, env = "KM_RESTORE_HELPER_IMAGE")]
    pub restore_helper_image: Option<String>,
    /// Dial agents at this host instead of their EndpointSlice address (local test clusters,
    /// where agents listen on loopback, which EndpointSlices may not hold).
    #[arg(long, env = "KM_AGENT_ADDRESS_OVERRIDE")]
    pub agent_address_override: Option<String>,
    /// Identity in the leader Lease (the pod name).
    #[arg(long, env = "POD_NAME", default_value = "kube-migrate-webhook")]
    pub identity: String,
    #[arg(long, env = "KM_LEASE_NAME", default_value = "kube-migrate-controller")]
    pub lease_name: String,
    /// Run only the webhooks, never the controller.
    #[arg(long, env = "KM_WEBHOOK_ONLY")]
    pub webhook_only: bool,
    /// After SIGTERM, keep answering admission reviews this long (not Ready meanwhile): the
    /// API server may still call this replica until its endpoint is removed, and a drain
    /// that evicts a replica must not get `EOF` for the eviction it sends at the same moment.
    #[arg(long, env = "KM_SHUTDOWN_DELAY_SECONDS", default_value_t = 5)]
    pub shutdown_delay_seconds: u64,
    /// Hold an eviction open up to this long while its migration is about to make the state
    /// safe, instead of answering 429 at once (kubectl drain then waits 5 s per retry). Cut to
    /// 2 s less than the API server's webhook deadline, which it sends with each request
    /// (the eviction webhook's `timeoutSeconds`: 15 in the manifests). 0: never hold.
    #[arg(long, env = "KM_EVICTION_HOLD_SECONDS", default_value_t = 10)]
    pub eviction_hold_seconds: u64,
    /// Evictions held at once by this replica (each holds an API server request slot).
    #[arg(long, env = "KM_EVICTION_HOLD_MAX", default_value_t = 64)]
    pub eviction_hold_max: usize,
    /// Active migrations per source node.
    #[arg(long, env = "KM_MAX_PER_NODE", default_value_t = 8)]
    pub max_per_node: usize,
    /// Active migrations in the cluster.
    #[arg(long, env = "KM_MAX_TOTAL", default_value_t = 10)]
    pub max_total: usize,
    #[arg(long, env = "KM_CHECKPOINT_TIMEOUT_SECONDS", default_value_t = 300)]
    pub checkpoint_timeout_seconds: u64,
    /// Grace period of the source pod's eviction after its checkpoint.
    #[arg(long, env = "KM_SOURCE_GRACE_PERIOD_SECONDS", default_value_t = 1)]
    pub source_grace_period_seconds: i64,
    /// Freeze the source before its checkpoint and keep it frozen until its state is verified
    /// on the target, so that it never runs after its checkpoint and can resume on any failure
    /// (needs the node's runtime wrapper on CRI-O: docs/install-cri-o.md; where the agent
    /// cannot keep the freeze, the source is stopped right after the checkpoint as before).
    #[arg(long, env = "KM_FREEZE_SOURCE", default_value_t = true, action = clap::ArgAction::Set)]
    pub freeze_source: bool,
    /// How long to retry after the source stopped before the replacement starts fresh.
    #[arg(long, env = "KM_RESTORE_DEADLINE_SECONDS", default_value_t = 600)]
    pub restore_deadline_seconds: u64,
    #[command(flatten)]
    pub deadlines: DeadlineArgs,
    #[command(flatten)]
    pub signer: SignerArgs,
    #[command(flatten)]
    pub transfer: TransferArgs,
    #[arg(long, env = "KM_LOG_FORMAT", value_enum, default_value = "json")]
    pub log_format: LogFormat,
}

/// The signer of per-node agent certificates (agents with `--identity csr`).
#[derive(clap::Args, Debug, Clone)]
pub struct SignerArgs {
    /// The agent issuer (an intermediate CA under the kube-migrate CA, from
    /// `certs/install.sh`); when absent, no agent certificate is signed.
    #[arg(
        long,
        env = "KM_AGENT_ISSUER_CERT",
        default_value = "/etc/kube-migrate/agent-issuer/tls.crt"
    )]
    pub agent_issuer_cert: PathBuf,
    #[arg(
        long,
        env = "KM_AGENT_ISSUER_KEY",
        default_value = "/etc/kube-migrate/agent-issuer/tls.key"
    )]
    pub agent_issuer_key: PathBuf,
    /// The agents' ServiceAccount (in `--namespace`): only it may get agent certificates.
    #[arg(long, env = "KM_AGENT_SERVICE_ACCOUNT", default_value = "kube-migrate-agent")]
    pub agent_service_account: String,
    /// Extra SANs of every agent certificate (DNS names or IPs), comma-separated.
    #[arg(long = "agent-extra-san", env = "KM_AGENT_EXTRA_SANS", value_delimiter = ',')]
    pub agent_extra_sans: Vec<String>,
}

impl SignerArgs {
    fn config(&self, namespace: &str, agent_name: &str) -> Option<controller::signer::SignerConfig> {
        if !self.agent_issuer_key.exists() {
            tracing::warn!(
                issuer = %self.agent_issuer_key.display(),
                "no agent issuer: agent certificate requests are not signed (agents with --identity files need none)"
            );
            return None;
        }
        Some(controller::signer::SignerConfig {
            issuer_cert: self.agent_issuer_cert.clone(),
            issuer_key: self.agent_issuer_key.clone(),
            agent_user: format!("system:serviceaccount:{namespace}:{}", self.agent_service_account),
            agent_name: agent_name.to_string(),
            namespace: namespace.to_string(),
            extra_sans: self.agent_extra_sans.clone(),
        })
    }
}

/// How archives travel between agents (docs/benchmarks.md "Slow links" has the figures).
#[derive(clap::Args, Debug, Clone)]
pub struct TransferArgs {
    /// Compress archives on the wire with zstd at this level (1-19; 0: off). Pays off when the
    /// link is slower than the source compresses and the target decompresses, on one core each.
    #[arg(long, env = "KM_TRANSFER_ZSTD_LEVEL", default_value_t = 0, value_parser = clap::value_parser!(i32).range(0..=19))]
    pub transfer_zstd_level: i32,
    /// At most this much per second on the wire per migration, as a quantity (`50Mi`, `1G`);
    /// unset: no limit.
    #[arg(long, env = "KM_TRANSFER_BANDWIDTH", value_parser = bandwidth)]
    pub transfer_bandwidth: Option<u64>,
}

fn bandwidth(s: &str) -> Result<u64, String> {
    match controller::quantity::parse_quantity(s) {
        Some(q) if q >= 1.0 => Ok(q as u64),
        _ => Err(format!("{s:?} is not a bandwidth in bytes per second (e.g. 50Mi)")),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::Options;

    #[test]
    fn transfer_flags_parse_into_options() {
        let opts = Options::parse_from(["w"]);
        assert_eq!(opts.transfer.options(), Default::default());
        let opts = Options::parse_from(["w", "--transfer-zstd-level=3", "--transfer-bandwidth=50Mi"]);
        let t = opts.transfer.options();
        assert_eq!((t.zstd_level, t.bytes_per_second), (Some(3), Some(50 << 20)));
        assert!(Options::try_parse_from(["w", "--transfer-bandwidth=fast"]).is_err());
        assert!(Options::try_parse_from(["w", "--transfer-zstd-level=20"]).is_err());
    }
}

impl TransferArgs {
    pub fn options(&self) -> crate::agent::api::TransferOptions {
        crate::agent::api::TransferOptions {
            zstd_level: (self.transfer_zstd_level > 0).then_some(self.transfer_zstd_level),
            bytes_per_second: self.transfer_bandwidth,
        }
    }
}

/// Upper bound of each phase (README "Deadlines" says why these defaults).
#[derive(clap::Args, Debug, Clone)]
pub struct DeadlineArgs {
    /// Waiting for a slot, a PodDisruptionBudget or a target.
    #[arg(long, env = "KM_PENDING_DEADLINE_SECONDS", default_value_t = 1800)]
    pub pending_deadline_seconds: u64,
    /// Checkpoint through the kubelet and stop of the source.
    #[arg(long, env = "KM_CHECKPOINT_DEADLINE_SECONDS", default_value_t = 360)]
    pub checkpoint_deadline_seconds: u64,
    /// Archive transfer and verification on the target.
    #[arg(long, env = "KM_TRANSFER_DEADLINE_SECONDS", default_value_t = 900)]
    pub transfer_deadline_seconds: u64,
    /// Checkpoint image build on the target.
    #[arg(long, env = "KM_IMAGE_DEADLINE_SECONDS", default_value_t = 300)]
    pub image_deadline_seconds: u64,
    /// Replacement created, scheduled, restored and Ready.
    #[arg(long, env = "KM_RESTORING_DEADLINE_SECONDS", default_value_t = 300)]
    pub restoring_deadline_seconds: u64,
}

impl DeadlineArgs {
    pub fn deadlines(&self) -> controller::decide::Deadlines {
        controller::decide::Deadlines {
            pending: Duration::from_secs(self.pending_deadline_seconds),
            checkpointing: Duration::from_secs(self.checkpoint_deadline_seconds),
            transferring: Duration::from_secs(self.transfer_deadline_seconds),
            building_image: Duration::from_secs(self.image_deadline_seconds),
            restoring: Duration::from_secs(self.restoring_deadline_seconds),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("Kubernetes client: {0}")]
    Kube(#[from] kube::Error),
    #[error("the API server's SelfSubjectReview named no user")]
    NoIdentity,
    #[error("TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("listening on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
}

/// A reflector store fed by a watch; managedFields are dropped to keep the cache small.
fn cache<K>(api: Api<K>, config: watcher::Config, shutdown: &CancellationToken) -> Store<K>
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    cache_notifying(api, config, shutdown, None)
}

/// [`cache`], signalling `changed` after each object it stored.
fn cache_notifying<K>(
    api: Api<K>,
    config: watcher::Config,
    shutdown: &CancellationToken,
    changed: Option<tokio::sync::watch::Sender<()>>,
) -> Store<K>
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    let (store, writer) = reflector::store();
    let stream = watcher(api, config)
        .default_backoff()
        .modify(|o: &mut K| o.managed_fields_mut().clear())
        .reflect(writer)
        .applied_objects()
        .for_each(move |_| {
            if let Some(changed) = &changed {
                changed.send_replace(());
            }
            futures::future::ready(())
        });
    let shutdown = shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = stream => {}
            _ = shutdown.cancelled() => {}
        }
    });
    store
}

/// This process's username as the API server authenticates it (a SelfSubjectReview, allowed
/// to every authenticated user): the controller's own evictions come from it.
async fn whoami(client: &Client) -> Result<String, RunError> {
    use k8s_openapi::api::authentication::v1::SelfSubjectReview;
    let review = Api::<SelfSubjectReview>::all(client.clone())
        .create(&Default::default(), &SelfSubjectReview::default())
        .await?;
    review
        .status
        .and_then(|s| s.user_info)
        .and_then(|u| u.username)
        .ok_or(RunError::NoIdentity)
}

pub async fn run(opts: Options, shutdown: CancellationToken) -> Result<(), RunError> {
    let client = Client::try_default().await?;
    let metrics = Arc::new(Metrics::new());
    let health = Health::default();

    let certs = CertReloader::new(&opts.tls_cert, &opts.tls_key)?;
    certs.spawn_poll(Duration::from_secs(10));
    // Read once: a new client CA takes a restart (the serving certificate reloads by itself).
    let tls = server_config(Arc::clone(&certs), opts.client_ca.as_deref())?;
    let agent_tls = agent_client_config(&opts.ca, Arc::clone(&certs), &opts.agent_server_name)?;

    // The caches live as long as admission is answered (`serving`, which ends after the
    // shutdown delay), not only until SIGTERM: a replica that keeps answering with caches frozen
    // at SIGTERM lets a replacement created meanwhile through ungated (met on real nodes: the
    // drain evicted this replica just as its eviction started a migration, and the
    // ReplicaSet's replacement started from scratch).
    let serving = CancellationToken::new();
    let pods = cache(
        Api::<Pod>::all(client.clone()),
        watcher::Config::default().any_semantic(),
        &serving,
    );
    let nodes = cache(
        Api::<Node>::all(client.clone()),
        watcher::Config::default().any_semantic(),
        &serving,
    );
    let (migrations_changed, on_migration) = tokio::sync::watch::channel(());
    let migrations = cache_notifying(
        Api::<PodMigration>::all(client.clone()),
        watcher::Config::default().any_semantic(),
        &serving,
        Some(migrations_changed),
    );
    let namespaces = cache(
        Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone()),
        watcher::Config::default().any_semantic(),
        &serving,
    );
    let agents = cache(
        Api::<EndpointSlice>::namespaced(client.clone(), &opts.namespace),
        watcher::Config::default().labels(&format!("kubernetes.io/service-name={}", opts.agent_service)),
        &serving,
    );
    let helper_image = crate::replacement::HelperImage {
        fixed: opts.restore_helper_image.clone(),
        daemonsets: Some(cache(
            Api::<k8s_openapi::api::apps::v1::DaemonSet>::namespaced(client.clone(), &opts.namespace),
            watcher::Config::default().fields(&format!("metadata.name={}", opts.agent_daemonset)),
            &serving,
        )),
    };

    let admin = serve_admin(
        opts.admin_listen,
        admin_router(Arc::clone(&metrics), health.clone()),
        shutdown.clone(),
    );
    let controller_user = whoami(&client).await?;
    tracing::info!(user = %controller_user, "own identity (evictions marked as stopping a source are honoured only from it)");
    let state = Arc::new(WebhookState {
        controller_user,
        client: client.clone(),
        pods: pods.clone(),
        nodes: nodes.clone(),
        migrations: migrations.clone(),
        metrics: Arc::clone(&metrics),
        namespaces: namespaces.clone(),
        helper_image: helper_image.clone(),
        holds: crate::admission::hold::Holds::new(
            Duration::from_secs(opts.eviction_hold_seconds),
            opts.eviction_hold_max,
            on_migration,
        ),
    });
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .map_err(|source| RunError::Listen {
            addr: opts.listen,
            source,
        })?;
    tracing::info!(addr = %opts.listen, "admission webhooks listening");
    {
        let (shutdown, serving, health) = (shutdown.clone(), serving.clone(), health.clone());
        let delay = Duration::from_secs(opts.shutdown_delay_seconds);
        tokio::spawn(async move {
            shutdown.cancelled().await;
            health.set_ready(false);
            tracing::info!(
                seconds = delay.as_secs(),
                "still answering admission reviews before stopping"
            );
            tokio::time::sleep(delay).await;
            serving.cancel();
        });
    }
    let mut admission = router(state);
    if opts.client_ca.is_some() && !opts.client_names.is_empty() {
        admission = crate::server::require_peer_names(admission, opts.client_names.clone());
    }
    let webhooks = serve_tls(listener, tls, admission, serving);

    // Ready once every cache has its first full list: answers before that would be guesses.
    let readiness = {
        let (pods, nodes, migrations, namespaces, health) = (
            pods.clone(),
            nodes.clone(),
            migrations.clone(),
            namespaces.clone(),
            health.clone(),
        );
        async move {
            let _ = tokio::join!(
                pods.wait_until_ready(),
                nodes.wait_until_ready(),
                migrations.wait_until_ready(),
                namespaces.wait_until_ready()
            );
            tracing::info!("caches synced; ready");
            health.set_ready(true);
        }
    };

    let controller = {
        let config = controller::Config {
            max_per_node: opts.max_per_node,
            max_total: opts.max_total,
            checkpoint_timeout: Duration::from_secs(opts.checkpoint_timeout_seconds),
            source_grace_period_seconds: opts.source_grace_period_seconds,
            freeze_source: opts.freeze_source,
            max_attempts: 3,
            restore_deadline: Duration::from_secs(opts.restore_deadline_seconds),
            deadlines: opts.deadlines.deadlines(),
            agent_address_override: opts.agent_address_override.clone(),
            pull_key_file: Some(opts.tls_key.clone()),
            transfer: opts.transfer.options(),
        };
        let agent_client = AgentClient::new(agent_tls, config.checkpoint_timeout + Duration::from_secs(60));
        let recorder = Arc::new(controller::events::Recorder::new(
            client.clone(),
            "kube-migrate",
            opts.identity.clone(),
        ));
        let elector = LeaderElector::new(
            Api::<Lease>::namespaced(client.clone(), &opts.namespace),
            opts.lease_name.clone(),
            opts.identity.clone(),
            Duration::from_secs(15),
        );
        let webhook_only = opts.webhook_only;
        let signer = opts.signer.config(&opts.namespace, &opts.agent_server_name);
        let metrics = Arc::clone(&metrics);
        let shutdown = shutdown.clone();
        async move {
            if webhook_only {
                return;
            }
            elector
                .run(shutdown, move |token| {
                    let (client, pods, nodes, agents) = (client.clone(), pods.clone(), nodes.clone(), agents.clone());
                    let labeller = crate::admission::namespaces::keep_labelled(
                        client.clone(),
                        pods.clone(),
                        namespaces.clone(),
                        token.clone(),
                    );
                    let signing = {
                        let (client, token) = (client.clone(), token.clone());
                        let signer = signer.clone();
                        async move {
                            if let Some(cfg) = signer {
                                controller::signer::run(client, cfg, token).await;
                            }
                        }
                    };
                    let (agent_client, recorder, metrics, config, helper_image) = (
                        agent_client.clone(),
                        Arc::clone(&recorder),
                        Arc::clone(&metrics),
                        config.clone(),
                        helper_image.clone(),
                    );
                    async move {
                        let for_ctx = client.clone();
                        let shared = move |migrations| {
                            Arc::new(Context {
                                client: for_ctx,
                                pods,
                                nodes,
                                agents,
                                migrations,
                                agent_client,
                                recorder,
                                metrics,
                                config,
                                helper_image,
                                drains_recorded: Default::default(),
                                slots: Default::default(),
                                progress_writes: Default::default(),
                            })
                        };
                        tokio::join!(controller::run(client, shared, token), labeller, signing);
                    }
                })
                .await;
        }
    };

    let (admin, _, _, _) = tokio::join!(admin, webhooks, readiness, controller);
    admin.map_err(|source| RunError::Listen {
        addr: opts.admin_listen,
        source,
    })
}
