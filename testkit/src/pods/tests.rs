//! Unit tests of the pods: retry backoff, image ids, pod status.

use super::*;

#[test]
fn backoff_grows_and_is_capped() {
    assert_eq!(backoff(1), Duration::from_secs(1));
    assert_eq!(backoff(2), Duration::from_secs(2));
    assert_eq!(backoff(3), Duration::from_secs(4));
    assert_eq!(backoff(10), BACKOFF_MAX);
}

#[test]
fn fake_image_ids_look_like_digests() {
    let id = fake_image_id("registry.local/counter:1");
    assert!(id.starts_with("registry.local/counter@sha256:"), "{id}");
    assert!(fake_image_id("localhost:5000/x").starts_with("localhost:5000/x@sha256:"));
}

fn pod() -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": "p", "namespace": "ns", "uid": "u1"},
        "spec": {
            "nodeName": "node-a",
            "initContainers": [{"name": "init", "image": "busybox"}],
            "containers": [{"name": "a", "image": "img:1"}, {"name": "b", "image": "img:2"}]
        },
        "status": {"conditions": [
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"},
            {"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI"}
        ]}
    }))
    .unwrap()
}

#[test]
fn pending_status_names_unready_containers_and_keeps_foreign_conditions() {
    let pod = pod();
    let mut tracker = StatusTracker::new(&pod);
    let failure = Failure {
        reason: "ErrImagePull",
        message: "boom".into(),
        attempts: 1,
        retry_at: Instant::now(),
    };
    let views = vec![
        ("a".to_string(), "img:1".to_string(), ContainerView::Creating),
        ("b".to_string(), "img:2".to_string(), ContainerView::Failed(&failure)),
    ];
    let status = tracker.status(&pod, &views, false);
    assert_eq!(status["phase"], "Pending");
    let conditions = status["conditions"].as_array().unwrap();
    let ready = conditions.iter().find(|c| c["type"] == "Ready").unwrap();
    assert_eq!(ready["status"], "False");
    assert_eq!(ready["message"], "containers with unready status: [a b]");
    let scheduled = conditions.iter().find(|c| c["type"] == "PodScheduled").unwrap();
    assert_eq!(scheduled["lastTransitionTime"], "2026-01-01T00:00:00Z");
    assert!(conditions.iter().any(|c| c["type"] == "DisruptionTarget"));
    assert_eq!(
        status["containerStatuses"][0]["state"]["waiting"]["reason"],
        "ContainerCreating"
    );
    assert_eq!(
        status["containerStatuses"][1]["state"]["waiting"]["reason"],
        "ErrImagePull"
    );
    assert_eq!(status["containerStatuses"][1]["state"]["waiting"]["message"], "boom");
    assert_eq!(
        status["initContainerStatuses"][0]["state"]["terminated"]["reason"],
        "Completed"
    );
    // The typed API accepts it.
    let _: k8s_openapi::api::core::v1::PodStatus = serde_json::from_value(status).unwrap();
}

#[tokio::test]
async fn running_then_terminal_status() {
    let pod = pod();
    let mut tracker = StatusTracker::new(&pod);
    let spec = |n: &str| ContainerSpec {
        namespace: "ns".into(),
        pod: "p".into(),
        pod_uid: "u1".into(),
        name: n.into(),
        image: "img".into(),
        mounts: vec![],
        cgroup_root: None,
    };
    let a = Container::start(
        spec("a"),
        "img@sha256:1".into(),
        Memory::from_vec(vec![]),
        Origin::Fresh,
    );
    let b = Container::start(
        spec("b"),
        "img@sha256:2".into(),
        Memory::from_vec(vec![]),
        Origin::Fresh,
    );
    let views = vec![
        ("a".to_string(), "img:1".to_string(), ContainerView::Running(&a)),
        ("b".to_string(), "img:2".to_string(), ContainerView::Running(&b)),
    ];
    let status = tracker.status(&pod, &views, false);
    assert_eq!(status["phase"], "Running");
    assert_eq!(status["podIP"], POD_IP);
    assert_eq!(status["containerStatuses"][0]["ready"], true);
    assert_eq!(status["containerStatuses"][0]["imageID"], "img@sha256:1");
    for c in status["conditions"].as_array().unwrap() {
        if c["type"] != "DisruptionTarget" {
            assert_eq!(c["status"], "True", "{c}");
        }
    }
    a.stop();
    b.stop();
    let views = vec![
        ("a".to_string(), "img:1".to_string(), ContainerView::Terminated(&a)),
        ("b".to_string(), "img:2".to_string(), ContainerView::Terminated(&b)),
    ];
    let status = tracker.status(&pod, &views, true);
    assert_eq!(status["phase"], "Succeeded");
    assert_eq!(status["containerStatuses"][1]["state"]["terminated"]["exitCode"], 0);
    let _: k8s_openapi::api::core::v1::PodStatus = serde_json::from_value(status).unwrap();
}
