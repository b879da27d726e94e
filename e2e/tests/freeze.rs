//! End-to-end: the source never executes after its checkpoint, and until its state is verified
//! on the target it can be resumed (issue #10). The test kubelet's simulated containers have a
//! stand-in cgroup that the node agent freezes exactly as on a real node; the counter is the
//! workload's state, and the test kubelet logs where each container stopped ("container ended").
//! Run by `scripts/e2e.sh`.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::{Api, ResourceExt, api::ListParams};
use kube_migrate::api::{Phase, PodMigration};
use kube_migrate_e2e::{
    client, drain_a, drain_a_within, eventually, field, first_log_line, fresh_namespace, km_dir, kubectl,
    migrations_succeeded, must, node_of, opted_in_deployment, running_pods_in, scrape, start_on_node_a,
};

/// Where the test kubelet of `node` says container `container` of pod `uid` stopped: its
/// "container ended" log line, written whether or not the pod object was still there for a
/// final status (the controller removes a source it saw killed at once).
fn ended_counter(node: &str, uid: &str, container: &str) -> Option<u64> {
    let log = std::fs::read_to_string(km_dir().join(format!("logs/kubelet-{node}.log"))).ok()?;
    let (uid, container) = (format!("uid={uid}"), format!("container={container}"));
    log.lines()
        .rfind(|l| l.contains("container ended") && l.contains(&uid) && l.contains(&container))
        .and_then(|l| field(l, "last"))
        .and_then(counter_in)
}

fn counter_in(text: &str) -> Option<u64> {
    field(text, "counter").and_then(|v| v.parse().ok())
}

/// Scenario 22: the restored counter is exactly where the source stopped. The source is
/// frozen before its checkpoint, stays frozen while its archive travels, and is killed still
/// frozen: the value the source's container ended with equals the value the replacement
/// resumed from, the migration records a window of 0 and its freeze time. Before the freeze,
/// the source ticked on for its grace period after the checkpoint (ended ahead of the
/// restored copy: those ticks were lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the local cluster: scripts/e2e.sh"]
async fn s22_the_source_never_runs_after_its_checkpoint() -> anyhow::Result<()> {
    let ns = "e2e-freeze";
    fresh_namespace(ns);
    let before = start_on_node_a(ns, &opted_in_deployment(ns, "steady", "freeze", 64 << 20, ""), 1).await?;
    let source_uid = before[0].uid().unwrap_or_default();
    tokio::time::sleep(Duration::from_secs(2)).await;

    let drain = drain_a("e2e=freeze");
    assert!(drain.ok, "drain must complete:\n{}", drain.all());
    let done = migrations_succeeded(ns, 1, Duration::from_secs(120), |_| true).await?;
    let s = done[0].status.clone().unwrap_or_default();
    let after = running_pods_in(ns, 1).await?;
    let line = first_log_line(ns, &after[0].name_any(), "app").unwrap_or_default();
    println!("restored: {line}");
    assert!(line.starts_with("restored from checkpoint image"), "{line}");
    let restored = counter_in(&line).expect("restored counter");
    let ended = eventually("the source's final counter", Duration::from_secs(30), || {
        let uid = source_uid.clone();
        async move { Ok(ended_counter("node-a", &uid, "app")) }
    })
    .await?;
    println!(
        "source ended at counter={ended}, replacement resumed at counter={restored}; window {:?}s, downtime {:?}s, frozen at {:?}",
        s.source_window_seconds, s.downtime_seconds, s.source_frozen_at
    );
    assert_eq!(
        ended, restored,
        "the source ran on after its checkpoint: those ticks are lost"
    );
    assert!(s.source_frozen_at.is_some(), "the freeze is recorded: {s:?}");
    assert_eq!(s.source_window_seconds, Some(0.0));
    // The agent saw the killed tasks gone, so the hold went at once: the source counts as
    // terminated when it was killed, not when the kubelet reported it a round later.
    let at = |step: &str| s.timeline.iter().find(|t| t.step == step).map(|t| t.at.0);
    assert!(at("sourceKilled").is_some(), "{:?}", s.timeline);
    assert_eq!(at("sourceKilled"), at("sourceTerminated"), "{:?}", s.timeline);
    assert!(s.freeze_note.is_none(), "{:?}", s.freeze_note);
    assert_ne!(node_of(&after[0]), "node-a");
    must(&["uncordon", "node-a"]);
    must(&["delete", "namespace", ns, "--wait=false"]);
    Ok(())
}

/// Scenario 13: the checkpoint archive is truncated on the source after the checkpoint (the
/// test kubelet's fault injection, when the hold arrives, i.e. before the send). The transfer
/// must name it corruption — not "unreachable" — without blind retries, end at once, remove
/// every copy of the bad archive (the kubelet's checkpoint directory included), and resume the
/// frozen source: the same pod (UID) carries on counting from where it was, its state intact.
/// With `on-failure: block` the drain does not complete. Before the freeze, the source had
/// already been stopped: the workload started fresh, its state lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the local cluster: scripts/e2e.sh"]
async fn s13_a_corrupt_archive_is_named_and_the_source_resumes() -> anyhow::Result<()> {
    let ns = "e2e-corrupt";
    fresh_namespace(ns);
    let before = start_on_node_a(
        ns,
        &opted_in_deployment(
            ns,
            "fragile",
            "corrupt",
            4 << 20,
            "test.kube-migrate.io/fault: truncate-archive-on-stop, migrate.io/on-failure: block",
        ),
        1,
    )
    .await?;
    let source = before[0].clone();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let drain = drain_a_within("e2e=corrupt", "25s");
    assert!(!drain.ok, "on-failure: block holds the drain");
    let pms: Api<PodMigration> = Api::namespaced(client().await, ns);
    let m = eventually("the migration ends", Duration::from_secs(60), || {
        let pms = pms.clone();
        async move {
            let list = pms.list(&ListParams::default()).await?.items;
            Ok(list.into_iter().find(|m| m.phase().is_terminal()))
        }
    })
    .await?;
    let s = m.status.clone().unwrap_or_default();
    println!("{}: {} {:?}: {:?}", m.name_any(), s.phase, s.reason, s.message);
    assert_eq!(s.phase, Phase::Failed);
    assert_eq!(s.reason.as_deref(), Some("ArchiveCorrupt"));
    let message = s.message.clone().unwrap_or_default();
    assert!(
        message.contains("archive corrupt") && message.contains("bytes on disk"),
        "{message}"
    );
    assert!(
        !message.contains("cannot reach"),
        "not misreported as a network error: {message}"
    );
    assert!(message.contains("thawed"), "{message}");
    assert_eq!(s.attempts, 0, "no blind retries");
    assert!(s.source_stopped_at.is_none(), "the source was never stopped");
    // The pause is on record: frozen, then thawed, in that order.
    let (frozen, thawed) = (s.source_frozen_at.clone(), s.source_thawed_at.clone());
    assert!(
        matches!((&frozen, &thawed), (Some(f), Some(t)) if f.0 <= t.0),
        "frozen {frozen:?} then thawed {thawed:?}"
    );
    // Every copy of the bad archive is gone from node-a's kubelet directory.
    let dir = km_dir().join("node-a/checkpoints").display().to_string();
    let pod = m.spec.pod_name.clone();
    eventually("the archive removed", Duration::from_secs(30), || {
        let (dir, pod) = (dir.clone(), pod.clone());
        async move {
            let left = std::fs::read_dir(&dir)?.flatten().any(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(&format!("checkpoint-{pod}_"))
            });
            Ok((!left).then_some(()))
        }
    })
    .await?;
    // The very same pod runs on, counting on from its state: never restarted, never stopped.
    let last = |pod: &str| -> Option<u64> {
        let out = kubectl(&["logs", "-n", ns, pod, "-c", "app", "--tail=1"]);
        counter_in(out.stdout.trim())
    };
    let first = eventually("a counter line", Duration::from_secs(10), || async {
        Ok(last(&source.name_any()))
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let later = last(&source.name_any()).unwrap_or_default();
    let now: Api<Pod> = Api::namespaced(client().await, ns);
    let p = now.get(&source.name_any()).await?;
    println!("source {} counting on: {first} -> {later}", source.name_any());
    assert_eq!(p.uid(), source.uid(), "the same pod");
    assert!(p.metadata.deletion_timestamp.is_none(), "not being deleted");
    assert!(later > first, "the thawed source counts on ({first} -> {later})");
    let line = first_log_line(ns, &source.name_any(), "app").unwrap_or_default();
    assert!(
        line.starts_with("started fresh"),
        "one container, never restarted: {line}"
    );
    must(&["uncordon", "node-a"]);
    must(&["delete", "namespace", ns, "--wait=false"]);
    Ok(())
}

/// Scenario 27: the drain waits for the state, not for kubectl's retries. kubectl drain sleeps
/// 5 s after every 429; the eviction webhook holds the first eviction open instead and answers
/// it as soon as the migration's state is verified on the target. The drain then needs a
/// single eviction per pod: no "will retry" line, the webhook's hold counted once, ended by
/// the safe state (not by its deadline), and the restored pod has the memory the source had.
/// Before the hold, every migrated pod cost the drain at least one 5 s retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the local cluster: scripts/e2e.sh"]
async fn s27_a_drain_waits_for_the_state_not_for_kubectl_retries() -> anyhow::Result<()> {
    let ns = "e2e-hold";
    fresh_namespace(ns);
    let before = start_on_node_a(ns, &opted_in_deployment(ns, "held", "hold", 8 << 20, ""), 1).await?;
    let line = eventually("first log line", Duration::from_secs(30), || async {
        Ok(first_log_line(ns, &before[0].name_any(), "app"))
    })
    .await?;
    let sha = field(&line, "memory_sha256").expect("memory_sha256").to_string();
    let metrics = std::env::var("KUBE_MIGRATE_METRICS_URL")?;
    let safe = "kube_migrate_eviction_hold_seconds_count{outcome=\"allowed_state_safe\"}";
    let expired = "kube_migrate_eviction_hold_seconds_count{outcome=\"expired\"}";
    let (safe_before, expired_before) = (scrape(&metrics, safe), scrape(&metrics, expired));

    let drain = drain_a("e2e=hold");
    let out = drain.all();
    assert!(drain.ok, "drain must complete:\n{out}");
    assert!(
        !out.contains("will retry"),
        "the eviction was held until the state was safe, never retried:\n{out}"
    );
    assert!(
        out.contains("is safe on node"),
        "kubectl printed why it went through:\n{out}"
    );
    assert_eq!(
        scrape(&metrics, safe) - safe_before,
        1.0,
        "one hold, ended by the safe state"
    );
    assert_eq!(scrape(&metrics, expired) - expired_before, 0.0, "no hold ran out");

    migrations_succeeded(ns, 1, Duration::from_secs(120), |_| true).await?;
    let after = running_pods_in(ns, 1).await?;
    assert_ne!(after[0].uid(), before[0].uid());
    assert_ne!(node_of(&after[0]), "node-a");
    let restored = first_log_line(ns, &after[0].name_any(), "app").unwrap_or_default();
    assert!(restored.starts_with("restored from checkpoint image"), "{restored}");
    assert_eq!(field(&restored, "memory_sha256"), Some(sha.as_str()), "{restored}");
    must(&["uncordon", "node-a"]);
    must(&["delete", "namespace", ns, "--wait=false"]);
    Ok(())
}
