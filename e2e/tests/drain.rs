//! End-to-end: real kube-apiserver, etcd, controller-manager, scheduler, test kubelets,
//! kube-migrate's agents and webhook as local processes, and `kubectl drain` itself.
//! Run by `scripts/e2e.sh` (which brings the cluster up and down): these tests are ignored
//! by a plain `cargo test` because they need that cluster.

use std::time::Duration;

use kube::{Api, ResourceExt, api::ListParams};
use kube_migrate::api::{Phase, PodMigration};
use kube_migrate_e2e::{
    apply, client, eventually, field, first_log_line, fresh_namespace, km_dir, kubectl, local_cluster,
    migrations_succeeded, must, node_of, plugin, running_pods_in,
};

/// HTTP status of an anonymous (or `user:password`) manifest request for `image` at the
/// registry it names, as any local process could make it.
fn registry_status(image: &str, credential: Option<&str>) -> u16 {
    let (host, rest) = image.split_once('/').expect("host/repository:tag");
    let (repository, tag) = rest.rsplit_once(':').expect("a tag");
    let ca = km_dir().join("certs/ca.crt").display().to_string();
    let url = format!("https://{host}/v2/{repository}/manifests/{tag}");
    let mut curl = std::process::Command::new("curl");
    curl.args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert", &ca, &url]);
    if let Some(c) = credential {
        curl.args(["-u", c]);
    }
    let out = curl.output().expect("curl runs");
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0)
}

/// `user:password` from a dockerconfigjson pull Secret.
fn pull_password(ns: &str, secret: &str) -> String {
    let run = kubectl(&[
        "get",
        "secret",
        "-n",
        ns,
        secret,
        "-o",
        "jsonpath={.data.\\.dockerconfigjson}",
    ]);
    assert!(run.ok, "pull Secret {secret}: {}", run.all());
    let config = base64_decode(run.stdout.trim());
    let config: serde_json::Value = serde_json::from_slice(&config).unwrap();
    let auth = config["auths"].as_object().unwrap().values().next().unwrap()["auth"]
        .as_str()
        .unwrap()
        .to_string();
    String::from_utf8(base64_decode(&auth)).unwrap()
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).expect("base64")
}

/// The memory checksum and counter a container started with, from its first log line.
fn start_line(ns: &str, pod: &str, container: &str) -> Option<String> {
    first_log_line(ns, pod, container)
}

const WORKLOADS: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: { name: counter, namespace: e2e-drain }
spec:
  replicas: 1
  selector: { matchLabels: { app: counter } }
  template:
    metadata: { labels: { app: counter }, annotations: { migrate.io/stateful: "true" } }
    spec:
      terminationGracePeriodSeconds: 5
      containers: [{ name: app, image: registry.local/counter:1, env: [{ name: STATE_BYTES, value: "1048576" }] }]
---
apiVersion: v1
kind: Service
metadata: { name: db, namespace: e2e-drain }
spec: { clusterIP: None, selector: { app: db }, ports: [{ port: 5432 }] }
---
apiVersion: apps/v1
kind: StatefulSet
metadata: { name: db, namespace: e2e-drain }
spec:
  serviceName: db
  replicas: 1
  selector: { matchLabels: { app: db } }
  template:
    metadata: { labels: { app: db }, annotations: { migrate.io/stateful: "true" } }
    spec:
      terminationGracePeriodSeconds: 5
      containers: [{ name: app, image: registry.local/db:1, env: [{ name: STATE_BYTES, value: "2097152" }] }]
---
apiVersion: v1
kind: Pod
metadata: { name: solo, namespace: e2e-drain, labels: { app: solo }, annotations: { migrate.io/stateful: "true" } }
spec:
  terminationGracePeriodSeconds: 5
  containers: [{ name: app, image: registry.local/counter:1, env: [{ name: STATE_BYTES, value: "65536" }] }]
---
apiVersion: v1
kind: Pod
metadata: { name: duo, namespace: e2e-drain, labels: { app: duo }, annotations: { migrate.io/stateful: "true" } }
spec:
  terminationGracePeriodSeconds: 5
  containers:
    - { name: app, image: registry.local/counter:1, env: [{ name: STATE_BYTES, value: "131072" }] }
    - { name: sidecar, image: registry.local/logger:2, env: [{ name: STATE_BYTES, value: "4096" }] }
---
apiVersion: apps/v1
kind: Deployment
metadata: { name: web, namespace: e2e-drain }
spec:
  replicas: 1
  selector: { matchLabels: { app: web } }
  template:
    metadata: { labels: { app: web } }
    spec:
      terminationGracePeriodSeconds: 5
      containers: [{ name: app, image: registry.local/web:1 }]
"#;

/// Scenario 1 (and 5): drain a node with every kind of annotated workload and one
/// unannotated Deployment; then the webhook's metrics.
#[tokio::test]
#[ignore = "needs the local cluster: scripts/e2e.sh"]
async fn s1_drain_migrates_every_annotated_workload() -> anyhow::Result<()> {
    let ns = "e2e-drain";
    fresh_namespace(ns);
    // Everything starts on node-a.
    must(&["cordon", "node-b"]);
    must(&["cordon", "node-c"]);
    apply(WORKLOADS);
    let before = running_pods_in(ns, 5).await?;
    must(&["uncordon", "node-b"]);
    must(&["uncordon", "node-c"]);
    assert!(
        before.iter().all(|p| node_of(p) == "node-a"),
        "all pods start on node-a"
    );
    // The memory each container started with, to compare after the restore.
    let mut original = Vec::new();
    for p in &before {
        for c in &p.spec.as_ref().unwrap().containers {
            let line = eventually("first log line", Duration::from_secs(30), || async {
                Ok(start_line(ns, &p.name_any(), &c.name))
            })
            .await?;
            assert!(line.starts_with("started fresh"), "{line}");
            original.push((
                p.labels()["app"].clone(),
                c.name.clone(),
                field(&line, "memory_sha256").unwrap().to_string(),
            ));
        }
    }
    // Let the counters run so a restored value is visibly not zero.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let drain = kubectl(&[
        "drain",
        "node-a",
        "--ignore-daemonsets",
        "--delete-emptydir-data",
        "--force",
        "--timeout=300s",
    ]);
    let out = drain.all();
    println!("---- kubectl drain ----\n{out}");
    assert!(drain.ok, "drain must complete:\n{out}");
    assert!(out.contains("kube-migrate"), "kubectl printed our reason:\n{out}");

    let done = migrations_succeeded(ns, 4, Duration::from_secs(180), |_| true).await?;
    for m in &done {
        let s = m.status.as_ref().unwrap();
        let phases: Vec<Phase> = s.phases.iter().map(|t| t.phase).collect();
        assert_eq!(
            phases,
            [
                Phase::Pending,
                Phase::Checkpointing,
                Phase::Transferring,
                Phase::BuildingImage,
                Phase::Restoring,
                Phase::Succeeded
            ],
            "{}",
            m.name_any()
        );
        assert!(
            s.phases[..5].iter().all(|t| t.seconds.is_some()),
            "every phase is timed: {:?}",
            s.phases
        );
        assert!(s.downtime_seconds.is_some_and(|d| d > 0.0));
        // The source's run-on after its checkpoint is measured on every migration (from the
        // kubelet's finishedAt); with a 1 s grace period it stays within a few seconds.
        assert!(
            s.source_window_seconds.is_some_and(|w| (0.0..5.0).contains(&w)),
            "{}: source window {:?}",
            m.name_any(),
            s.source_window_seconds
        );
        assert!(
            s.containers
                .iter()
                .all(|c| c.digest.as_deref().is_some_and(|d| d.starts_with("sha256:")) && c.size_bytes > Some(0))
        );
        assert_ne!(s.target_node.as_deref(), Some("node-a"));
        // The checkpoint image holds the pod's memory: the target's registry serves it only
        // to the pull holding this migration's credential (the replacement's pull Secret).
        let image = s.containers[0].image.clone().unwrap_or_default();
        let secret = format!("{}-pull", m.name_any());
        assert_eq!(registry_status(&image, None), 401, "anonymous pull of {image}");
        assert_eq!(
            registry_status(&image, Some("kube-migrate:guess")),
            403,
            "wrong password"
        );
        let password = pull_password(ns, &secret);
        assert_eq!(
            registry_status(&image, Some(&password)),
            200,
            "the pull Secret's credential"
        );
        println!(
            "{:<16} {} -> {}  {}  downtime {:.2}s  source window {:.2}s",
            m.spec.pod_name,
            m.spec.source_node,
            s.target_node.as_deref().unwrap_or("?"),
            s.phases[..5]
                .iter()
                .map(|t| format!("{}={:.2}s", t.phase, t.seconds.unwrap_or_default()))
                .collect::<Vec<_>>()
                .join(" "),
            s.downtime_seconds.unwrap_or_default(),
            s.source_window_seconds.unwrap_or_default()
        );
    }

    // Every workload runs elsewhere; the annotated ones from their checkpoints.
    let after = running_pods_in(ns, 5).await?;
    for p in &after {
        assert_ne!(node_of(p), "node-a", "{} still on node-a", p.name_any());
        let app = p.labels()["app"].clone();
        for c in &p.spec.as_ref().unwrap().containers {
            let line = start_line(ns, &p.name_any(), &c.name).unwrap_or_default();
            let (_, _, sha) = original.iter().find(|(a, n, _)| *a == app && *n == c.name).unwrap();
            if app == "web" {
                assert!(
                    line.starts_with("started fresh"),
                    "unannotated pod is simply replaced: {line}"
                );
            } else {
                assert!(
                    line.starts_with("restored from checkpoint image"),
                    "{app}/{}: {line}",
                    c.name
                );
                assert_eq!(
                    field(&line, "memory_sha256"),
                    Some(sha.as_str()),
                    "memory intact: {line}"
                );
                let counter: u64 = field(&line, "counter").unwrap().parse()?;
                assert!(counter > 0, "the counter resumed, not restarted: {line}");
            }
        }
    }

    // Scenario 5: the metrics tell the same story.
    let url = std::env::var("KUBE_MIGRATE_METRICS_URL")?;
    let metrics = String::from_utf8(std::process::Command::new("curl").args(["-sf", &url]).output()?.stdout)?;
    let value = |prefix: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    assert!(
        value("kube_migrate_drain_duration_seconds_count{node=\"node-a\"}") >= 1.0,
        "{metrics}"
    );
    assert!(
        value("kube_migrate_migrations_total{outcome=\"succeeded\",reason=\"none\"}") >= 4.0,
        "{metrics}"
    );
    assert!(
        // Each annotated pod's eviction went through once its state was safe, whether the first
        // one was held until then or answered 429 and retried (an answer is counted under the
        // result it ended with); for the StatefulSet's pod, a retry may meet its replacement
        // under the same name, answered NotFound ("gone").
        value("kube_migrate_webhook_decisions_total{webhook=\"eviction\",result=\"allowed_state_safe\"}")
            + value("kube_migrate_webhook_decisions_total{webhook=\"eviction\",result=\"gone\"}")
            >= 4.0,
        "{metrics}"
    );
    assert!(
        value("kube_migrate_phase_duration_seconds_count{phase=\"Transferring\"}") >= 4.0,
        "{metrics}"
    );
    println!(
        "{}",
        metrics
            .lines()
            .filter(|l| l.starts_with("kube_migrate_drain_duration_seconds_sum")
                || l.starts_with("kube_migrate_migrations_total"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    must(&["uncordon", "node-a"]);
    Ok(())
}

/// Scenario 2: `kubectl drain --dry-run=server` starts nothing.
#[tokio::test]
#[ignore = "needs the local cluster: scripts/e2e.sh"]
async fn s2_server_dry_run_starts_nothing() -> anyhow::Result<()> {
    let ns = "e2e-dry";
    fresh_namespace(ns);
    apply(&format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{ name: keep, namespace: {ns}, annotations: {{ migrate.io/stateful: "true" }} }}
spec: {{ nodeName: node-c, containers: [{{ name: app, image: registry.local/counter:1 }}] }}
"#
    ));
    running_pods_in(ns, 1).await?;
    let run = kubectl(&[
        "drain",
        "node-c",
        "--dry-run=server",
        "--ignore-daemonsets",
        "--delete-emptydir-data",
        "--force",
    ]);
    println!("{}", run.all());
    assert!(run.ok, "{}", run.all());
    assert!(run.all().contains("server dry run"), "{}", run.all());
    let pms: Api<PodMigration> = Api::namespaced(client().await, ns);
    assert!(
        pms.list(&ListParams::default()).await?.items.is_empty(),
        "a dry run created a PodMigration"
    );
    assert_eq!(
        must(&["get", "node", "node-c", "-o", "jsonpath={.spec.unschedulable}"]),
        "",
        "a dry run cordons nothing"
    );
    running_pods_in(ns, 1).await?;
    must(&["delete", "namespace", ns, "--wait=false"]);
    Ok(())
}

/// Scenario 3: no eligible target → Failed with a clear reason; `block` holds the drain,
/// re-annotating `evict` lets it through.
#[tokio::test]
#[ignore = "needs the local cluster: scripts/e2e.sh"]
async fn s3_no_target_fails_clearly_and_honours_on_failure() -> anyhow::Result<()> {
    let ns = "e2e-notarget";
    fresh_namespace(ns);
    apply(&format!(
        r#"
apiVersion: v1
kind: Pod
metadata:
  name: stuck
  namespace: {ns}
  labels: {{ app: stuck }}
  annotations: {{ migrate.io/stateful: "true", migrate.io/on-failure: block, migrate.io/target-node: node-zzz }}
spec: {{ nodeName: node-b, terminationGracePeriodSeconds: 1, containers: [{{ name: app, image: registry.local/counter:1 }}] }}
"#
    ));
    running_pods_in(ns, 1).await?;
    let run = kubectl(&[
        "drain",
        "node-b",
        "--pod-selector=app=stuck",
        "--force",
        "--timeout=25s",
    ]);
    println!("{}", run.all());
    assert!(!run.ok, "the drain must not complete while blocked");
    assert!(run.all().contains("migrate.io/on-failure=block"), "{}", run.all());
    let pms: Api<PodMigration> = Api::namespaced(client().await, ns);
    let m = pms
        .list(&ListParams::default())
        .await?
        .items
        .pop()
        .expect("a PodMigration");
    let s = m.status.unwrap();
    assert_eq!(s.phase, Phase::Failed);
    assert_eq!(s.reason.as_deref(), Some("NoTarget"));
    assert!(
        s.message.as_deref().unwrap().contains("node-zzz does not exist"),
        "{:?}",
        s.message
    );
    running_pods_in(ns, 1).await?; // the pod was never touched

    must(&[
        "annotate",
        "pod",
        "-n",
        ns,
        "stuck",
        "migrate.io/on-failure=evict",
        "--overwrite",
    ]);
    let run = kubectl(&[
        "drain",
        "node-b",
        "--pod-selector=app=stuck",
        "--force",
        "--timeout=60s",
    ]);
    assert!(run.ok, "evict policy lets the drain through: {}", run.all());
    must(&["uncordon", "node-b"]);
    must(&["delete", "namespace", ns, "--wait=false"]);
    Ok(())
}

/// Scenario 4: a PDB with minAvailable=1 over a single-replica annotated Deployment.
/// kube-migrate never overrides a PDB: the migration waits in Pending, and the drain waits
/// with a message naming the PDB, exactly as it would without kube-migrate.
#[tokio::test]
#[ignore = "needs the local cluster: scripts/e2e.sh"]
async fn s4_a_pdb_that_allows_no_disruption_holds_the_migration() -> anyhow::Result<()> {
    let ns = "e2e-pdb";
    fresh_namespace(ns);
    apply(&format!(
        r#"
apiVersion: apps/v1
kind: Deployment
metadata: {{ name: guarded, namespace: {ns} }}
spec:
  replicas: 1
  selector: {{ matchLabels: {{ app: guarded }} }}
  template:
    metadata: {{ labels: {{ app: guarded }}, annotations: {{ migrate.io/stateful: "true" }} }}
    spec: {{ nodeName: node-c, containers: [{{ name: app, image: registry.local/counter:1 }}] }}
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata: {{ name: guarded, namespace: {ns} }}
spec: {{ minAvailable: 1, selector: {{ matchLabels: {{ app: guarded }} }} }}
"#
    ));
    running_pods_in(ns, 1).await?;
    let run = kubectl(&["drain", "node-c", "--pod-selector=app=guarded", "--timeout=20s"]);
    println!("{}", run.all());
    assert!(!run.ok, "the PDB holds the drain");
    assert!(run.all().contains("PodDisruptionBudget guarded"), "{}", run.all());
    let pms: Api<PodMigration> = Api::namespaced(client().await, ns);
    let m = pms
        .list(&ListParams::default())
        .await?
        .items
        .pop()
        .expect("a PodMigration");
    assert_eq!(m.phase(), Phase::Pending);
    let s = m.status.unwrap();
    assert!(
        s.conditions
            .iter()
            .any(|c| c.type_ == "Queued" && c.status == "True" && c.reason == "PodDisruptionBudget"),
        "{:?}",
        s.conditions
    );
    running_pods_in(ns, 1).await?; // still serving on node-c
    must(&["uncordon", "node-c"]);
    must(&["delete", "namespace", ns, "--wait=false"]);
    Ok(())
}

/// A controller killed (SIGKILL) in the middle of a migration resumes from the PodMigration's
/// status when it comes back: state lives in the API server, not in memory.
#[tokio::test]
#[ignore = "needs the local cluster: scripts/e2e.sh"]
async fn s6_a_killed_controller_resumes_from_the_api_server() -> anyhow::Result<()> {
    let ns = "e2e-restart";
    fresh_namespace(ns);
    apply(&format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{ name: phoenix, namespace: {ns}, annotations: {{ migrate.io/stateful: "true" }} }}
spec:
  nodeName: node-c
  terminationGracePeriodSeconds: 2
  containers: [{{ name: app, image: registry.local/counter:1, env: [{{ name: STATE_BYTES, value: "268435456" }}] }}]
"#
    ));
    running_pods_in(ns, 1).await?;
    let original = eventually("first log line", Duration::from_secs(60), || async {
        Ok(first_log_line(ns, "phoenix", "app").and_then(|l| field(&l, "memory_sha256").map(str::to_string)))
    })
    .await?;
    let run = plugin(&["pod", "phoenix", "-n", ns, "--to", "node-b", "--no-wait"]);
    assert!(run.ok, "{}", run.all());
    // Kill the controller as soon as the migration is under way.
    let pms: Api<PodMigration> = Api::namespaced(client().await, ns);
    let phase = eventually("the migration under way", Duration::from_secs(30), || {
        let pms = pms.clone();
        async move {
            let list = pms.list(&ListParams::default()).await?.items;
            Ok(list
                .first()
                .map(|m| m.phase())
                .filter(|p| *p != Phase::Pending || list[0].status.is_some()))
        }
    })
    .await?;
    local_cluster(&["kill-webhook"]);
    let killed_at = pms.list(&ListParams::default()).await?.items[0].phase();
    println!("controller killed with the migration in {killed_at} (first seen {phase})");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let still = pms.list(&ListParams::default()).await?.items[0].phase();
    assert!(
        !still.is_terminal() || killed_at.is_terminal(),
        "nothing moves while the controller is down: {still}"
    );
    local_cluster(&["start-webhook"]);
    let done = eventually(
        "the migration to finish after the restart",
        Duration::from_secs(120),
        || {
            let pms = pms.clone();
            async move {
                let m = pms.list(&ListParams::default()).await?.items.pop().unwrap();
                Ok(m.phase().is_terminal().then_some(m))
            }
        },
    )
    .await?;
    assert_eq!(
        done.phase(),
        Phase::Succeeded,
        "{:?}",
        done.status.as_ref().and_then(|s| s.message.clone())
    );
    let pods = running_pods_in(ns, 1).await?;
    assert_eq!(node_of(&pods[0]), "node-b");
    let line = first_log_line(ns, "phoenix", "app").unwrap_or_default();
    assert!(line.starts_with("restored from checkpoint image"), "{line}");
    assert_eq!(field(&line, "memory_sha256"), Some(original.as_str()));
    must(&["delete", "namespace", ns, "--wait=false"]);
    Ok(())
}
