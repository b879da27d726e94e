use super::*;
use crate::api::{PhaseTiming, PodMigrationSpec, Trigger};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use serde_json::json;

fn slot(key: &str, source: &str, target: Option<&str>, cpu: Option<&str>) -> Slot {
    let pod: Option<Arc<Pod>> = cpu.map(|cpu| {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": { "name": key },
                "spec": { "nodeName": source, "containers": [{ "name": "c", "image": "x",
                    "resources": { "requests": { "cpu": cpu } } }] },
            }))
            .unwrap(),
        )
    });
    Slot {
        key: key.into(),
        source_node: source.into(),
        target_node: target.map(str::to_string),
        pod,
    }
}

#[test]
fn the_gate_counts_slots_per_source_node_and_in_total_but_not_its_own() {
    let held = vec![slot("ns/a", "node-a", None, None), slot("ns/b", "node-a", None, None)];
    let q = concurrency_gate(&held, "ns/c", "node-a", 2, 10).unwrap_err();
    assert_eq!(q.reason, "ConcurrencyLimit");
    assert!(q.message.contains("2/2 active on node node-a"), "{}", q.message);
    assert_eq!(concurrency_gate(&held, "ns/c", "node-b", 2, 10), Ok(()));
    assert_eq!(concurrency_gate(&held, "ns/a", "node-a", 2, 10), Ok(()), "own slot");
    let q = concurrency_gate(&held, "ns/c", "node-b", 2, 2).unwrap_err();
    assert!(q.message.contains("2/2 in the cluster"), "{}", q.message);
}

#[test]
fn a_burst_admits_exactly_the_limit() {
    // What the leader does under its lock: check, then hold. Eight arrive at once.
    let mut held: Vec<Slot> = Vec::new();
    let mut admitted = 0;
    for i in 0..8 {
        let key = format!("ns/p{i}");
        if concurrency_gate(&held, &key, "node-a", 2, 10).is_ok() {
            held.push(slot(&key, "node-a", Some("node-b"), None));
            admitted += 1;
        }
    }
    assert_eq!(admitted, 2);
}

#[test]
fn reservations_place_in_flight_pods_on_their_targets() {
    let held = vec![
        slot("ns/a", "node-a", Some("node-b"), Some("500m")),
        slot("ns/b", "node-a", None, Some("500m")),
        slot("ns/c", "node-a", Some("node-c"), None),
        slot("ns/me", "node-a", Some("node-b"), Some("1")),
    ];
    let r = reservations(&held, "ns/me");
    assert_eq!(r.len(), 1, "only slots with a target and a pod reserve, never my own");
    assert_eq!(r[0].spec.as_ref().unwrap().node_name.as_deref(), Some("node-b"));
}

fn status_in(phase: Phase, started: i64) -> PodMigrationStatus {
    PodMigrationStatus {
        phase,
        phases: vec![PhaseTiming {
            phase,
            started_at: MicroTime(Timestamp::from_second(started).unwrap()),
            finished_at: None,
            seconds: None,
        }],
        ..Default::default()
    }
}

#[test]
fn every_active_phase_has_a_deadline_and_terminal_ones_none() {
    let d = Deadlines::default();
    for phase in Phase::ALL {
        assert_eq!(d.budget(phase).is_some(), !phase.is_terminal(), "{phase}");
    }
    let s = status_in(Phase::Restoring, 1_000_000);
    assert_eq!(d.deadline(&s).unwrap().as_second(), 1_000_300);
    assert_eq!(d.overdue(&s, Timestamp::from_second(1_000_299).unwrap()), None);
    assert_eq!(d.overdue(&s, Timestamp::from_second(1_000_310).unwrap()), Some(10.0));
    assert_eq!(d.deadline(&status_in(Phase::Failed, 1_000_000)), None);
}

#[test]
fn backoff_grows_caps_and_jitters() {
    assert_eq!(backoff(1, 0.5), Duration::from_secs(1));
    assert_eq!(backoff(3, 0.5), Duration::from_secs(4));
    assert_eq!(backoff(30, 0.5), Duration::from_secs(60));
    assert!(backoff(30, 0.99) <= Duration::from_secs(60));
    assert_eq!(backoff(3, 0.0), Duration::from_secs(2));
    assert!(backoff(3, 0.99) > Duration::from_secs(5));
}

fn pdb(name: &str, selector: serde_json::Value, allowed: i32) -> PodDisruptionBudget {
    serde_json::from_value(json!({
        "metadata": { "name": name },
        "spec": { "selector": selector },
        "status": { "disruptionsAllowed": allowed, "currentHealthy": 1, "desiredHealthy": 1, "expectedPods": 1 },
    }))
    .unwrap()
}

#[test]
fn pdbs_block_only_when_they_select_the_pod_and_allow_nothing() {
    let pod: Pod =
        serde_json::from_value(json!({ "metadata": { "name": "db-0", "labels": { "app": "db", "tier": "data" } } }))
            .unwrap();
    let pdbs = vec![
        pdb("other", json!({ "matchLabels": { "app": "web" } }), 0),
        pdb("roomy", json!({ "matchLabels": { "app": "db" } }), 1),
        pdb(
            "expr",
            json!({ "matchExpressions": [{ "key": "tier", "operator": "In", "values": ["data"] }] }),
            0,
        ),
    ];
    assert_eq!(blocking_pdb(&pdbs, &pod).unwrap().name_any(), "expr");
    let notin = vec![pdb(
        "notin",
        json!({ "matchExpressions": [{ "key": "tier", "operator": "NotIn", "values": ["data"] }] }),
        0,
    )];
    assert!(blocking_pdb(&notin, &pod).is_none());
    // policy/v1: an empty selector selects every pod of the namespace.
    let all = vec![pdb("all", json!({}), 0)];
    assert_eq!(blocking_pdb(&all, &pod).unwrap().name_any(), "all");
}

#[test]
fn restore_trouble_and_waits_say_why() {
    let crash: Pod = serde_json::from_value(json!({ "metadata": { "name": "r" }, "status": { "containerStatuses": [{
        "name": "db", "image": "x", "imageID": "", "ready": false, "restartCount": 3,
        "state": { "waiting": { "reason": "CrashLoopBackOff", "message": "back-off" } } }] } }))
    .unwrap();
    assert!(
        restore_trouble(&crash)
            .unwrap()
            .contains("container db: CrashLoopBackOff")
    );
    let unschedulable: Pod = serde_json::from_value(json!({ "metadata": { "name": "r" }, "status": { "conditions": [{
        "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
        "message": "0/3 nodes are available: 1 Insufficient cpu." }] } }))
    .unwrap();
    assert_eq!(restore_trouble(&unschedulable), None);
    assert!(restore_wait(&unschedulable).contains("Insufficient cpu"));
}

#[test]
fn slot_of_a_migration_with_a_bound_replacement_reserves_nothing() {
    let mut m = PodMigration::new(
        "db-0-1",
        PodMigrationSpec {
            pod_name: "db-0".into(),
            pod_uid: "u".into(),
            source_node: "node-a".into(),
            target_node: None,
            trigger: Trigger::Drain,
            policy: Default::default(),
            mode: Default::default(),
            restore_from: None,
        },
    );
    m.metadata.namespace = Some("ns".into());
    let pod = Arc::new(Pod::default());
    m.status = Some(status_in(Phase::Restoring, 0));
    assert!(Slot::of(&m, Some(Arc::clone(&pod))).pod.is_some());
    m.status.as_mut().unwrap().replacement = Some(crate::api::PodRef {
        name: "db-0".into(),
        uid: None,
    });
    let s = Slot::of(&m, Some(pod));
    assert!(s.pod.is_none());
    assert_eq!(s.key, "ns/db-0-1");
}

#[test]
fn the_source_is_stopped_when_every_container_reports_terminated() {
    let pod = |states: serde_json::Value| -> Pod {
        serde_json::from_value(json!({
            "metadata": { "name": "db-0" },
            "spec": { "containers": [{ "name": "a", "image": "x" }, { "name": "b", "image": "x" }] },
            "status": { "containerStatuses": states },
        }))
        .unwrap()
    };
    let status = |name: &str, state: serde_json::Value| json!({ "name": name, "image": "x", "imageID": "", "ready": false, "restartCount": 0, "state": state });
    let done = |at: &str| json!({ "terminated": { "exitCode": 137, "finishedAt": at } });
    let both = pod(json!([
        status("a", done("2026-11-28T10:00:01Z")),
        status("b", done("2026-11-28T10:00:03Z"))
    ]));
    assert_eq!(
        all_stopped_at(&both).unwrap().as_second(),
        Timestamp::from_second(1_795_860_003).unwrap().as_second()
    );
    let one_running = pod(json!([
        status("a", done("2026-11-28T10:00:01Z")),
        status("b", json!({ "running": {} }))
    ]));
    assert_eq!(all_stopped_at(&one_running), None);
    let one_reported = pod(json!([status("a", done("2026-11-28T10:00:01Z"))]));
    assert_eq!(
        all_stopped_at(&one_reported),
        None,
        "a container without status has not stopped"
    );
}

#[test]
fn a_recorded_retry_time_holds_the_step_back() {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
    let now = Timestamp::from_second(1_000_000).unwrap();
    let mut s = PodMigrationStatus::default();
    assert_eq!(wait_for_retry(&s, now), None);
    s.retry_at = Some(MicroTime(Timestamp::from_millisecond(1_000_002_500).unwrap()));
    assert_eq!(wait_for_retry(&s, now), Some(Duration::from_millis(2500)));
    assert_eq!(wait_for_retry(&s, Timestamp::from_second(1_000_003).unwrap()), None);
}

#[test]
fn all_running_needs_every_container_running() {
    let pod = |states: serde_json::Value| -> Pod {
        serde_json::from_value(json!({
            "spec": { "containers": [{ "name": "a" }, { "name": "b" }] },
            "status": { "containerStatuses": states }
        }))
        .unwrap()
    };
    let running = json!({ "running": { "startedAt": "2026-11-28T10:00:00Z" } });
    let waiting = json!({ "waiting": { "reason": "ContainerCreating" } });
    let status = |n: &str, s: &serde_json::Value| {
        json!({ "name": n, "ready": false, "restartCount": 0,
        "image": "i", "imageID": "", "state": s })
    };
    assert!(all_running(&pod(json!([status("a", &running), status("b", &running)]))));
    assert!(!all_running(&pod(json!([
        status("a", &running),
        status("b", &waiting)
    ]))));
    assert!(!all_running(&pod(json!([status("a", &running)]))), "b not reported yet");
    assert!(!all_running(&pod(json!([]))));
}

#[test]
fn a_retry_never_waits_past_the_deadline() {
    let now = Timestamp::from_second(1_000_000).unwrap();
    let deadline = Timestamp::from_second(1_000_003).unwrap();
    assert_eq!(
        retry_wait(Duration::from_secs(16), Some(deadline), now),
        Duration::from_millis(3050)
    );
    assert_eq!(
        retry_wait(Duration::from_secs(1), Some(deadline), now),
        Duration::from_secs(1)
    );
    assert_eq!(retry_wait(Duration::from_secs(16), None, now), Duration::from_secs(16));
    // Already past: run again at once (the step then fails on the deadline).
    let past = Timestamp::from_second(999_990).unwrap();
    assert_eq!(
        retry_wait(Duration::from_secs(16), Some(past), now),
        Duration::from_millis(50)
    );
}

#[test]
fn a_pod_wakes_the_migration_it_restores_and_the_one_it_is_the_source_of() {
    let pod: Pod = serde_json::from_value(json!({ "metadata": {
        "name": "db-0", "namespace": "shop", "uid": "0c9a8d74-9cb7-44dd-b98e-09fd62def2f4",
        "annotations": { "migrate.io/stateful": "true", "migrate.io/restore-of": "db-0-11111111" } } }))
    .unwrap();
    let refs: Vec<String> = migrations_of_pod(&pod)
        .iter()
        .map(|r| format!("{}/{}", r.namespace.clone().unwrap(), r.name))
        .collect();
    assert_eq!(refs, ["shop/db-0-11111111", "shop/db-0-0c9a8d74"]);
    let plain: Pod =
        serde_json::from_value(json!({ "metadata": { "name": "web", "namespace": "shop", "uid": "u" } })).unwrap();
    assert!(migrations_of_pod(&plain).is_empty());
}

#[test]
fn a_target_is_lost_when_deleted_or_not_ready_with_nothing_restored_there() {
    let node = |ready: &str| -> Node {
        serde_json::from_value(json!({
            "metadata": { "name": "node-b" },
            "status": { "conditions": [{ "type": "Ready", "status": ready, "reason": "NodeStatusUnknown" }] }
        }))
        .unwrap()
    };
    let replacement = |state: serde_json::Value| -> Pod {
        serde_json::from_value(json!({
            "metadata": { "name": "db-0" },
            "status": { "containerStatuses": [{ "name": "app", "image": "x", "imageID": "", "ready": false,
                "restartCount": 0, "state": state }] }
        }))
        .unwrap()
    };
    let waiting = replacement(json!({ "waiting": { "reason": "ContainerCreating" } }));
    let running = replacement(json!({ "running": {} }));
    let gated: Pod = serde_json::from_value(json!({ "metadata": { "name": "db-0" } })).unwrap();

    assert_eq!(target_lost(None, &[&running]).as_deref(), Some("its Node was deleted"));
    assert_eq!(target_lost(Some(&node("True")), &[&waiting]), None);
    assert_eq!(
        target_lost(Some(&node("Unknown")), &[&waiting, &gated]).as_deref(),
        Some("it is not Ready (NodeStatusUnknown) and nothing was restored there")
    );
    // A copy may be running behind a partition: never restore a second one.
    assert_eq!(target_lost(Some(&node("Unknown")), &[&running]), None);
}

#[test]
fn a_replacement_the_webhook_never_saw_is_recognised() {
    let stopped: Timestamp = "2026-11-28T10:00:00.700Z".parse().unwrap();
    let pod = |created: &str, annotations: serde_json::Value, gated: bool, uid: &str, owner: &str| -> Pod {
        serde_json::from_value(json!({
            "metadata": {
                "name": "keeper-abc", "namespace": "shop", "uid": uid, "creationTimestamp": created,
                "annotations": annotations,
                "ownerReferences": [{ "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "keeper-1",
                                      "uid": owner, "controller": true }]
            },
            "spec": {
                "containers": [{ "name": "app", "image": "app:1" }],
                "schedulingGates": if gated { json!([{ "name": crate::api::RESTORE_GATE }]) } else { json!([]) }
            }
        }))
        .unwrap()
    };
    let slipped = pod("2026-11-28T10:00:01Z", json!({}), false, "new", "rs");
    assert!(slipped_through(&slipped, "rs", "source", &stopped));
    // Within the second of the stop (creation times are whole seconds).
    assert!(slipped_through(
        &pod("2026-11-28T10:00:00Z", json!({}), false, "new", "rs"),
        "rs",
        "source",
        &stopped
    ));
    for (why, other) in [
        (
            "created before the stop",
            pod("2026-11-28T09:59:59Z", json!({}), false, "new", "rs"),
        ),
        (
            "the source itself",
            pod("2026-11-28T10:00:01Z", json!({}), false, "source", "rs"),
        ),
        (
            "another owner",
            pod("2026-11-28T10:00:01Z", json!({}), false, "new", "other-rs"),
        ),
        ("gated", pod("2026-11-28T10:00:01Z", json!({}), true, "new", "rs")),
        (
            "bound to a migration",
            pod(
                "2026-11-28T10:00:01Z",
                json!({ crate::api::RESTORE_OF: "keeper-abc-1234" }),
                false,
                "new",
                "rs",
            ),
        ),
        (
            "gated for the owner",
            pod(
                "2026-11-28T10:00:01Z",
                json!({ crate::api::RESTORE_OWNER: "rs" }),
                false,
                "new",
                "rs",
            ),
        ),
    ] {
        assert!(!slipped_through(&other, "rs", "source", &stopped), "{why}");
    }
}

#[test]
fn an_ended_migration_wakes_the_oldest_queued_for_its_slot_its_node_first() {
    let pm = |name: &str, source: &str, created: i64, phase: Phase, queued: Option<&str>| {
        let mut m: PodMigration = serde_json::from_value(json!({
            "apiVersion": "migrate.io/v1alpha1", "kind": "PodMigration",
            "metadata": { "name": name, "namespace": "ns",
                "creationTimestamp": format!("2026-11-29T00:00:{created:02}Z") },
            "spec": { "podName": name, "podUid": "u", "sourceNode": source, "trigger": "Drain" },
        }))
        .unwrap();
        let mut status = PodMigrationStatus {
            phase,
            ..Default::default()
        };
        if let Some(reason) = queued {
            crate::controller::state::set_condition(
                &mut status,
                crate::controller::state::CONDITION_QUEUED,
                true,
                reason,
                "queued",
                Timestamp::now(),
            );
        }
        m.status = Some(status);
        Arc::new(m)
    };
    let all = vec![
        pm("b-old", "node-b", 1, Phase::Pending, Some("ConcurrencyLimit")),
        pm("a-new", "node-a", 9, Phase::Pending, Some("ConcurrencyLimit")),
        pm("a-old", "node-a", 2, Phase::Pending, Some("ConcurrencyLimit")),
        pm("a-pdb", "node-a", 0, Phase::Pending, Some("PodDisruptionBudget")),
        pm("a-fresh", "node-a", 0, Phase::Pending, None),
        pm("a-busy", "node-a", 0, Phase::Transferring, None),
    ];
    let names = |refs: Vec<kube::runtime::reflector::ObjectRef<PodMigration>>| {
        refs.into_iter().map(|r| r.name).collect::<Vec<_>>()
    };
    let ended = pm("done", "node-a", 0, Phase::Succeeded, None);
    assert_eq!(names(queued_to_wake(&ended, &all, 2)), ["a-old", "a-new"]);
    assert_eq!(names(queued_to_wake(&ended, &all, 3)), ["a-old", "a-new", "b-old"]);
    // Only an end frees a slot: other events wake nothing.
    let running = pm("run", "node-a", 0, Phase::Restoring, None);
    assert!(queued_to_wake(&running, &all, 2).is_empty());
}

#[test]
fn base_images_pair_each_container_with_what_it_runs() {
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "db-0", "namespace": "shop"},
        "spec": {"containers": [
            {"name": "db", "image": "quay.io/shop/db:1"},
            {"name": "side", "image": "localhost/side:2"}
        ]},
        "status": {"containerStatuses": [
            {"name": "side", "image": "localhost/side:2", "imageID": "0123abcd", "ready": true, "restartCount": 0},
            {"name": "db", "image": "quay.io/shop/db:1", "imageID": "quay.io/shop/db@sha256:aaaa", "ready": true, "restartCount": 0}
        ]}
    }))
    .unwrap();
    let images = base_images(&pod);
    assert_eq!(images.len(), 2);
    assert_eq!(
        (
            images[0].container.as_str(),
            images[0].image.as_str(),
            images[0].image_id.as_str()
        ),
        ("db", "quay.io/shop/db:1", "quay.io/shop/db@sha256:aaaa")
    );
    assert_eq!(images[1].image_id, "0123abcd");
    // Not started yet: no imageID, the name is all there is.
    let mut fresh = pod.clone();
    fresh.status = None;
    assert!(base_images(&fresh).iter().all(|b| b.image_id.is_empty()));
}
