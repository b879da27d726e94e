//! `kubectl migrate`: one-command migrations on the same PodMigration resource as drains.
//! Pure checks and formatting here; the commands' I/O in [`crate::app::kubectl`].

use k8s_openapi::api::core::v1::{Node, Pod};

use crate::{
    api::{self, Phase, PodMigration, TransferProgress},
    controller::{
        decide::human_bytes,
        placement::{self, Placement, PlacementInput},
    },
};

#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("pod {namespace}/{name} not found")]
    PodNotFound { namespace: String, name: String },
    #[error(
        "pod {namespace}/{name} is not annotated {annotation}=\"true\". kube-migrate only migrates pods that \
         opted in, because restoring a process on another node (new IP, closed TCP connections) must be safe \
         for the workload. Annotate the pod template, e.g.\n  kubectl patch deploy/<name> -p \
         '{{\"spec\":{{\"template\":{{\"metadata\":{{\"annotations\":{{\"{annotation}\":\"true\"}}}}}}}}}}'",
        annotation = api::STATEFUL
    )]
    NotAnnotated { namespace: String, name: String },
    #[error("pod {namespace}/{name} is not running on a node (phase {phase}): there is no state to migrate")]
    NotRunning {
        namespace: String,
        name: String,
        phase: String,
    },
    #[error("pod {namespace}/{name} cannot be migrated: {refusal}")]
    CannotMove {
        namespace: String,
        name: String,
        refusal: crate::preflight::Refusal,
    },
    #[error("node {node} cannot take the pod: {reason}")]
    TargetUnfit { node: String, reason: String },
    #[error("no node can take the pod: {0}")]
    NoTarget(String),
    #[error("migration {name} failed ({reason}): {message}")]
    Failed {
        name: String,
        reason: String,
        message: String,
    },
    #[error("gave up waiting after {0} s")]
    Timeout(u64),
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("kubeconfig: {0}")]
    Config(String),
}

impl PluginError {
    /// Exit codes: 1 migration failed, 2 refused before starting, 3 API or timeout.
    pub fn exit_code(&self) -> i32 {
        match self {
            PluginError::Failed { .. } => 1,
            PluginError::Kube(_) | PluginError::Timeout(_) | PluginError::Config(_) => 3,
            _ => 2,
        }
    }
}

/// Can this pod be migrated at all?
pub fn check_pod(pod: Option<&Pod>, namespace: &str, name: &str) -> Result<(), PluginError> {
    let (namespace, name) = (namespace.to_string(), name.to_string());
    let Some(pod) = pod else {
        return Err(PluginError::PodNotFound { namespace, name });
    };
    if !api::is_stateful(pod) {
        return Err(PluginError::NotAnnotated { namespace, name });
    }
    if let Err(refusal) = crate::preflight::check_pod(pod) {
        return Err(PluginError::CannotMove {
            namespace,
            name,
            refusal,
        });
    }
    let phase = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.clone())
        .unwrap_or_else(|| "Unknown".into());
    let bound = pod.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some();
    if phase != "Running" || !bound {
        return Err(PluginError::NotRunning { namespace, name, phase });
    }
    Ok(())
}

/// Check the requested node (or that some node fits) before creating anything.
pub fn check_target(
    pod: &Pod,
    requested: Option<&str>,
    nodes: &[&Node],
    pods: &[&Pod],
    has_agent: &dyn Fn(&str) -> bool,
) -> Result<String, PluginError> {
    let source = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .unwrap_or_default();
    // A restored pod's pin to its current node is kube-migrate's, not the user's.
    let pod = &crate::replacement::without_restore(pod);
    match placement::choose(&PlacementInput {
        pod,
        source_node: source,
        requested,
        nodes,
        pods,
        has_agent,
        excluded: &[],
        // The plugin proposes; the controller checks the volumes' node affinity.
        volumes: &[],
    }) {
        Placement::Node(n) => Ok(n),
        Placement::None(reasons) => match (requested, reasons.as_slice()) {
            (Some(node), [(_, reason)]) => Err(PluginError::TargetUnfit {
                node: node.to_string(),
                reason: reason.to_string(),
            }),
            _ => Err(PluginError::NoTarget(Placement::explain(&reasons))),
        },
    }
}

/// What a running transfer's figures say: share done, rate, time left.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TransferFigures {
    pub percent: u8,
    pub bytes_per_second: f64,
    /// None until a rate is known.
    pub eta_seconds: Option<f64>,
}

impl TransferFigures {
    pub fn of(p: &TransferProgress) -> Self {
        let done = p.bytes.min(p.total_bytes);
        let percent = if p.total_bytes == 0 {
            100
        } else {
            (done as u128 * 100 / p.total_bytes as u128) as u8
        };
        let bytes_per_second = if p.seconds > 0.0 { done as f64 / p.seconds } else { 0.0 };
        let eta_seconds = (bytes_per_second > 0.0).then(|| (p.total_bytes - done) as f64 / bytes_per_second);
        Self {
            percent,
            bytes_per_second,
            eta_seconds,
        }
    }

    /// `45%, 12.0 MiB/s, ETA 3 s` (the bar shows the bytes).
    pub fn summary(&self) -> String {
        let eta = match self.eta_seconds {
            Some(s) => format!("ETA {}", human_seconds(s)),
            None => "ETA ?".into(),
        };
        format!(
            "{}%, {}/s, {eta}",
            self.percent,
            human_bytes(self.bytes_per_second as u64)
        )
    }
}

/// `42 s`, `3 m 05 s`: coarse on purpose, a rate that varies makes finer figures noise.
pub fn human_seconds(seconds: f64) -> String {
    let s = seconds.max(0.0).ceil() as u64;
    if s < 60 {
        format!("{s} s")
    } else {
        format!("{} m {:02} s", s / 60, s % 60)
    }
}

/// The transfer part of a line: `12.0 MiB/64.0 MiB (18%, 10.0 MiB/s, ETA 6 s)`.
pub fn transfer_text(p: &TransferProgress) -> String {
    format!(
        "{}/{} ({})",
        human_bytes(p.bytes.min(p.total_bytes)),
        human_bytes(p.total_bytes),
        TransferFigures::of(p).summary()
    )
}

/// One progress line: phase, bytes moved, elapsed, latest message.
pub fn progress_line(pm: &PodMigration, elapsed_secs: f64) -> String {
    let status = pm.status.clone().unwrap_or_default();
    let total: u64 = status.containers.iter().filter_map(|c| c.size_bytes).sum();
    let moved = status.transferred_bytes.unwrap_or(0);
    let bytes = match (status.phase, total, &status.transfer) {
        (Phase::Transferring, _, Some(p)) => format!(" sent {}", transfer_text(p)),
        (_, 0, _) => String::new(),
        (Phase::Pending | Phase::Checkpointing, t, _) => format!(" checkpoint {}", human_bytes(t)),
        (_, t, _) => format!(" moved {}/{}", human_bytes(moved), human_bytes(t)),
    };
    let target = pm.target_node().map(|t| format!(" -> {t}")).unwrap_or_default();
    let message = status.message.map(|m| format!(" | {m}")).unwrap_or_default();
    format!(
        "[{elapsed_secs:6.1}s] {:<13}{target}{bytes}{message}",
        status.phase.as_str()
    )
}

/// One line per phase entered: `[elapsed] Phase (took N s)` once it has finished.
pub fn phase_line(t: &crate::api::PhaseTiming, elapsed_secs: f64) -> String {
    match (t.phase.is_terminal(), t.seconds) {
        (true, _) => format!("[{elapsed_secs:6.1}s] {}", t.phase.as_str()),
        (false, Some(s)) => format!("[{elapsed_secs:6.1}s] {:<13} done in {s:.2} s", t.phase.as_str()),
        (false, None) => format!("[{elapsed_secs:6.1}s] {:<13} started", t.phase.as_str()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ContainerCheckpoint, PodMigrationSpec, PodMigrationStatus, Trigger};

    #[test]
    fn refusals_explain_themselves() {
        let err = check_pod(None, "ns", "p").unwrap_err();
        assert_eq!(err.to_string(), "pod ns/p not found");
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p"}, "spec": {"nodeName": "a", "containers": []}, "status": {"phase": "Running"}
        }))
        .unwrap();
        let err = check_pod(Some(&pod), "ns", "p").unwrap_err();
        assert!(err.to_string().contains("migrate.io/stateful"), "{err}");
        assert!(err.to_string().contains("kubectl patch deploy/<name>"), "{err}");
        assert_eq!(err.exit_code(), 2);
        let host: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "annotations": {"migrate.io/stateful": "true"}},
            "spec": {"nodeName": "a", "containers": [], "volumes": [{"name": "d", "hostPath": {"path": "/srv"}}]},
            "status": {"phase": "Running"}
        }))
        .unwrap();
        let err = check_pod(Some(&host), "ns", "p").unwrap_err();
        assert!(
            err.to_string()
                .contains("cannot be migrated: volume d is a hostPath (/srv)"),
            "{err}"
        );
        assert_eq!(err.exit_code(), 2);
    }

    #[test]
    fn progress_shows_phase_bytes_and_target() {
        let mut pm = PodMigration::new(
            "m",
            PodMigrationSpec {
                pod_name: "p".into(),
                pod_uid: "u".into(),
                source_node: "a".into(),
                target_node: None,
                trigger: Trigger::Manual,
                policy: Default::default(),
                mode: Default::default(),
                restore_from: None,
            },
        );
        pm.status = Some(PodMigrationStatus {
            phase: Phase::Transferring,
            target_node: Some("b".into()),
            containers: vec![ContainerCheckpoint {
                name: "c".into(),
                size_bytes: Some(64 << 20),
                ..Default::default()
            }],
            transferred_bytes: Some(32 << 20),
            message: Some("sending".into()),
            ..Default::default()
        });
        assert_eq!(
            progress_line(&pm, 3.25),
            "[   3.2s] Transferring  -> b moved 32.0 MiB/64.0 MiB | sending"
        );
        // While the agent reports a running push, its figures replace the byte count.
        pm.status.as_mut().unwrap().transfer = Some(TransferProgress {
            bytes: 16 << 20,
            total_bytes: 64 << 20,
            seconds: 2.0,
        });
        assert_eq!(
            progress_line(&pm, 3.25),
            "[   3.2s] Transferring  -> b sent 16.0 MiB/64.0 MiB (25%, 8.0 MiB/s, ETA 6 s) | sending"
        );
    }

    #[test]
    fn transfer_figures_are_bounded_and_honest_about_unknowns() {
        let p = |bytes, total_bytes, seconds| TransferProgress {
            bytes,
            total_bytes,
            seconds,
        };
        let f = TransferFigures::of(&p(0, 100, 0.0));
        assert_eq!((f.percent, f.eta_seconds), (0, None), "no rate yet, no ETA");
        assert_eq!(f.summary(), "0%, 0 B/s, ETA ?");
        // Read-ahead may count past the total: never above 100%, never a negative ETA.
        let f = TransferFigures::of(&p(120, 100, 1.0));
        assert_eq!((f.percent, f.eta_seconds), (100, Some(0.0)));
        assert_eq!(
            TransferFigures::of(&p(0, 0, 1.0)).percent,
            100,
            "nothing to send is done"
        );
        // Sizes of many GiB do not overflow the percentage.
        let f = TransferFigures::of(&p(u64::MAX / 2, u64::MAX, 10.0));
        assert_eq!(f.percent, 49);
        assert_eq!(human_seconds(41.3), "42 s");
        assert_eq!(human_seconds(59.2), "1 m 00 s");
        assert_eq!(human_seconds(185.0), "3 m 05 s");
        assert_eq!(
            transfer_text(&p(3 << 30, 4 << 30, 6.0)),
            "3.0 GiB/4.0 GiB (75%, 512.0 MiB/s, ETA 2 s)"
        );
    }
}
