//! End-to-end with real containers (issue #4): the test kubelets run `kube-migrate.test/*`
//! images with crun and checkpoint/restore them with CRIU 4 (scripts/local-cluster.sh sets
//! that up; `$KUBE_MIGRATE_CRUN_STATUS_FILE` says whether this machine can). `kubectl drain`
//! moves a counter and a process holding N MiB of memory; on the target node the processes
//! continue from their checkpointed state: the counter does not restart from zero, the memory
//! checksum is the one the process computed before the move, and no process was started anew.
//!
//! `KM_CRIU_SIZES_MIB` (default `256`) lists the memory sizes to migrate, one drain each;
//! per-phase timings and archive sizes are printed as a table (the README's figures come from
//! `KM_CRIU_SIZES_MIB=1,64,256,1024 scripts/e2e.sh criu`).

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::{Api, ResourceExt, api::ListParams};
use kube_migrate::api::Phase;
use kube_migrate_e2e::{apply, client, eventually, field, kubectl, migrations_succeeded, must};

const NS: &str = "e2e-criu";

/// Why real containers cannot run here, or None when they can.
fn crun_unavailable() -> Option<String> {
    let Ok(path) = std::env::var("KUBE_MIGRATE_CRUN_STATUS_FILE") else {
        return Some("KUBE_MIGRATE_CRUN_STATUS_FILE is not set (run through scripts/e2e.sh)".into());
    };
    match std::fs::read_to_string(&path) {
        Ok(s) if s.trim() == "enabled" => None,
        Ok(s) => Some(s.trim().to_string()),
        Err(e) => Some(format!("{path}: {e}")),
    }
}

fn logs(pod: &str) -> Vec<String> {
    let run = kubectl(&["logs", "-n", NS, pod]);
    if run.ok {
        run.stdout.lines().map(str::to_string).collect()
    } else {
        Vec::new()
    }
}

/// Values of the `count N` lines.
fn counts(lines: &[String]) -> Vec<u64> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix("count ").and_then(|n| n.trim().parse().ok()))
        .collect()
}

/// `memhog report count=N checksum=X verify=ok|BAD@…` lines: (count, checksum, verify).
fn reports(lines: &[String]) -> Vec<(u64, String, String)> {
    lines
        .iter()
        .filter(|l| l.starts_with("memhog report "))
        .filter_map(|l| {
            Some((
                field(l, "count")?.parse().ok()?,
                field(l, "checksum")?.to_string(),
                field(l, "verify")?.to_string(),
            ))
        })
        .collect()
}

async fn running_pod(label: &str, not_on: Option<&str>) -> anyhow::Result<Pod> {
    let pods: Api<Pod> = Api::namespaced(client().await, NS);
    eventually(&format!("a running {label} pod"), Duration::from_secs(180), || {
        let pods = pods.clone();
        async move {
            let list = pods
                .list(&ListParams::default().labels(&format!("app={label}")))
                .await?;
            Ok(list.items.into_iter().find(|p| {
                p.metadata.deletion_timestamp.is_none()
                    && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
                    && not_on.is_none_or(|n| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) != Some(n))
            }))
        }
    })
    .await
}

fn node_of(p: &Pod) -> &str {
    p.spec.as_ref().and_then(|s| s.node_name.as_deref()).unwrap_or_default()
}

/// One drain of node-a with a counter and an `mib` MiB memory process on it.
struct Figures {
    mib: u64,
    drain_seconds: f64,
    archive_bytes: u64,
    phases: Vec<(Phase, f64)>,
    downtime: f64,
    /// Checkpoint → the source's last container stopped (what the source did then is lost).
    window: f64,
}

async fn migrate_once(mib: u64) -> anyhow::Result<Figures> {
    let memory = format!("mem-{mib}");
    // Everything starts on node-a.
    must(&["uncordon", "node-a"]);
    must(&["cordon", "node-b"]);
    must(&["cordon", "node-c"]);
    apply(&format!(
        r#"
apiVersion: apps/v1
kind: Deployment
metadata: {{ name: counter-{mib}, namespace: {NS} }}
spec:
  replicas: 1
  selector: {{ matchLabels: {{ app: counter-{mib} }} }}
  template:
    metadata: {{ labels: {{ app: counter-{mib} }}, annotations: {{ migrate.io/stateful: "true" }} }}
    spec:
      automountServiceAccountToken: false
      terminationGracePeriodSeconds: 5
      containers: [{{ name: app, image: kube-migrate.test/counter:1 }}]
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {{ name: {memory}, namespace: {NS} }}
spec:
  serviceName: {memory}
  replicas: 1
  selector: {{ matchLabels: {{ app: {memory} }} }}
  template:
    metadata: {{ labels: {{ app: {memory} }}, annotations: {{ migrate.io/stateful: "true" }} }}
    spec:
      automountServiceAccountToken: false
      terminationGracePeriodSeconds: 5
      containers:
        - name: app
          image: kube-migrate.test/memory:1
          env: [{{ name: MIB, value: "{mib}" }}, {{ name: REPORT_EVERY, value: "10" }}]
"#
    ));
    let counter_pod = running_pod(&format!("counter-{mib}"), None).await?;
    let memory_pod = running_pod(&memory, None).await?;
    must(&["uncordon", "node-b"]);
    must(&["uncordon", "node-c"]);
    assert_eq!(node_of(&counter_pod), "node-a");
    assert_eq!(node_of(&memory_pod), "node-a");

    // The state before the move: the counter has run for a while, memhog has filled and
    // verified its memory.
    let counter_name = counter_pod.name_any();
    let before = eventually("the counter past 20", Duration::from_secs(60), || async {
        let lines = logs(&counter_name);
        Ok(counts(&lines).last().copied().filter(|&c| c >= 20).map(|_| lines))
    })
    .await?;
    assert!(
        before.iter().any(|l| l.starts_with("counter start pid=")),
        "the counter started fresh: {before:?}"
    );
    let before_count = *counts(&before).last().unwrap();
    let memory_name = memory_pod.name_any();
    let start = eventually("memhog's first verified report", Duration::from_secs(120), || async {
        let lines = logs(&memory_name);
        let start = lines.iter().find(|l| l.starts_with("memhog start ")).cloned();
        Ok(start.filter(|_| reports(&lines).iter().any(|(_, _, v)| v == "ok")))
    })
    .await?;
    let checksum = field(&start, "checksum").unwrap().to_string();
    assert_eq!(field(&start, "mib"), Some(mib.to_string().as_str()), "{start}");
    let before_memory_count = counts(&logs(&memory_name)).last().copied().unwrap_or_default();

    let started = Instant::now();
    let drain = kubectl(&[
        "drain",
        "node-a",
        "--ignore-daemonsets",
        "--delete-emptydir-data",
        "--force",
        "--timeout=600s",
    ]);
    let drain_seconds = started.elapsed().as_secs_f64();
    assert!(drain.ok, "drain must complete:\n{}", drain.all());

    let done = migrations_succeeded(NS, 2, Duration::from_secs(300), |m| {
        m.spec.pod_name.starts_with(&format!("counter-{mib}-")) || m.spec.pod_name == format!("{memory}-0")
    })
    .await?;

    // The counter continues from where it was: not from zero, and no fresh start.
    let counter_after = running_pod(&format!("counter-{mib}"), Some("node-a")).await?;
    let after_name = counter_after.name_any();
    let after = eventually("the restored counter's output", Duration::from_secs(60), || async {
        let lines = logs(&after_name);
        Ok((counts(&lines).len() >= 5).then_some(lines))
    })
    .await?;
    let resumed = counts(&after);
    assert!(
        !after.iter().any(|l| l.starts_with("counter start")),
        "restored, not restarted: {after:?}"
    );
    assert!(
        resumed[0] >= before_count,
        "the counter resumed at {} after having reached {before_count} before the drain",
        resumed[0]
    );
    assert!(
        resumed.windows(2).all(|w| w[1] == w[0] + 1),
        "and goes on counting one by one: {resumed:?}"
    );
    println!(
        "counter: {} on node-a reached {before_count} before the drain; {after_name} on {} resumed at {}",
        counter_name,
        node_of(&counter_after),
        resumed[0]
    );

    // The memory process: same checksum, verified word by word, count continued.
    let memory_after = running_pod(&memory, Some("node-a")).await?;
    let report = eventually(
        "a verified report after the restore",
        Duration::from_secs(60),
        || async {
            let lines = logs(&memory_name);
            assert!(
                !lines.iter().any(|l| l.starts_with("memhog start")),
                "restored, not restarted: {lines:?}"
            );
            Ok(reports(&lines).into_iter().next())
        },
    )
    .await?;
    assert_eq!(report.1, checksum, "memory checksum after the restore: {report:?}");
    assert_eq!(report.2, "ok", "every word of the memory verified: {report:?}");
    assert!(
        report.0 >= before_memory_count,
        "memhog's count resumed at {} (was {before_memory_count})",
        report.0
    );
    println!(
        "memory: {mib} MiB on {}: checksum {checksum} before, {} after (verify={}), count {} -> {}",
        node_of(&memory_after),
        report.1,
        report.2,
        before_memory_count,
        report.0
    );

    let m = done.iter().find(|m| m.spec.pod_name == memory_name).unwrap();
    let s = m.status.as_ref().unwrap();
    let archive_bytes = s.containers.iter().filter_map(|c| c.size_bytes).sum::<u64>();
    assert!(
        archive_bytes >= mib << 20,
        "the archive holds the memory: {archive_bytes} bytes for {mib} MiB"
    );
    let figures = Figures {
        mib,
        drain_seconds,
        archive_bytes,
        phases: s.phases[..5]
            .iter()
            .map(|t| (t.phase, t.seconds.unwrap_or_default()))
            .collect(),
        downtime: s.downtime_seconds.unwrap_or_default(),
        window: s.source_window_seconds.unwrap_or(f64::NAN),
    };
    assert!(
        s.source_window_seconds.is_some(),
        "the source's run-on after the checkpoint is measured: {s:?}"
    );

    must(&["uncordon", "node-a"]);
    must(&[
        "delete",
        "-n",
        NS,
        &format!("deployment/counter-{mib}"),
        &format!("statefulset/{memory}"),
        "--wait=true",
    ]);
    Ok(figures)
}

#[tokio::test]
#[ignore = "needs the local cluster: scripts/e2e.sh"]
async fn s8_real_criu_state_survives_the_drain() -> anyhow::Result<()> {
    if let Some(why) = crun_unavailable() {
        // Said plainly, and counted by scripts/test.sh as skipped, not passed.
        println!("SKIPPED: real CRIU on this machine: {why}");
        return Ok(());
    }
    let sizes: Vec<u64> = std::env::var("KM_CRIU_SIZES_MIB")
        .unwrap_or_else(|_| "256".into())
        .split(',')
        .map(|s| s.trim().parse())
        .collect::<Result<_, _>>()?;
    let _ = kubectl(&["delete", "namespace", NS, "--wait=true", "--timeout=120s"]);
    must(&["create", "namespace", NS]);
    let mut table = Vec::new();
    for mib in sizes {
        table.push(migrate_once(mib).await?);
    }
    println!(
        "\n| state | archive | Pending | Checkpointing | Transferring | BuildingImage | Restoring | downtime | source window | kubectl drain |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for f in &table {
        let phases: Vec<String> = f.phases.iter().map(|(_, s)| format!("{s:.2} s")).collect();
        println!(
            "| {} MiB | {:.1} MiB | {} | {:.2} s | {:.2} s | {:.1} s |",
            f.mib,
            f.archive_bytes as f64 / f64::from(1 << 20),
            phases.join(" | "),
            f.downtime,
            f.window,
            f.drain_seconds
        );
    }
    let _ = kubectl(&["delete", "namespace", NS, "--wait=false"]);
    Ok(())
}
