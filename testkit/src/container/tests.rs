//! Unit tests of containers: memory, state env vars, logs, the counter, the log follower.

use super::*;

#[test]
fn memory_is_deterministic_and_seed_dependent() {
    let a = Memory::generate(1_000_003, 7).unwrap();
    let b = Memory::generate(1_000_003, 7).unwrap();
    let c = Memory::generate(1_000_003, 8).unwrap();
    assert_eq!(a.sha256(), b.sha256());
    assert_ne!(a.sha256(), c.sha256());
    assert_eq!(a.len(), 1_000_003);
    assert_eq!(Memory::generate(0, 1).unwrap().len(), 0);
    // Not trivially constant.
    assert!(a.as_slice().iter().filter(|&&x| x == 0).count() < 10_000);
}

#[test]
fn state_env_parsing() {
    assert_eq!(parse_state_bytes(None).unwrap(), 0);
    assert_eq!(parse_state_bytes(Some(" 4096 ")).unwrap(), 4096);
    assert!(parse_state_bytes(Some("1Gi")).is_err());
    assert_eq!(parse_state_seed(Some("42")).unwrap(), Some(42));
    assert_ne!(default_seed("uid-1", "c"), default_seed("uid-2", "c"));
}

#[test]
fn log_tail_and_since() {
    let log = Log::default();
    for i in 0..5 {
        log.push(format!("l{i}"));
    }
    let (tail, next) = log.tail(Some(2));
    assert_eq!(tail.iter().map(|l| l.text.as_str()).collect::<Vec<_>>(), ["l3", "l4"]);
    assert_eq!(next, 5);
    assert_eq!(log.tail(None).0.len(), 5);
    assert_eq!(log.tail(Some(100)).0.len(), 5);
    log.push("l5".into());
    let (new, next) = log.since(5);
    assert_eq!(new.len(), 1);
    assert_eq!(next, 6);
}

#[tokio::test(start_paused = true)]
async fn counter_ticks_and_logs_once_a_second() {
    let spec = ContainerSpec {
        namespace: "ns".into(),
        pod: "p".into(),
        pod_uid: "u".into(),
        name: "app".into(),
        image: "img".into(),
        mounts: vec![],
        cgroup_root: None,
    };
    let c = Container::start(
        spec,
        "img@sha256:00".into(),
        Memory::generate(16, 1).unwrap(),
        Origin::Restored {
            image_ref: "r/kube-migrate/x@sha256:ab".into(),
            counter: 40,
        },
    );
    tokio::time::sleep(Duration::from_millis(2050)).await;
    assert_eq!(c.counter(), Some(60));
    let (lines, _) = c.log.tail(None);
    assert!(lines[0].text.starts_with(
        "restored from checkpoint image r/kube-migrate/x@sha256:ab: counter=40 memory_bytes=16 memory_sha256="
    ));
    assert_eq!(lines[1].text, "counter=50");
    assert_eq!(lines[2].text, "counter=60");
    c.stop();
    assert!(!c.is_running());
    c.stopped(Duration::from_secs(1)).await;
    assert!(c.finished_at().is_some());
}

#[test]
fn shim_lines_are_told_apart() {
    assert!(is_shim_line(
        "2026-11-23T10:00:00.123Z km-shim[42]: container init pid 7"
    ));
    assert!(!is_shim_line("count 12"));
    assert!(!is_shim_line("memhog report count=5 checksum=ab verify=ok"));
}

#[test]
fn log_follower_splits_lines_and_keeps_partial_ones() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.log");
    std::fs::write(&path, "count 1\n2026-11-23T10:00:00.123Z km-shim[42]: done\ncou").unwrap();
    let log = Log::default();
    let mut f = LogFollower::new(path.clone());
    f.poll(&log);
    let texts = |log: &Log| log.tail(None).0.into_iter().map(|l| l.text).collect::<Vec<_>>();
    assert_eq!(texts(&log), ["count 1"]);
    use std::io::Write;
    std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap()
        .write_all(b"nt 2\n")
        .unwrap();
    f.poll(&log);
    assert_eq!(texts(&log), ["count 1", "count 2"]);
}
