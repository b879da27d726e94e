//! Helpers for the end-to-end scenarios: kubectl as a user runs it, a kube client for
//! assertions, and polling with deadlines.

use std::{future::Future, path::PathBuf, process::Command, time::Duration};

use anyhow::{Context, bail};
use kube::{Api, ResourceExt, api::ListParams};
use kube_migrate::api::{Phase, PodMigration};

/// The local cluster's kube-migrate directory (certificates, node state, logs).
pub fn km_dir() -> PathBuf {
    PathBuf::from(std::env::var("KUBE_MIGRATE_CLUSTER_DIR").unwrap_or_else(|_| "/tmp/kube-migrate-cluster".into()))
        .join("km")
}

/// A field of the controller's leader Lease, by JSONPath (`.spec.holderIdentity`).
pub fn controller_lease(path: &str) -> String {
    must(&[
        "get",
        "lease",
        "-n",
        "kube-migrate",
        "kube-migrate-controller",
        "-o",
        &format!("jsonpath={{{path}}}"),
    ])
}

/// Output of one kubectl run.
#[derive(Debug)]
pub struct Run {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn all(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
}

/// Run kubectl (KUBECONFIG from the environment) and capture everything.
pub fn kubectl(args: &[&str]) -> Run {
    let out = Command::new("kubectl").args(args).output().expect("kubectl runs");
    Run {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// kubectl that must succeed.
pub fn must(args: &[&str]) -> String {
    let run = kubectl(args);
    assert!(run.ok, "kubectl {} failed:\n{}", args.join(" "), run.all());
    run.stdout
}

/// `kubectl apply -f -` with a manifest.
pub fn apply(manifest: &str) {
    use std::io::Write;
    let mut child = Command::new("kubectl")
        .args(["apply", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("kubectl runs");
    child.stdin.take().unwrap().write_all(manifest.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "kubectl apply failed: {}\n{manifest}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Poll `probe` every 500 ms until it returns Some, or fail after `timeout` with `what`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last_error = None;
    loop {
        match probe().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_error = Some(e),
        }
        if tokio::time::Instant::now() > deadline {
            match last_error {
                Some(e) => return Err(e).context(format!("timed out waiting for {what}")),
                None => bail!("timed out after {timeout:?} waiting for {what}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Wait until exactly `n` PodMigrations of `ns` accepted by `keep` are `Succeeded`; fail at
/// once, with its message, if one of them is `Failed`.
pub async fn migrations_succeeded(
    ns: &str,
    n: usize,
    timeout: Duration,
    keep: impl Fn(&PodMigration) -> bool,
) -> anyhow::Result<Vec<PodMigration>> {
    let pms: Api<PodMigration> = Api::namespaced(client().await, ns);
    let keep = &keep;
    eventually(&format!("{n} PodMigrations Succeeded"), timeout, || {
        let pms = pms.clone();
        async move {
            let list: Vec<PodMigration> = pms
                .list(&ListParams::default())
                .await?
                .items
                .into_iter()
                .filter(keep)
                .collect();
            if let Some(failed) = list.iter().find(|m| m.phase() == Phase::Failed) {
                bail!(
                    "{} failed: {:?}",
                    failed.name_any(),
                    failed.status.as_ref().and_then(|s| s.message.clone())
                );
            }
            Ok((list.len() == n && list.iter().all(|m| m.phase() == Phase::Succeeded)).then_some(list))
        }
    })
    .await
}

pub async fn client() -> kube::Client {
    kube_migrate::tls::install_crypto_provider();
    kube::Client::try_default()
        .await
        .expect("KUBECONFIG points at the local cluster (scripts/e2e.sh)")
}

/// The first log line of a container (the test kubelet says there how it started).
pub fn first_log_line(ns: &str, pod: &str, container: &str) -> Option<String> {
    let run = kubectl(&["logs", "-n", ns, pod, "-c", container]);
    run.ok.then(|| run.stdout.lines().next().map(str::to_string)).flatten()
}

/// Value of `key=<value>` in a log line.
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace().find_map(|w| w.strip_prefix(&format!("{key}=")))
}

/// A fresh namespace (deleted first if a previous run left it).
pub fn fresh_namespace(ns: &str) {
    let _ = kubectl(&["delete", "namespace", ns, "--wait=true", "--timeout=60s"]);
    must(&["create", "namespace", ns]);
}

/// Wait until exactly `n` pods of `ns` run (terminating ones do not count).
pub async fn running_pods_in(ns: &str, n: usize) -> anyhow::Result<Vec<k8s_openapi::api::core::v1::Pod>> {
    use k8s_openapi::api::core::v1::Pod;
    let pods: Api<Pod> = Api::namespaced(client().await, ns);
    eventually(
        &format!("{n} running pods in {ns}"),
        std::time::Duration::from_secs(90),
        || {
            let pods = pods.clone();
            async move {
                let running: Vec<Pod> = pods
                    .list(&ListParams::default())
                    .await?
                    .items
                    .into_iter()
                    .filter(|p| p.metadata.deletion_timestamp.is_none())
                    .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
                    .collect();
                Ok((running.len() == n).then_some(running))
            }
        },
    )
    .await
}

/// The node a pod is bound to.
pub fn node_of(p: &k8s_openapi::api::core::v1::Pod) -> String {
    p.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_default()
}

/// `scripts/local-cluster.sh ARGS...` (kill-webhook, power-off NODE, ...), which must succeed.
pub fn local_cluster(args: &[&str]) {
    local_cluster_with(args, &[]);
}

/// [`local_cluster`] with environment variables (a controller started with other flags).
pub fn local_cluster_with(args: &[&str], env: &[(&str, &str)]) {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let out = Command::new(format!("{root}/scripts/local-cluster.sh"))
        .args(args)
        .envs(env.iter().copied())
        .current_dir(root)
        .output()
        .expect("local-cluster.sh runs");
    assert!(
        out.status.success(),
        "local-cluster.sh {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Everything of `manifest` starts on node-a (node-b and node-c cordoned meanwhile).
pub async fn start_on_node_a(
    ns: &str,
    manifest: &str,
    pods: usize,
) -> anyhow::Result<Vec<k8s_openapi::api::core::v1::Pod>> {
    // A failed scenario before may have left node-a cordoned by its drain.
    must(&["uncordon", "node-a"]);
    must(&["cordon", "node-b"]);
    must(&["cordon", "node-c"]);
    apply(manifest);
    let running = running_pods_in(ns, pods).await;
    must(&["uncordon", "node-b"]);
    must(&["uncordon", "node-c"]);
    let running = running?;
    assert!(
        running.iter().all(|p| node_of(p) == "node-a"),
        "all pods start on node-a"
    );
    Ok(running)
}

/// `kubectl drain node-a` limited to the pods matching `selector`, output printed.
pub fn drain_a(selector: &str) -> Run {
    drain_a_within(selector, "300s")
}

/// [`drain_a`] with kubectl's own `--timeout`.
pub fn drain_a_within(selector: &str, timeout: &str) -> Run {
    let drain = kubectl(&[
        "drain",
        "node-a",
        "--ignore-daemonsets",
        "--delete-emptydir-data",
        "--force",
        &format!("--timeout={timeout}"),
        "--pod-selector",
        selector,
    ]);
    println!("---- kubectl drain ({selector}) ----\n{}", drain.all());
    drain
}

/// The kubectl plugin, as an operator runs it (`kubectl migrate ...` finds `kubectl-migrate`
/// on PATH; scripts/e2e.sh puts the built binary there).
pub fn plugin(args: &[&str]) -> Run {
    let mut all = vec!["migrate"];
    all.extend_from_slice(args);
    kubectl(&all)
}

/// A one-replica opted-in Deployment of the simulated counter holding `state_bytes` of memory,
/// labelled `app: NAME` and `e2e: LABEL`; `annotations` are extra pod annotations (`k: v, ...`).
pub fn opted_in_deployment(ns: &str, name: &str, label: &str, state_bytes: u64, annotations: &str) -> String {
    let extra = if annotations.is_empty() {
        String::new()
    } else {
        format!(", {annotations}")
    };
    format!(
        r#"
apiVersion: apps/v1
kind: Deployment
metadata: {{ name: {name}, namespace: {ns} }}
spec:
  replicas: 1
  selector: {{ matchLabels: {{ app: {name} }} }}
  template:
    metadata: {{ labels: {{ app: {name}, e2e: {label} }}, annotations: {{ migrate.io/stateful: "true"{extra} }} }}
    spec:
      terminationGracePeriodSeconds: 1
      containers: [{{ name: app, image: registry.local/counter:1, env: [{{ name: STATE_BYTES, value: "{state_bytes}" }}] }}]
"#
    )
}

/// An opted-in bare pod of the simulated counter (`node`: bound there directly, bypassing the
/// scheduler), labelled `e2e: LABEL`.
pub fn opted_in_pod(ns: &str, name: &str, label: &str, state_bytes: u64, node: Option<&str>) -> String {
    let node = node.map(|n| format!("\n  nodeName: {n}")).unwrap_or_default();
    format!(
        r#"---
apiVersion: v1
kind: Pod
metadata: {{ name: {name}, namespace: {ns}, labels: {{ e2e: {label} }}, annotations: {{ migrate.io/stateful: "true" }} }}
spec:{node}
  terminationGracePeriodSeconds: 1
  containers: [{{ name: app, image: registry.local/counter:1, env: [{{ name: STATE_BYTES, value: "{state_bytes}" }}] }}]
"#
    )
}

/// The value of the first sample of `url`'s Prometheus text whose line starts with `prefix`
/// (0 when there is none: a counter not yet incremented).
pub fn scrape(url: &str, prefix: &str) -> f64 {
    let out = Command::new("curl").args(["-sf", url]).output().expect("curl runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}
