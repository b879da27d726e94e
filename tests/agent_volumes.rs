//! emptyDir contents through two real agents over mTLS: packed on the source through a
//! container's mount while it is checkpointed, pushed with the archives and verified on the
//! target, put in place through the replacement's restore init container, which is released
//! only then. The containers and their /proc are stand-ins under each agent's state directory.

mod common;

use std::path::{Path, PathBuf};

use common::agents::{Agent, ID, checkpoint_request, expect_of, refs, setup};
use kube_migrate::agent::{
    api::{EmptyDirSpec, Kind, PushRequest, RESTORED_MARKER, VolumesRequest},
    archive::digest_file,
    client::ClientError,
};

/// A running container `id` of `agent`'s node whose first process is `pid` (None: not
/// started), and its root as the agent sees it through /proc.
fn container(agent: &Agent, id: &str, pid: Option<u32>) -> PathBuf {
    let cgroup = agent.state_dir.join(format!("cgroup/kubepods.slice/crio-{id}.scope"));
    std::fs::create_dir_all(&cgroup).unwrap();
    std::fs::write(cgroup.join("cgroup.freeze"), "0\n").unwrap();
    std::fs::write(
        cgroup.join("cgroup.procs"),
        pid.map(|p| format!("{p}\n")).unwrap_or_default(),
    )
    .unwrap();
    agent.state_dir.join(format!("proc/{}/root", pid.unwrap_or(0)))
}

fn files_of(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                let rel = e.path().strip_prefix(dir).unwrap().display().to_string();
                out.push((rel, std::fs::read(e.path()).unwrap()));
            }
        }
    }
    out.sort();
    out
}

const SOURCE_CTR: &str = "cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc";
const HELPER_CTR: &str = "dddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd";

/// What the controller asks to push: archives and volumes by name and digest.
#[tokio::test]
async fn empty_dir_contents_travel_verified_and_release_the_replacement_once_in_place() {
    let (_env, source, target, controller) = setup().await;
    let root = container(&source, SOURCE_CTR, Some(100));
    let data = root.join("var/lib/app");
    std::fs::create_dir_all(data.join("wal")).unwrap();
    std::fs::write(data.join("counter"), b"4711\n").unwrap();
    std::fs::write(data.join("wal/0001"), common::bytes(2 << 20, 3)).unwrap();
    let before = files_of(&data);

    let mut request = checkpoint_request(&["app"]);
    request.empty_dirs = vec![EmptyDirSpec {
        name: "state".into(),
        container_id: format!("cri-o://{SOURCE_CTR}"),
        mount_path: "/var/lib/app".into(),
    }];
    let answer = controller.checkpoint(&source.url, ID, &request).await.unwrap();
    assert_eq!(answer.volumes.len(), 1);
    let packed = &answer.volumes[0];
    assert_eq!(
        digest_file(Path::new(&packed.path)).unwrap(),
        (packed.digest.clone(), packed.size_bytes)
    );
    // Written after the checkpoint: not in what moves (the source is frozen in real life).
    std::fs::write(data.join("counter"), b"9999\n").unwrap();

    let push = PushRequest {
        target: target.url.clone(),
        archives: refs(&answer.archives),
        target_id: None,
        transfer: Default::default(),
        volumes: refs(&answer.volumes),
    };
    controller
        .expect(&target.url, ID, &expect_of(&push, "node-a"))
        .await
        .unwrap();
    let pushed = controller.push(&source.url, ID, &push).await.unwrap();
    assert!(pushed.bytes > packed.size_bytes, "archives and volume: {pushed:?}");
    let held = controller
        .held(&target.url, ID, Kind::Volume, "state")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(held.digest, packed.digest);

    // The replacement's restore init container has not started yet: ask again later.
    let place = VolumesRequest {
        pod_uid: "5a5a5a5a-0000-4000-8000-000000000002".into(),
        container_id: format!("cri-o://{HELPER_CTR}"),
        volumes: refs(&answer.volumes),
    };
    container(&target, HELPER_CTR, None);
    let err = controller.place_volumes(&target.url, ID, &place).await.unwrap_err();
    assert!(err.retryable(), "{err}");
    let helper = container(&target, HELPER_CTR, Some(200));
    let volume = helper.join("kube-migrate/volumes/state");
    let marker = helper.join("kube-migrate/restore").join(RESTORED_MARKER);
    std::fs::create_dir_all(&volume).unwrap();
    std::fs::create_dir_all(marker.parent().unwrap()).unwrap();

    let placed = controller.place_volumes(&target.url, ID, &place).await.unwrap();
    assert_eq!((placed.filled, placed.bytes), (1, packed.size_bytes));
    assert_eq!(
        files_of(&volume),
        before,
        "the source's files at its checkpoint, byte for byte"
    );
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), ID, "released");

    // Once released the pod runs: a repeated call (new leader) must not unpack over it.
    std::fs::write(volume.join("counter"), b"4712\n").unwrap();
    let again = controller.place_volumes(&target.url, ID, &place).await.unwrap();
    assert_eq!(again.filled, 0);
    assert_eq!(std::fs::read(volume.join("counter")).unwrap(), b"4712\n");
}

#[tokio::test]
async fn a_volume_damaged_after_packing_is_named_corrupt_and_never_held_by_the_target() {
    let (_env, source, target, controller) = setup().await;
    let root = container(&source, SOURCE_CTR, Some(100));
    std::fs::create_dir_all(root.join("data")).unwrap();
    std::fs::write(root.join("data/blob"), common::bytes(1 << 20, 5)).unwrap();
    let mut request = checkpoint_request(&["app"]);
    request.empty_dirs = vec![EmptyDirSpec {
        name: "scratch".into(),
        container_id: format!("cri-o://{SOURCE_CTR}"),
        mount_path: "/data".into(),
    }];
    let answer = controller.checkpoint(&source.url, ID, &request).await.unwrap();
    let packed = &answer.volumes[0];
    let file = std::fs::OpenOptions::new().write(true).open(&packed.path).unwrap();
    file.set_len(packed.size_bytes / 2).unwrap();
    let push = PushRequest {
        target: target.url.clone(),
        archives: Vec::new(),
        target_id: None,
        transfer: Default::default(),
        volumes: refs(&answer.volumes),
    };
    controller
        .expect(&target.url, ID, &expect_of(&push, "node-a"))
        .await
        .unwrap();
    let err = controller.push(&source.url, ID, &push).await.unwrap_err();
    assert!(
        matches!(&err, ClientError::Status { reason, .. } if reason == "archive_corrupt"),
        "{err}"
    );
    assert!(!err.retryable());
    assert!(
        controller
            .held(&target.url, ID, Kind::Volume, "scratch")
            .await
            .unwrap()
            .is_none()
    );

    // A mount path that leaves the container is refused before anything is read.
    request.empty_dirs[0].mount_path = "/data/../../..".into();
    let err = controller
        .checkpoint(&source.url, "other-id", &request)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::Status { status, .. } if status.as_u16() == 400),
        "{err}"
    );
}
