//! Unit tests of the crun runtime: image names, OCI configs, archives.

use super::{config::PATH_ENV, *};

fn spec() -> RunSpec {
    RunSpec {
        id: "0123456789abcdef0123".into(),
        pod_uid: "uid-1".into(),
        namespace: "ns".into(),
        pod: "counter-0".into(),
        container: "app".into(),
        image: "kube-migrate.test/counter:1".into(),
        command: vec![],
        args: vec![],
        env: vec!["START=5".into()],
    }
}

#[test]
fn local_image_names() {
    assert_eq!(local_image_name("kube-migrate.test/counter"), Some("counter"));
    assert_eq!(local_image_name("kube-migrate.test/memory:1"), Some("memory"));
    assert_eq!(local_image_name("kube-migrate.test/memory@sha256:ab"), Some("memory"));
    assert_eq!(local_image_name("kube-migrate.test/a/b"), None);
    assert_eq!(local_image_name("kube-migrate.test/.."), None);
    assert_eq!(local_image_name("registry.local/counter:1"), None);
}

#[test]
fn process_args_follow_kubernetes_rules() {
    let image = ImageConfig {
        entrypoint: vec!["/bin/sh".into()],
        cmd: vec!["/counter.sh".into()],
        env: vec![],
    };
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    assert_eq!(process_args(&image, &[], &[]), s(&["/bin/sh", "/counter.sh"]));
    assert_eq!(process_args(&image, &[], &s(&["-c", "x"])), s(&["/bin/sh", "-c", "x"]));
    assert_eq!(process_args(&image, &s(&["/bin/memhog"]), &[]), s(&["/bin/memhog"]));
    assert_eq!(
        process_args(&image, &s(&["/bin/echo"]), &s(&["hi"])),
        s(&["/bin/echo", "hi"])
    );
}

#[test]
fn runtime_config_is_checkpointable() {
    let image = ImageConfig {
        entrypoint: vec!["/bin/sh".into(), "/counter.sh".into()],
        cmd: vec![],
        env: vec!["A=1".into()],
    };
    let c = runtime_config(&spec(), &image, "/km-node-a/uid-1/0123");
    assert_eq!(
        c["process"]["terminal"], false,
        "CRIU cannot dump a pty without a console socket"
    );
    assert_eq!(c["root"]["readonly"], true);
    assert_eq!(c["linux"]["cgroupsPath"], "/km-node-a/uid-1/0123");
    let env: Vec<&str> = c["process"]["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(env.starts_with(&[PATH_ENV]));
    assert!(env.ends_with(&["A=1", "START=5"]), "pod env after image env: {env:?}");
    assert!(
        c["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["destination"] == "/tmp")
    );
}

#[test]
fn restored_config_takes_the_new_pods_cgroup_and_identity() {
    let dump = runtime_config(&spec(), &ImageConfig::default(), "/km-node-a/uid-1/0123");
    let mut target = spec();
    target.pod_uid = "uid-2".into();
    target.pod = "counter-1".into();
    let c = restored_config(&dump, &target, "/km-node-b/uid-2/4567").unwrap();
    assert_eq!(c["linux"]["cgroupsPath"], "/km-node-b/uid-2/4567");
    assert_eq!(c["annotations"]["io.kubernetes.pod.uid"], "uid-2");
    assert_eq!(
        c["process"], dump["process"],
        "the process is CRIU's to restore, unchanged"
    );
    assert!(restored_config(&json!({}), &target, "/x").is_err());
}

#[test]
fn archives_have_entries_at_the_root() {
    let work = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    std::fs::create_dir(work.path().join("checkpoint")).unwrap();
    std::fs::write(work.path().join("checkpoint/inventory.img"), b"inv").unwrap();
    std::fs::write(work.path().join("config.dump"), b"{}").unwrap();
    let path = tar_dir(work.path(), out.path(), "a.tar").unwrap();
    let mut names: Vec<String> = tar::Archive::new(std::fs::File::open(&path).unwrap())
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["checkpoint/", "checkpoint/inventory.img", "config.dump"]);
    assert!(!out.path().join(".a.tar.tmp").exists());
}

#[test]
fn rootfs_diff_is_applied_and_deleted_files_removed() {
    let dir = tempfile::tempdir().unwrap();
    let rootfs = tempfile::tempdir().unwrap();
    std::fs::write(rootfs.path().join("old"), b"x").unwrap();
    let mut tar = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(3);
    h.set_mode(0o644);
    tar.append_data(&mut h, "etc/new", &b"new"[..]).unwrap();
    std::fs::write(dir.path().join("rootfs-diff.tar"), tar.into_inner().unwrap()).unwrap();
    std::fs::write(dir.path().join("deleted.files"), br#"["/old"]"#).unwrap();
    apply_rootfs_diff(dir.path(), rootfs.path()).unwrap();
    assert_eq!(std::fs::read(rootfs.path().join("etc/new")).unwrap(), b"new");
    assert!(!rootfs.path().join("old").exists());
    std::fs::write(dir.path().join("deleted.files"), br#"["/../../etc/passwd"]"#).unwrap();
    assert!(apply_rootfs_diff(dir.path(), rootfs.path()).is_err());
}
