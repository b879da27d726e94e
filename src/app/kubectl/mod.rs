//! `kubectl-migrate` (a kubectl plugin: `kubectl migrate ...`).

use std::collections::BTreeMap;

use k8s_openapi::api::{
    core::v1::{Node, Pod},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, ResourceExt,
    api::{ListParams, ObjectMeta, PostParams},
};

mod bars;
mod drain;
mod follow;

use drain::drain;
use follow::follow;

use crate::{
    api::{self, MigrationPolicy, Mode, OnFailure, Phase, PodMigration, PodMigrationSpec, Trigger},
    controller::agents,
    plugin::{self, PluginError},
};

#[derive(clap::Parser, Debug)]
#[command(
    name = "kubectl-migrate",
    version,
    about = "Live-migrate stateful pods with kube-migrate"
)]
pub struct Options {
    /// Namespace (defaults to the kubeconfig context's).
    #[arg(short, long, global = true)]
    pub namespace: Option<String>,
    /// Namespace where kube-migrate runs (to find its agents).
    #[arg(long, global = true, default_value = "kube-migrate", env = "KM_NAMESPACE")]
    pub system_namespace: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Migrate one pod to another node and follow the migration until it is done.
    Pod {
        name: String,
        /// Target node; chosen like a drain migration when omitted.
        #[arg(long)]
        to: Option<String>,
        /// Create the migration and return at once.
        #[arg(long)]
        no_wait: bool,
        /// Give up following after this many seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// Show migrations (all in the namespace, or one in detail).
    Status {
        name: Option<String>,
        /// All namespaces.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
    },
    /// Checkpoint a pod as a backup; it keeps running.
    Checkpoint {
        #[command(subcommand)]
        what: CheckpointTarget,
    },
    /// List stored checkpoints.
    List,
    /// Start a new pod from a stored checkpoint.
    Restore {
        /// The checkpoint (as `kubectl migrate list` shows it).
        checkpoint: String,
        #[arg(long)]
        to: Option<String>,
        /// Name of the new pod (default: the checkpointed pod's name, which must be free).
        #[arg(long)]
        name: Option<String>,
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// Cordon a node and evict its pods, migrating the stateful ones, with a progress view.
    Drain {
        node: String,
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
}

#[derive(clap::Subcommand, Debug)]
pub enum CheckpointTarget {
    /// `kubectl migrate checkpoint pod NAME`
    Pod {
        name: String,
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
}

pub async fn run(opts: Options) -> Result<(), PluginError> {
    // No transparent retries: a 429 from kube-migrate is progress to show, not to hide.
    let mut config = kube::Config::infer()
        .await
        .map_err(|e| PluginError::Config(e.to_string()))?;
    config.default_retry = false;
    let client = Client::try_from(config)?;
    let namespace = opts
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_string());
    match opts.command {
        Command::Pod {
            name,
            to,
            no_wait,
            timeout,
        } => {
            migrate_pod(
                &client,
                &namespace,
                &opts.system_namespace,
                &name,
                to.as_deref(),
                no_wait,
                timeout,
            )
            .await
        }
        Command::Status { name, all_namespaces } => status(&client, &namespace, name.as_deref(), all_namespaces).await,
        Command::Drain { node, timeout } => drain(&client, &node, timeout).await,
        Command::Checkpoint {
            what: CheckpointTarget::Pod { name, timeout },
        } => checkpoint(&client, &namespace, &name, timeout).await,
        Command::List => list(&client, &namespace).await,
        Command::Restore {
            checkpoint,
            to,
            name,
            timeout,
        } => {
            restore(
                &client,
                &namespace,
                &checkpoint,
                to.as_deref(),
                name.as_deref(),
                timeout,
            )
            .await
        }
    }
}

async fn migrate_pod(
    client: &Client,
    ns: &str,
    system_ns: &str,
    name: &str,
    to: Option<&str>,
    no_wait: bool,
    timeout: u64,
) -> Result<(), PluginError> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let pod = pods.get_opt(name).await?;
    plugin::check_pod(pod.as_ref(), ns, name)?;
    let pod = pod.expect("checked");

    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await?
        .items;
    let all_pods = Api::<Pod>::all(client.clone())
        .list(&ListParams::default())
        .await?
        .items;
    let slices = Api::<EndpointSlice>::namespaced(client.clone(), system_ns)
        .list(&ListParams::default().labels("kubernetes.io/service-name=kube-migrate-agent"))
        .await?
        .items;
    let node_refs: Vec<&Node> = nodes.iter().collect();
    let bound: Vec<&Pod> = all_pods
        .iter()
        .filter(|p| {
            !matches!(
                p.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            )
        })
        .collect();
    let has_agent = |node: &str| slices.iter().any(|s| agents::base_url(s, node).is_some());
    let target = plugin::check_target(&pod, to, &node_refs, &bound, &has_agent)?;

    let uid = pod.uid().unwrap_or_default();
    let pm_name = api::migration_name(name, &uid);
    let policy = match api::on_failure(&pod) {
        Ok(api::FailurePolicyAnnotation::Block) => OnFailure::Block,
        _ => OnFailure::Evict,
    };
    let pm = PodMigration {
        metadata: ObjectMeta {
            name: Some(pm_name.clone()),
            namespace: Some(ns.to_string()),
            labels: Some(BTreeMap::from([
                (api::POD_UID_LABEL.to_string(), uid.clone()),
                (
                    api::SOURCE_NODE_LABEL.to_string(),
                    pod.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_default(),
                ),
            ])),
            ..Default::default()
        },
        spec: PodMigrationSpec {
            pod_name: name.to_string(),
            pod_uid: uid,
            source_node: pod.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_default(),
            target_node: to.map(str::to_string),
            trigger: Trigger::Manual,
            policy: MigrationPolicy { on_failure: policy },
            mode: Mode::Migrate,
            restore_from: None,
        },
        status: None,
    };
    let pms: Api<PodMigration> = Api::namespaced(client.clone(), ns);
    match pms
        .create(
            &PostParams {
                field_manager: Some("kubectl-migrate".into()),
                ..Default::default()
            },
            &pm,
        )
        .await
    {
        Ok(_) => println!("podmigration.migrate.io/{pm_name} created: {ns}/{name} -> {target}"),
        Err(kube::Error::Api(e)) if e.code == 409 => {
            println!("podmigration.migrate.io/{pm_name} already exists; following it")
        }
        Err(e) => return Err(e.into()),
    }
    if no_wait {
        return Ok(());
    }
    follow(&pms, &pm_name, timeout).await
}

async fn status(client: &Client, ns: &str, name: Option<&str>, all: bool) -> Result<(), PluginError> {
    let pms: Api<PodMigration> = if all {
        Api::all(client.clone())
    } else {
        Api::namespaced(client.clone(), ns)
    };
    if let Some(name) = name {
        let pm = pms.get(name).await?;
        let s = pm.status.clone().unwrap_or_default();
        println!(
            "Name:       {}\nNamespace:  {}\nPod:        {} ({})",
            pm.name_any(),
            pm.namespace().unwrap_or_default(),
            pm.spec.pod_name,
            pm.spec.pod_uid
        );
        println!(
            "Trigger:    {:?}\nPhase:      {}\nSource:     {}\nTarget:     {}",
            pm.spec.trigger,
            s.phase,
            pm.spec.source_node,
            pm.target_node().unwrap_or("-")
        );
        if let Some(m) = &s.message {
            println!("Message:    {m}");
        }
        if let Some(d) = s.downtime_seconds {
            println!("Downtime:   {d:.3} s");
        }
        println!("Phases:");
        for t in &s.phases {
            println!(
                "  {:<14} {}",
                t.phase.as_str(),
                t.seconds
                    .map(|x| format!("{x:.3} s"))
                    .unwrap_or_else(|| "running".into())
            );
        }
        println!("Containers:");
        for c in &s.containers {
            println!(
                "  {:<14} {} {} {}",
                c.name,
                c.size_bytes
                    .map(crate::controller::decide::human_bytes)
                    .unwrap_or_else(|| "-".into()),
                c.digest.as_deref().unwrap_or("-"),
                c.image.as_deref().unwrap_or("")
            );
        }
        return Ok(());
    }
    let mut list = pms.list(&ListParams::default()).await?.items;
    list.sort_by_key(|m| m.metadata.creation_timestamp.clone());
    println!(
        "{:<16} {:<32} {:<24} {:<13} {:<10} {:<10} MESSAGE",
        "NAMESPACE", "NAME", "POD", "PHASE", "SOURCE", "TARGET"
    );
    for m in list {
        let s = m.status.clone().unwrap_or_default();
        println!(
            "{:<16} {:<32} {:<24} {:<13} {:<10} {:<10} {}",
            m.namespace().unwrap_or_default(),
            m.name_any(),
            m.spec.pod_name,
            s.phase.as_str(),
            m.spec.source_node,
            m.target_node().unwrap_or("-"),
            s.message.unwrap_or_default()
        );
    }
    Ok(())
}

fn create_params() -> PostParams {
    PostParams {
        field_manager: Some("kubectl-migrate".into()),
        ..Default::default()
    }
}

fn stamp() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y%m%d-%H%M%S")
        .to_string()
}

async fn checkpoint(client: &Client, ns: &str, name: &str, timeout: u64) -> Result<(), PluginError> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let pod = pods.get_opt(name).await?;
    plugin::check_pod(pod.as_ref(), ns, name)?;
    let pod = pod.expect("checked");
    let node = pod.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_default();
    let pm_name = format!("{}-ckpt-{}", name.chars().take(200).collect::<String>(), stamp());
    let pm = PodMigration {
        metadata: ObjectMeta {
            name: Some(pm_name.clone()),
            namespace: Some(ns.to_string()),
            ..Default::default()
        },
        spec: PodMigrationSpec {
            pod_name: name.to_string(),
            pod_uid: pod.uid().unwrap_or_default(),
            source_node: node.clone(),
            target_node: None,
            trigger: Trigger::Manual,
            policy: MigrationPolicy::default(),
            mode: Mode::Checkpoint,
            restore_from: None,
        },
        status: None,
    };
    let pms: Api<PodMigration> = Api::namespaced(client.clone(), ns);
    pms.create(&create_params(), &pm).await?;
    println!("podmigration.migrate.io/{pm_name} created: checkpoint of {ns}/{name} on {node} (the pod keeps running)");
    follow(&pms, &pm_name, timeout).await
}

async fn list(client: &Client, ns: &str) -> Result<(), PluginError> {
    let pms: Api<PodMigration> = Api::namespaced(client.clone(), ns);
    let mut stored: Vec<PodMigration> = pms
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|m| m.spec.mode == Mode::Checkpoint && m.phase() == Phase::Succeeded)
        .collect();
    stored.sort_by_key(|m| m.metadata.creation_timestamp.clone());
    println!(
        "{:<40} {:<24} {:<10} {:>10}  CREATED",
        "CHECKPOINT", "POD", "NODE", "SIZE"
    );
    for m in stored {
        let s = m.status.clone().unwrap_or_default();
        let size: u64 = s.containers.iter().filter_map(|c| c.size_bytes).sum();
        println!(
            "{:<40} {:<24} {:<10} {:>10}  {}",
            m.name_any(),
            m.spec.pod_name,
            m.target_node().unwrap_or("-"),
            crate::controller::decide::human_bytes(size),
            m.metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.to_string())
                .unwrap_or_default()
        );
    }
    Ok(())
}

async fn restore(
    client: &Client,
    ns: &str,
    checkpoint: &str,
    to: Option<&str>,
    name: Option<&str>,
    timeout: u64,
) -> Result<(), PluginError> {
    let pms: Api<PodMigration> = Api::namespaced(client.clone(), ns);
    let stored = pms
        .get_opt(checkpoint)
        .await?
        .filter(|m| m.spec.mode == Mode::Checkpoint);
    let Some(stored) = stored else {
        return Err(PluginError::NoTarget(format!(
            "no checkpoint named {checkpoint} in {ns} (see kubectl migrate list)"
        )));
    };
    if stored.phase() != Phase::Succeeded {
        return Err(PluginError::NoTarget(format!(
            "checkpoint {checkpoint} is {}, not stored",
            stored.phase()
        )));
    }
    let pod_name = name.unwrap_or(&stored.spec.pod_name).to_string();
    if Api::<Pod>::namespaced(client.clone(), ns)
        .get_opt(&pod_name)
        .await?
        .is_some()
    {
        return Err(PluginError::TargetUnfit {
            node: to.unwrap_or("-").to_string(),
            reason: format!("pod {ns}/{pod_name} already exists; choose another name with --name"),
        });
    }
    let pm_name = format!(
        "{}-restore-{}",
        checkpoint.chars().take(200).collect::<String>(),
        stamp()
    );
    let pm = PodMigration {
        metadata: ObjectMeta {
            name: Some(pm_name.clone()),
            namespace: Some(ns.to_string()),
            ..Default::default()
        },
        spec: PodMigrationSpec {
            pod_name,
            pod_uid: String::new(),
            source_node: stored.target_node().unwrap_or(&stored.spec.source_node).to_string(),
            target_node: to.map(str::to_string),
            trigger: Trigger::Manual,
            policy: MigrationPolicy::default(),
            mode: Mode::Restore,
            restore_from: Some(checkpoint.to_string()),
        },
        status: None,
    };
    pms.create(&create_params(), &pm).await?;
    println!("podmigration.migrate.io/{pm_name} created: restore of {checkpoint}");
    follow(&pms, &pm_name, timeout).await
}
