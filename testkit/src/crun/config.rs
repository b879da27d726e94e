//! The OCI side of a container: the image config a local image gives (`image.json`), the
//! process it runs, the `config.json` of a new or a restored container, and the
//! `config.dump` of a checkpoint.

use serde::Deserialize;
use serde_json::{Value, json};

use super::{CrunError, RunSpec};

pub(super) const PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The parts of an OCI image config that `image.json` holds.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ImageConfig {
    #[serde(default)]
    pub entrypoint: Vec<String>,
    #[serde(default)]
    pub cmd: Vec<String>,
    #[serde(default)]
    pub env: Vec<String>,
}

/// The process a container runs, by Kubernetes' rules: `command` replaces the entrypoint (and
/// drops the image's cmd), `args` replaces the cmd.
pub fn process_args(image: &ImageConfig, command: &[String], args: &[String]) -> Vec<String> {
    match (command.is_empty(), args.is_empty()) {
        (false, false) => command.iter().chain(args).cloned().collect(),
        (false, true) => command.to_vec(),
        (true, false) => image.entrypoint.iter().chain(args).cloned().collect(),
        (true, true) => image.entrypoint.iter().chain(&image.cmd).cloned().collect(),
    }
}

/// An OCI runtime config for a container of this test kubelet (what `crun spec` gives, with
/// the changes criu/README.md explains: no terminal, a cgroup path per container, a tmpfs
/// `/tmp`, a read-only rootfs, so nothing but CRIU's images carries state).
pub(super) fn runtime_config(spec: &RunSpec, image: &ImageConfig, cgroup: &str) -> Value {
    let mut env = vec![PATH_ENV.to_string(), "TERM=xterm".to_string()];
    env.extend(image.env.iter().cloned());
    env.extend(spec.env.iter().cloned());
    let caps = json!(["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]);
    json!({
        "ociVersion": "1.0.0",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": process_args(image, &spec.command, &spec.args),
            "env": env,
            "cwd": "/",
            "capabilities": {"bounding": caps, "effective": caps, "inheritable": [], "permitted": caps, "ambient": caps},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs", "readonly": true},
        "hostname": spec.pod,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=1777", "size=16m"]}
        ],
        "annotations": {
            "io.kubernetes.pod.name": spec.pod,
            "io.kubernetes.pod.namespace": spec.namespace,
            "io.kubernetes.pod.uid": spec.pod_uid,
            "io.kubernetes.container.name": spec.container,
            "io.kubernetes.cri-o.ImageName": spec.image,
        },
        "linux": {
            "cgroupsPath": cgroup,
            "namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}],
            "maskedPaths": ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
                            "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware", "/proc/scsi"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
        }
    })
}

/// `spec.dump` made into the config of a restored container: same process, mounts and
/// namespaces (CRIU restores into exactly those), this pod's cgroup and annotations.
pub fn restored_config(spec_dump: &Value, spec: &RunSpec, cgroup: &str) -> Result<Value, CrunError> {
    let mut config = spec_dump.clone();
    if config.get("process").is_none() || config.get("root").is_none() {
        return Err(CrunError::Checkpoint("spec.dump has no process or root".into()));
    }
    config["root"]["path"] = json!("rootfs");
    config["linux"]["cgroupsPath"] = json!(cgroup);
    for (key, value) in [
        ("io.kubernetes.pod.name", &spec.pod),
        ("io.kubernetes.pod.namespace", &spec.namespace),
        ("io.kubernetes.pod.uid", &spec.pod_uid),
        ("io.kubernetes.container.name", &spec.container),
    ] {
        config["annotations"][key] = json!(value);
    }
    Ok(config)
}

/// `config.dump` of a checkpoint (the fields CRI-O writes and kube-migrate reads).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigDump {
    #[serde(default)]
    pub runtime: String,
    #[serde(default)]
    pub rootfs_image_name: String,
}
