//! End-to-end: every migration ends, limits hold, kube-migrate's failures stay contained
//! (issue #11): a burst against the concurrency limits, a webhook outage, a replacement that
//! can never schedule, crossing drains. Run by `scripts/e2e.sh`.

use std::{collections::BTreeSet, time::Duration};

use k8s_openapi::api::core::v1::Pod;
use kube::{Api, ResourceExt, api::ListParams};
use kube_migrate::api::{Phase, PodMigration};
use kube_migrate_e2e::{
    apply, client, controller_lease, drain_a, eventually, first_log_line, fresh_namespace, km_dir, kubectl,
    local_cluster, migrations_succeeded, must, node_of, opted_in_deployment, opted_in_pod, plugin, running_pods_in,
    start_on_node_a,
};

fn burst(n: usize) -> String {
    (0..n)
        .map(|i| opted_in_pod("e2e-burst", &format!("p{i}"), "burst", 8 << 20, None))
        .collect()
}

/// Scenario 11: eight opted-in pods drained at once with `--max-per-node 2` (scripts/e2e.sh):
/// never more than two migrations from node-a are active at any instant, and the targets
/// spread over both other nodes. Before the slots were taken under a lock, seven ran at once
/// and all eight went to one node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the local cluster: scripts/e2e.sh"]
async fn s11_limits_hold_under_a_burst_and_targets_spread() -> anyhow::Result<()> {
    let ns = "e2e-burst";
    fresh_namespace(ns);
    start_on_node_a(ns, &burst(8), 8).await?;
    let pms: Api<PodMigration> = Api::namespaced(client().await, ns);
    let watcher = {
        let pms = pms.clone();
        tokio::spawn(async move {
            let mut peak = 0;
            let mut samples = 0;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(240);
            while tokio::time::Instant::now() < deadline {
                if let Ok(list) = pms.list(&ListParams::default()).await {
                    let active = list.items.iter().filter(|m| m.phase().is_active()).count();
                    peak = peak.max(active);
                    samples += 1;
                    if list.items.len() == 8 && list.items.iter().all(|m| m.phase().is_terminal()) {
                        break;
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (peak, samples)
        })
    };
    // kubectl blocks its thread: run it beside the sampler, not on the test's runtime thread.
    let drain = tokio::task::spawn_blocking(|| drain_a("e2e=burst")).await?;
    assert!(drain.ok, "drain must complete:\n{}", drain.all());
    let done = migrations_succeeded(ns, 8, Duration::from_secs(240), |_| true).await?;
    let (peak, samples) = watcher.await?;
    println!("peak active migrations from node-a: {peak} over {samples} samples");
    assert!(samples > 10, "the watcher sampled the burst");
    assert!(peak <= 2, "--max-per-node 2 was exceeded: {peak} active at once");
    let targets: BTreeSet<String> = done
        .iter()
        .filter_map(|m| m.status.as_ref().and_then(|s| s.target_node.clone()))
        .collect();
    println!("targets: {targets:?}");
    // With two slots for eight, most waited for one (six when every first step comes before
    // the first slot frees), and their timelines say when they began to.
    let queued = done
        .iter()
        .filter(|m| {
            m.status
                .as_ref()
                .is_some_and(|s| s.timeline.iter().any(|t| t.step == "queued"))
        })
        .count();
    println!("queued for a slot: {queued} of 8");
    assert!(queued >= 4, "the queued step is recorded: {queued} of 8");
    assert_eq!(
        targets,
        BTreeSet::from(["node-b".to_string(), "node-c".to_string()]),
        "targets spread over the eligible nodes"
    );
    must(&["uncordon", "node-a"]);
    must(&["delete", "namespace", ns, "--wait=false"]);
    Ok(())
}

const OUTAGE: &str = r#"
apiVersion: v1
kind: Pod
metadata: { name: plain, namespace: e2e-outage-plain, labels: { e2e-outage: plain } }
spec:
  terminationGracePeriodSeconds: 1
  containers: [{ name: app, image: registry.local/web:1 }]
---
apiVersion: v1
kind: Pod
metadata: { name: kept, namespace: e2e-outage-kept, labels: { e2e-outage: kept }, annotations: { migrate.io/stateful: "true" } }
spec:
  terminationGracePeriodSeconds: 1
  containers: [{ name: app, image: registry.local/counter:1 }]
"#;

/// Scenario 12: with kube-migrate's webhook down, an unannotated pod in a namespace that
/// holds no opted-in pod is evicted as usual (before the namespace scope, every eviction in
/// every user namespace failed), while the opted-in pod's namespace stays protected: its
/// eviction fails closed instead of losing the state.
#[tokio::test]
#[ignore = "needs the local cluster: scripts/e2e.sh"]
async fn s12_a_webhook_outage_blocks_only_namespaces_with_opted_in_pods() -> anyhow::Result<()> {
    fresh_namespace("e2e-outage-plain");
    // A namespace that held an opted-in pod, deleted and re-created under the same name, is a
    // new namespace: it must be labelled again (a name cache once said "done already").
    fresh_namespace("e2e-outage-kept");
    apply(
        r#"{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "first", "namespace": "e2e-outage-kept",
            "annotations": {"migrate.io/stateful": "true"}},
            "spec": {"containers": [{"name": "app", "image": "registry.local/counter:1"}]}}"#,
    );
    eventually("the first namespace labelled", Duration::from_secs(30), || async {
        let labels = must(&[
            "get",
            "namespace",
            "e2e-outage-kept",
            "-o",
            "jsonpath={.metadata.labels}",
        ]);
        Ok(labels.contains("migrate.io/opted-in").then_some(()))
    })
    .await?;
    fresh_namespace("e2e-outage-kept");
    must(&["uncordon", "node-a"]);
    must(&["cordon", "node-b"]);
    must(&["cordon", "node-c"]);
    apply(OUTAGE);
    let started = async {
        running_pods_in("e2e-outage-plain", 1).await?;
        running_pods_in("e2e-outage-kept", 1).await
    }
    .await;
    must(&["uncordon", "node-b"]);
    must(&["uncordon", "node-c"]);
    let kept = started?.remove(0);
    let labels = must(&[
        "get",
        "namespace",
        "e2e-outage-kept",
        "-o",
        "jsonpath={.metadata.labels}",
    ]);
    assert!(
        labels.contains("migrate.io/opted-in"),
        "labelled when the pod was created: {labels}"
    );
    let labels = must(&[
        "get",
        "namespace",
        "e2e-outage-plain",
        "-o",
        "jsonpath={.metadata.labels}",
    ]);
    assert!(!labels.contains("migrate.io/opted-in"), "{labels}");

    local_cluster(&["kill-webhook"]);
    let drain = |selector: &str, timeout: &str| {
        let run = kubectl(&[
            "drain",
            "node-a",
            "--ignore-daemonsets",
            "--force",
            "--pod-selector",
            selector,
            timeout,
        ]);
        println!(
            "---- kubectl drain ({selector}) with the webhook down ----\n{}",
            run.all()
        );
        run
    };
    let plain = drain("e2e-outage=plain", "--timeout=60s");
    let kept_drain = drain("e2e-outage=kept", "--timeout=15s");
    local_cluster(&["start-webhook"]);
    must(&["uncordon", "node-a"]);

    assert!(
        plain.ok,
        "an unannotated pod outside opted-in namespaces drains during an outage"
    );
    assert!(!kept_drain.ok, "the opted-in namespace fails closed");
    assert!(
        kept_drain.all().contains("eviction.migrate.io"),
        "the drain names the webhook"
    );
    let pods: Api<Pod> = Api::namespaced(client().await, "e2e-outage-kept");
    let still = pods.get_opt("kept").await?;
    assert_eq!(
        still.and_then(|p| p.uid()),
        kept.uid(),
        "the opted-in pod was not evicted"
    );
    must(&[
        "delete",
        "namespace",
        "e2e-outage-plain",
        "e2e-outage-kept",
        "--wait=false",
    ]);
    Ok(())
}

/// Scenario 14: the target is tainted `NoSchedule` once it was chosen, so the replacement
/// pinned there can never schedule. The migration must end at its Restoring deadline (45 s in
/// the local cluster) with the scheduler's reason, free its slot, and the workload must run
/// again elsewhere, fresh. Before the deadlines, such a migration stayed `Restoring` forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the local cluster: scripts/e2e.sh"]
async fn s14_a_replacement_that_can_never_schedule_ends_at_its_deadline() -> anyhow::Result<()> {
    let ns = "e2e-stuck";
    fresh_namespace(ns);
    start_on_node_a(ns, &opted_in_deployment(ns, "stuck", "stuck", 512 << 20, ""), 1).await?;
    let pms: Api<PodMigration> = Api::namespaced(client().await, ns);
    // Taint the target as soon as it is chosen (the 512 MiB checkpoint then takes seconds),
    // long before the replacement is released: placement chose a node the scheduler refuses.
    let tainter = {
        let pms = pms.clone();
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            loop {
                let list = pms.list(&ListParams::default()).await?.items;
                let target = list.into_iter().find_map(|m| {
                    let s = m.status?;
                    (s.phase != Phase::Pending).then_some(s.target_node).flatten()
                });
                if let Some(target) = target {
                    must(&["taint", "node", &target, "e2e-block=true:NoSchedule", "--overwrite"]);
                    return anyhow::Ok(target);
                }
                anyhow::ensure!(tokio::time::Instant::now() < deadline, "no target chosen in 60 s");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let drain = tokio::task::spawn_blocking(|| drain_a("e2e=stuck")).await?;
    let target = tainter.await??;
    let result = async {
        assert!(drain.ok, "drain must complete:\n{}", drain.all());
        let m = eventually("the migration ends", Duration::from_secs(150), || {
            let pms = pms.clone();
            async move {
                Ok(pms
                    .list(&ListParams::default())
                    .await?
                    .items
                    .into_iter()
                    .find(|m| m.phase().is_terminal()))
            }
        })
        .await?;
        let s = m.status.clone().unwrap_or_default();
        println!("{}: {} {:?}: {:?}", m.name_any(), s.phase, s.reason, s.message);
        assert_eq!(s.phase, Phase::Failed);
        assert_eq!(s.reason.as_deref(), Some("StateLost"));
        let message = s.message.unwrap_or_default();
        assert!(message.contains("Restoring exceeded its deadline of 45s"), "{message}");
        assert!(
            message.contains("not scheduled"),
            "the scheduler's reason is kept: {message}"
        );
        let restoring = s
            .phases
            .iter()
            .find(|t| t.phase == Phase::Restoring)
            .and_then(|t| t.seconds);
        assert!(
            restoring.is_some_and(|t| (45.0..90.0).contains(&t)),
            "ended at its deadline: {restoring:?}"
        );
        // The workload runs again, fresh, on a node that takes it.
        let after = running_pods_in(ns, 1).await?;
        assert_ne!(node_of(&after[0]), target);
        let line = first_log_line(ns, &after[0].name_any(), "app").unwrap_or_default();
        assert!(line.starts_with("started fresh"), "{line}");
        anyhow::Ok(())
    }
    .await;
    must(&["taint", "node", &target, "e2e-block-"]);
    must(&["uncordon", "node-a"]);
    result?;
    must(&["delete", "namespace", ns, "--wait=false"]);
    Ok(())
}

fn crossing_pods() -> String {
    ["node-a", "node-b"]
        .iter()
        .flat_map(|node| {
            (0..2).map(move |i| opted_in_pod("e2e-cross", &format!("{node}-{i}"), "cross", 16 << 20, Some(node)))
        })
        .collect()
}

/// Scenario 15: node-a and node-b are drained at the same moment. No pod may land on a node
/// being drained: every migration targets node-c (the choice is re-checked against the API
/// server before the source stops), both drains complete, nothing is lost. The issue saw
/// node-a's pods sent to node-b while it was being drained, and 74 s of downtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the local cluster: scripts/e2e.sh"]
async fn s15_crossing_drains_never_target_a_node_being_drained() -> anyhow::Result<()> {
    let ns = "e2e-cross";
    fresh_namespace(ns);
    for node in ["node-a", "node-b", "node-c"] {
        must(&["uncordon", node]);
    }
    apply(&crossing_pods());
    running_pods_in(ns, 4).await?;
    let drain = |node: &'static str| {
        tokio::task::spawn_blocking(move || {
            let run = kubectl(&[
                "drain",
                node,
                "--ignore-daemonsets",
                "--force",
                "--timeout=300s",
                "--pod-selector",
                "e2e=cross",
            ]);
            println!("---- kubectl drain {node} ----\n{}", run.all());
            run
        })
    };
    let (a, b) = tokio::join!(drain("node-a"), drain("node-b"));
    let (a, b) = (a?, b?);
    let done = migrations_succeeded(ns, 4, Duration::from_secs(240), |_| true).await;
    must(&["uncordon", "node-a"]);
    must(&["uncordon", "node-b"]);
    assert!(a.ok && b.ok, "both drains complete");
    let done = done?;
    for m in &done {
        let target = m.status.as_ref().and_then(|s| s.target_node.clone());
        assert_eq!(
            target.as_deref(),
            Some("node-c"),
            "{} went to a node being drained",
            m.name_any()
        );
    }
    let after = running_pods_in(ns, 4).await?;
    assert!(after.iter().all(|p| node_of(p) == "node-c"));
    must(&["delete", "namespace", ns, "--wait=false"]);
    Ok(())
}

/// Scenario 16: two controller replicas; the leader stalls (SIGSTOP) in the middle of a
/// 1 GiB migration, past its Lease (512 MiB went over in 1.2 s on a quiet machine, sometimes
/// before the stall landed). The standby takes over only once it has seen no renewal
/// for a full term, resumes the migration without sending the verified archive again, and
/// finishes it; when the old leader wakes up it stops acting and the migration never moves
/// backwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the local cluster: scripts/e2e.sh"]
async fn s16_a_stalled_leader_is_fenced_and_the_standby_resumes() -> anyhow::Result<()> {
    let ns = "e2e-fence";
    fresh_namespace(ns);
    local_cluster(&["start-webhook", "1"]);
    start_on_node_a(ns, &opted_in_pod(ns, "ledger", "fence", 1 << 30, None), 1).await?;
    let run = plugin(&["pod", "ledger", "-n", ns, "--to", "node-b", "--no-wait"]);
    assert!(run.ok, "{}", run.all());
    let pms: Api<PodMigration> = Api::namespaced(client().await, ns);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let list = pms.list(&ListParams::default()).await?.items;
        if list.iter().any(|m| m.phase() == Phase::Transferring) {
            break;
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "never reached Transferring");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The leader starts the push once its own watch shows Transferring, as this poll does:
    // give it a moment so that it is paused mid-push (1 GiB takes ~4 s), which is the case
    // this scenario is about (pausing before the push started made it flaky).
    tokio::time::sleep(Duration::from_secs(1)).await;
    local_cluster(&["pause-webhook", "0"]);
    let paused = tokio::time::Instant::now();
    let done = migrations_succeeded(ns, 1, Duration::from_secs(120), |_| true).await;
    let took_over_after = paused.elapsed();
    local_cluster(&["resume-webhook", "0"]);
    let done = done?;
    let holder = controller_lease(".spec.holderIdentity");
    assert_eq!(holder, "webhook-1", "the standby leads");
    assert!(
        took_over_after >= Duration::from_secs(15),
        "the standby waited a full Lease term: {took_over_after:?}"
    );
    let before = done[0].status.clone().unwrap_or_default();
    let phases: Vec<Phase> = before.phases.iter().map(|t| t.phase).collect();
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
        "one pass, no phase repeated"
    );
    let events = must(&[
        "get",
        "events",
        "-n",
        ns,
        "--field-selector",
        "reason=BuildingImage",
        "-o",
        "jsonpath={.items[*].message}",
    ]);
    assert!(
        events.contains("already verified there before"),
        "the new leader did not send the verified archive again: {events}"
    );
    // The old leader wakes up: it must notice it lost the Lease and change nothing.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let after = pms.get(&done[0].name_any()).await?.status.unwrap_or_default();
    assert_eq!(after.phase, Phase::Succeeded);
    assert_eq!(after.phases, before.phases, "nothing moved backwards");
    let log = std::fs::read_to_string(km_dir().join("logs/webhook.log"))?;
    assert!(log.contains("lost leadership"), "the stalled leader stood down");
    must(&["delete", "namespace", ns, "--wait=false"]);
    Ok(())
}

fn cpu_pod(ns: &str, name: &str, node: Option<&str>, cpu: &str, opted_in: bool) -> String {
    let node = node.map(|n| format!("\n  nodeName: {n}")).unwrap_or_default();
    let annotations = if opted_in { r#"migrate.io/stateful: "true""# } else { "" };
    format!(
        r#"---
apiVersion: v1
kind: Pod
metadata: {{ name: {name}, namespace: {ns}, labels: {{ e2e: capacity }}, annotations: {{ {annotations} }} }}
spec:{node}
  terminationGracePeriodSeconds: 1
  containers: [{{ name: app, image: registry.local/counter:1, resources: {{ requests: {{ cpu: "{cpu}" }} }} }}]
"#
    )
}

/// Scenario 17: two opted-in pods of 1.5 CPU each on node-a; node-b has room for one (a
/// 2-CPU filler runs there), node-c is cordoned. The first migration reserves node-b; the
/// second fails at once with the capacity reason and follows `on-failure` (evict), so the
/// drain completes and nothing hangs. Before the reservations, both chose node-b and the
/// second replacement stayed Pending, its migration `Restoring` for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the local cluster: scripts/e2e.sh"]
async fn s17_room_for_one_of_two_fails_the_other_with_its_reason() -> anyhow::Result<()> {
    let ns = "e2e-capacity";
    fresh_namespace(ns);
    let pods = [
        cpu_pod(ns, "big-0", None, "1500m", true),
        cpu_pod(ns, "big-1", None, "1500m", true),
    ]
    .concat();
    start_on_node_a(ns, &pods, 2).await?;
    apply(&cpu_pod(ns, "filler", Some("node-b"), "2", false));
    running_pods_in(ns, 3).await?;
    must(&["cordon", "node-c"]);
    let drain = tokio::task::spawn_blocking(|| drain_a("e2e=capacity")).await?;
    let pms: Api<PodMigration> = Api::namespaced(client().await, ns);
    let ended = eventually("both migrations ended", Duration::from_secs(120), || {
        let pms = pms.clone();
        async move {
            let list = pms.list(&ListParams::default()).await?.items;
            Ok((list.len() == 2 && list.iter().all(|m| m.phase().is_terminal())).then_some(list))
        }
    })
    .await;
    must(&["uncordon", "node-c"]);
    must(&["uncordon", "node-a"]);
    let ended = ended?;
    assert!(drain.ok, "the drain completes:\n{}", drain.all());
    let succeeded: Vec<_> = ended.iter().filter(|m| m.phase() == Phase::Succeeded).collect();
    let failed: Vec<_> = ended.iter().filter(|m| m.phase() == Phase::Failed).collect();
    assert_eq!((succeeded.len(), failed.len()), (1, 1), "one migrates, one fails");
    assert_eq!(succeeded[0].target_node(), Some("node-b"));
    let s = failed[0].status.clone().unwrap_or_default();
    let message = s.message.unwrap_or_default();
    assert_eq!(s.reason.as_deref(), Some("NoTarget"), "{message}");
    assert!(message.contains("node-b has insufficient cpu"), "{message}");
    assert!(
        s.source_stop_requested_at.is_none(),
        "refused before the source was touched"
    );
    must(&["delete", "namespace", ns, "--wait=false"]);
    Ok(())
}

/// Scenario 19: the replacement keeps the pod's required anti-affinity. `db-0` (opted in, on
/// node-a) must never share a node with another `app=db` pod; `db-1` runs on node-b, the
/// least loaded node, and node-c is busier. The target is node-c, and the replacement runs
/// there with the state. Before, placement ignored inter-pod rules: it chose node-b, the
/// scheduler refused the pinned replacement, and the migration ended at its deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the local cluster: scripts/e2e.sh"]
async fn s19_the_target_respects_pod_anti_affinity() -> anyhow::Result<()> {
    let ns = "e2e-anti";
    fresh_namespace(ns);
    let db = |name: &str, node: &str, annotations: &str| {
        format!(
            r#"---
apiVersion: v1
kind: Pod
metadata: {{ name: {name}, namespace: {ns}, labels: {{ app: db, e2e: {name} }}, annotations: {{ {annotations} }} }}
spec:
  nodeName: {node}
  terminationGracePeriodSeconds: 1
  affinity:
    podAntiAffinity:
      requiredDuringSchedulingIgnoredDuringExecution:
        - {{ labelSelector: {{ matchLabels: {{ app: db }} }}, topologyKey: kubernetes.io/hostname }}
  containers: [{{ name: app, image: registry.local/counter:1 }}]
"#
        )
    };
    must(&["uncordon", "node-a"]);
    apply(
        &[
            db("db-0", "node-a", r#"migrate.io/stateful: "true""#),
            db("db-1", "node-b", ""),
            cpu_pod(ns, "filler", Some("node-c"), "1", false),
        ]
        .concat(),
    );
    let before = running_pods_in(ns, 3).await?;
    let uid = before
        .iter()
        .find(|p| p.name_any() == "db-0")
        .and_then(|p| p.metadata.uid.clone())
        .expect("db-0 runs");
    let drain = tokio::task::spawn_blocking(|| drain_a("e2e=db-0")).await?;
    must(&["uncordon", "node-a"]);
    assert!(drain.ok, "the drain completes:\n{}", drain.all());
    let done = migrations_succeeded(ns, 1, Duration::from_secs(120), |_| true).await?;
    assert_eq!(done[0].target_node(), Some("node-c"), "node-b holds db-1");
    let pods: Api<Pod> = Api::namespaced(client().await, ns);
    let after = pods.get("db-0").await?;
    assert_ne!(after.metadata.uid.as_deref(), Some(uid.as_str()), "a new pod object");
    assert_eq!(node_of(&after), "node-c");
    must(&["delete", "namespace", ns, "--wait=false"]);
    Ok(())
}
