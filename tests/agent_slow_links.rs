//! Slow links: archives travel zstd-compressed and paced between two agents over real mTLS,
//! and the target keeps (and verifies) exactly what was checkpointed.

mod common;

use std::time::{Duration, Instant};

use common::agents::{ID, checkpoint_request, expect_of, setup};
use kube_migrate::agent::api::{ArchiveRecord, Kind, PushRequest, TransferOptions};

/// A push of the one archive `a` to `target`, sent as `transfer` says.
fn push_of(target: &str, a: &ArchiveRecord, transfer: TransferOptions) -> PushRequest {
    PushRequest {
        target: target.to_string(),
        archives: vec![a.reference()],
        target_id: None,
        volumes: Vec::new(),
        transfer,
    }
}

#[tokio::test]
async fn compressed_and_paced_transfers_deliver_the_checkpoint_as_it_was() {
    let (_env, source, target, controller) = setup().await;
    let answer = controller
        .checkpoint(&source.url, ID, &checkpoint_request(&["app"]))
        .await
        .unwrap();
    let a = &answer.archives[0];
    let push = |transfer| push_of(&target.url, a, transfer);
    let received = target
        .state_dir
        .join("migrations")
        .join(ID)
        .join("archives")
        .join("app.tar");

    // zstd on the wire: the target holds the archive byte for byte.
    let zstd = push(TransferOptions {
        zstd_level: Some(3),
        bytes_per_second: None,
    });
    controller
        .expect(&target.url, ID, &expect_of(&zstd, "node-a"))
        .await
        .unwrap();
    let pushed = controller.push(&source.url, ID, &zstd).await.unwrap();
    assert_eq!(pushed.bytes, a.size_bytes);
    // Pseudo-random pages: zstd keeps them about as large (frame overhead only).
    assert!(pushed.wire_bytes > a.size_bytes * 9 / 10, "{pushed:?}");
    assert!(std::fs::read(&received).unwrap() == std::fs::read(&a.path).unwrap());
    let held = controller
        .held(&target.url, ID, Kind::Archive, "app")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(held.digest, a.digest);

    // Paced at 4 MiB/s: the 3 MiB archive's last chunk may leave only after 0.75 s.
    controller.delete(&target.url, ID).await.unwrap();
    let paced = push(TransferOptions {
        zstd_level: None,
        bytes_per_second: Some(4 << 20),
    });
    controller
        .expect(&target.url, ID, &expect_of(&paced, "node-a"))
        .await
        .unwrap();
    let started = Instant::now();
    let pushed = controller.push(&source.url, ID, &paced).await.unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(740),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(pushed.wire_bytes, a.size_bytes);
    assert!(std::fs::read(&received).unwrap() == std::fs::read(&a.path).unwrap());
}

/// While a paced push runs, the source agent says how far it is (what the controller writes
/// into the PodMigration for `kubectl migrate`'s bar): between nothing and everything, never
/// backwards, with the archive's size as the total; nothing once it ended.
#[tokio::test]
async fn a_running_push_reports_its_progress() {
    let (_env, source, target, controller) = setup().await;
    let answer = controller
        .checkpoint(&source.url, ID, &checkpoint_request(&["app"]))
        .await
        .unwrap();
    let a = &answer.archives[0];
    assert_eq!(controller.push_progress(&source.url, ID).await.unwrap(), None);
    // About 3 s for the 3 MiB archive.
    let paced = push_of(
        &target.url,
        a,
        TransferOptions {
            zstd_level: None,
            bytes_per_second: Some(1 << 20),
        },
    );
    controller
        .expect(&target.url, ID, &expect_of(&paced, "node-a"))
        .await
        .unwrap();
    let push = controller.push(&source.url, ID, &paced);
    tokio::pin!(push);
    let mut seen = Vec::new();
    let pushed = loop {
        tokio::select! {
            pushed = &mut push => break pushed.unwrap(),
            _ = tokio::time::sleep(Duration::from_millis(250)) => {
                if let Some(p) = controller.push_progress(&source.url, ID).await.unwrap() {
                    seen.push(p);
                }
            }
        }
    };
    assert_eq!(pushed.bytes, a.size_bytes);
    assert!(seen.iter().all(|p| p.total_bytes == a.size_bytes), "{seen:?}");
    assert!(
        seen.iter().any(|p| p.bytes > 0 && p.bytes < a.size_bytes),
        "no figure between nothing and everything: {seen:?}"
    );
    assert!(seen.windows(2).all(|w| w[0].bytes <= w[1].bytes), "{seen:?}");
    assert!(seen.windows(2).all(|w| w[0].seconds < w[1].seconds), "{seen:?}");
    assert_eq!(
        controller.push_progress(&source.url, ID).await.unwrap(),
        None,
        "over once the push answered"
    );
}
