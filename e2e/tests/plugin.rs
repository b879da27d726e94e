//! End-to-end: the `kubectl migrate` plugin as an operator runs it (scenarios 5 and 7).
//! Run by `scripts/e2e.sh`, which puts the built plugin on PATH.

use std::time::Duration;

use kube::{Api, ResourceExt, api::ListParams};
use kube_migrate::api::{PodMigration, TransferProgress};
use kube_migrate_e2e::{
    apply, client, eventually, field, first_log_line, fresh_namespace, local_cluster, local_cluster_with, must,
    node_of, opted_in_pod, plugin, running_pods_in, scrape,
};

/// Scenario (kubectl migrate): move one pod to a named node with a live progress view, refuse
/// what cannot work with a clear reason, keep a checkpoint as a backup and restore it.
#[tokio::test]
#[ignore = "needs the local cluster: scripts/e2e.sh"]
async fn s5_kubectl_migrate_pod_checkpoint_list_restore() -> anyhow::Result<()> {
    let ns = "e2e-plugin";
    fresh_namespace(ns);
    apply(&format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{ name: worker, namespace: {ns}, annotations: {{ migrate.io/stateful: "true" }} }}
spec:
  nodeName: node-b
  terminationGracePeriodSeconds: 2
  containers: [{{ name: app, image: registry.local/counter:1, env: [{{ name: STATE_BYTES, value: "262144" }}] }}]
---
apiVersion: v1
kind: Pod
metadata: {{ name: plain, namespace: {ns} }}
spec: {{ nodeName: node-b, containers: [{{ name: app, image: registry.local/web:1 }}] }}
"#
    ));
    running_pods_in(ns, 2).await?;
    let sha = |pod: &str| first_log_line(ns, pod, "app").and_then(|l| field(&l, "memory_sha256").map(str::to_string));
    let original = eventually("first log line", Duration::from_secs(30), || async {
        Ok(sha("worker"))
    })
    .await?;

    // Clear refusals, nothing created.
    let run = plugin(&["pod", "nope", "-n", ns, "--to", "node-c"]);
    assert!(
        !run.ok && run.stderr.contains("pod e2e-plugin/nope not found"),
        "{}",
        run.all()
    );
    let run = plugin(&["pod", "plain", "-n", ns, "--to", "node-c"]);
    assert!(
        !run.ok && run.stderr.contains("not annotated migrate.io/stateful"),
        "{}",
        run.all()
    );
    let run = plugin(&["pod", "worker", "-n", ns, "--to", "node-zzz"]);
    assert!(
        !run.ok && run.stderr.contains("node node-zzz cannot take the pod: does not exist"),
        "{}",
        run.all()
    );
    must(&["cordon", "node-c"]);
    let run = plugin(&["pod", "worker", "-n", ns, "--to", "node-c"]);
    must(&["uncordon", "node-c"]);
    assert!(!run.ok && run.stderr.contains("is cordoned"), "{}", run.all());
    assert_eq!(
        run.all().matches("created").count(),
        0,
        "a refused migration creates nothing"
    );

    // One command: migrate to a named node, following the phases.
    let run = plugin(&["pod", "worker", "-n", ns, "--to", "node-c", "--timeout", "120"]);
    println!("---- kubectl migrate pod ----\n{}", run.all());
    assert!(run.ok, "{}", run.all());
    for phase in ["Checkpointing", "Transferring", "Restoring", "Succeeded"] {
        assert!(run.stdout.contains(phase), "progress shows {phase}: {}", run.stdout);
    }
    assert!(run.stdout.contains("migrated: worker runs on node-c"), "{}", run.stdout);
    let pods = running_pods_in(ns, 2).await?;
    let worker = pods.iter().find(|p| p.name_any() == "worker").unwrap();
    assert_eq!(node_of(worker), "node-c");
    let line = first_log_line(ns, "worker", "app").unwrap_or_default();
    assert!(line.starts_with("restored from checkpoint image"), "{line}");
    assert_eq!(field(&line, "memory_sha256"), Some(original.as_str()));

    // Backup: checkpoint only, the pod keeps running; list; restore under a new name.
    let run = plugin(&["checkpoint", "pod", "worker", "-n", ns, "--timeout", "120"]);
    println!("---- kubectl migrate checkpoint pod ----\n{}", run.all());
    assert!(run.ok, "{}", run.all());
    let checkpoint = run
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("podmigration.migrate.io/"))
        .and_then(|l| l.split_whitespace().next())
        .map(|n| n.trim_end_matches(':').to_string())
        .expect("checkpoint name");
    running_pods_in(ns, 2).await?; // nothing stopped
    let list = plugin(&["list", "-n", ns]);
    println!("---- kubectl migrate list ----\n{}", list.all());
    assert!(
        list.ok && list.stdout.contains(&checkpoint) && list.stdout.contains("worker"),
        "{}",
        list.all()
    );
    let run = plugin(&[
        "restore",
        &checkpoint,
        "-n",
        ns,
        "--name",
        "worker-copy",
        "--to",
        "node-b",
        "--timeout",
        "120",
    ]);
    println!("---- kubectl migrate restore ----\n{}", run.all());
    assert!(run.ok, "{}", run.all());
    let pods = running_pods_in(ns, 3).await?;
    let copy = pods
        .iter()
        .find(|p| p.name_any() == "worker-copy")
        .expect("restored pod");
    assert_eq!(node_of(copy), "node-b");
    let line = first_log_line(ns, "worker-copy", "app").unwrap_or_default();
    assert!(line.starts_with("restored from checkpoint image"), "{line}");
    assert_eq!(
        field(&line, "memory_sha256"),
        Some(original.as_str()),
        "the backup holds the same memory"
    );
    let status = plugin(&["status", "-n", ns]);
    assert!(status.ok && status.stdout.contains("Succeeded"), "{}", status.all());
    must(&["delete", "namespace", ns, "--wait=false"]);
    Ok(())
}

/// `kubectl migrate drain NODE`: cordons and drives the drain with a line per pod.
#[tokio::test]
#[ignore = "needs the local cluster: scripts/e2e.sh"]
async fn s7_kubectl_migrate_drain() -> anyhow::Result<()> {
    let ns = "e2e-plugin-drain";
    fresh_namespace(ns);
    apply(&format!(
        r#"
apiVersion: apps/v1
kind: Deployment
metadata: {{ name: keeper, namespace: {ns} }}
spec:
  replicas: 1
  selector: {{ matchLabels: {{ app: keeper }} }}
  template:
    metadata: {{ labels: {{ app: keeper }}, annotations: {{ migrate.io/stateful: "true" }} }}
    spec:
      terminationGracePeriodSeconds: 2
      affinity: {{ nodeAffinity: {{ preferredDuringSchedulingIgnoredDuringExecution: [{{ weight: 100, preference: {{ matchFields: [{{ key: metadata.name, operator: In, values: [node-c] }}] }} }}] }} }}
      containers: [{{ name: app, image: registry.local/counter:1 }}]
"#
    ));
    let before = running_pods_in(ns, 1).await?;
    let node = node_of(&before[0]);
    let run = plugin(&["drain", &node, "--timeout", "120"]);
    println!("---- kubectl migrate drain {node} ----\n{}", run.all());
    assert!(run.ok, "{}", run.all());
    assert!(
        run.stdout.contains(&format!("node/{node} cordoned")) && run.stdout.contains(&format!("node/{node} drained")),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("kube-migrate"),
        "the drain view shows kube-migrate's progress: {}",
        run.stdout
    );
    let after = running_pods_in(ns, 1).await?;
    assert_ne!(node_of(&after[0]), node);
    let line = first_log_line(ns, &after[0].name_any(), "app").unwrap_or_default();
    assert!(line.starts_with("restored from checkpoint image"), "{line}");
    must(&["uncordon", &node]);
    must(&["delete", "namespace", ns, "--wait=false"]);
    Ok(())
}

/// A long transfer shows how far it is: the controller writes the source agent's figures into
/// the PodMigration while the push runs, `kubectl migrate pod` prints them (plain lines: its
/// stdout is not a terminal here), and the progress writes neither repeat the push nor
/// outlive it. The controller runs with a 4 MiB/s limit so a 24 MiB state takes seconds.
#[tokio::test]
#[ignore = "needs the local cluster: scripts/e2e.sh"]
async fn s26_a_long_transfer_shows_its_progress_and_is_sent_once() -> anyhow::Result<()> {
    let ns = "e2e-progress";
    fresh_namespace(ns);
    // Every replica goes (an earlier scenario may have left a second one leading), so the
    // one started with the limit leads.
    local_cluster(&["kill-webhook", "all"]);
    local_cluster_with(&["start-webhook"], &[("KM_TRANSFER_BANDWIDTH", "4Mi")]);
    let result = long_transfer(ns).await;
    local_cluster(&["kill-webhook"]);
    local_cluster(&["start-webhook"]);
    result?;
    must(&["delete", "namespace", ns, "--wait=false"]);
    Ok(())
}

async fn long_transfer(ns: &str) -> anyhow::Result<()> {
    const STATE: u64 = 24 << 20;
    apply(&opted_in_pod(ns, "big", "progress", STATE, Some("node-b")));
    running_pods_in(ns, 1).await?;
    let original = eventually("first log line", Duration::from_secs(60), || async {
        Ok(first_log_line(ns, "big", "app").and_then(|l| field(&l, "memory_sha256").map(str::to_string)))
    })
    .await?;
    // node-b's agent (admin port 19090 + its index): pushes it answered.
    let node_b_metrics = "http://127.0.0.1:19091/metrics";
    let sends = r#"kube_migrate_agent_operations_total{operation="send",result="ok"}"#;
    let sends_before = scrape(node_b_metrics, sends);

    let run = tokio::task::spawn_blocking({
        let ns = ns.to_string();
        move || plugin(&["pod", "big", "-n", &ns, "--to", "node-c", "--timeout", "180"])
    });
    tokio::pin!(run);
    let pms: Api<PodMigration> = Api::namespaced(client().await, ns);
    let mut seen: Vec<TransferProgress> = Vec::new();
    let run = loop {
        tokio::select! {
            run = &mut run => break run?,
            _ = tokio::time::sleep(Duration::from_millis(300)) => {
                for pm in pms.list(&ListParams::default()).await?.items {
                    seen.extend(pm.status.and_then(|s| s.transfer));
                }
            }
        }
    };
    println!("---- kubectl migrate pod (4 MiB/s) ----\n{}", run.all());
    assert!(run.ok, "{}", run.all());
    assert!(run.stdout.contains("migrated: big runs on node-c"), "{}", run.stdout);

    // The status showed the transfer part way, against the archive's size.
    assert!(
        seen.iter().any(|p| p.bytes > 0 && p.bytes < p.total_bytes),
        "no progress part way in the status: {seen:?}"
    );
    assert!(seen.iter().all(|p| p.total_bytes >= STATE), "{seen:?}");
    // The plugin printed the figures: percent, rate, time left.
    let line = run
        .stdout
        .lines()
        .find(|l| l.contains("Transferring") && l.contains(" sent ") && l.contains("%, ") && l.contains("/s, ETA "))
        .unwrap_or_else(|| panic!("no progress line: {}", run.stdout));
    println!("a progress line: {line}");

    // Progress is over with the transfer, and the push happened once (a reconcile woken by a
    // progress write would push again from a stale object).
    let pm = pms
        .list(&ListParams::default())
        .await?
        .items
        .pop()
        .expect("the migration");
    let status = pm.status.unwrap_or_default();
    assert_eq!(status.transfer, None, "progress cleared when the transfer ended");
    assert!(status.transferred_bytes.unwrap_or_default() >= STATE);
    assert_eq!(
        scrape(node_b_metrics, sends) - sends_before,
        1.0,
        "one push answered by the source agent"
    );
    let line = first_log_line(ns, "big", "app").unwrap_or_default();
    assert!(line.starts_with("restored from checkpoint image"), "{line}");
    assert_eq!(field(&line, "memory_sha256"), Some(original.as_str()), "memory intact");
    Ok(())
}
