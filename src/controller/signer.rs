//! The signer of agent certificates (`spec.signerName: migrate.io/agent`), run by the leader.
//! A request is approved and signed only when the API server says it came from the agent
//! ServiceAccount with a token bound to a node (the `authentication.kubernetes.io/node-name`
//! extra of pod-bound and node-bound tokens); the certificate then names that node and nothing
//! the request asked for but its key. Anything else is denied with the reason, so a stuck
//! agent shows why in `kubectl get csr`.

use std::path::PathBuf;

use futures::StreamExt;
use k8s_openapi::{
    ByteString,
    api::certificates::v1::{CertificateSigningRequest, CertificateSigningRequestCondition},
    jiff::Timestamp,
};
use kube::{
    Api, Client, ResourceExt,
    api::{Patch, PatchParams},
    runtime::{WatchStreamExt, watcher},
};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::{
    agent::identity::SIGNER,
    certs::{self, AgentLeaf},
};

/// The extra the API server adds for a token bound to a node (or to a pod on one).
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";
/// Longest certificate given, whatever was asked.
pub const MAX_SECONDS: u64 = 7 * 86_400;
const DEFAULT_SECONDS: u64 = 86_400;

#[derive(Debug, thiserror::Error)]
pub enum SignerError {
    #[error("API server: {0}")]
    Api(#[from] kube::Error),
    #[error("reading the agent issuer {path}: {source}")]
    Issuer { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Certs(#[from] certs::CertsError),
}

impl SignerError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            SignerError::Api(_) => "api_server",
            SignerError::Issuer { .. } => "issuer_io",
            SignerError::Certs(e) => e.metric_label(),
        }
    }
}

/// Who may get an agent certificate and what goes into it.
#[derive(Debug, Clone)]
pub struct SignerConfig {
    pub issuer_cert: PathBuf,
    pub issuer_key: PathBuf,
    /// `system:serviceaccount:<namespace>:<agent ServiceAccount>`.
    pub agent_user: String,
    pub agent_name: String,
    pub namespace: String,
    /// SANs added to every agent certificate (`--agent-extra-san`).
    pub extra_sans: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Not ours, or already decided.
    Skip,
    Deny(String),
    Sign {
        node: String,
        seconds: u64,
    },
}

/// What to do with `csr`. Pure.
pub fn judge(csr: &CertificateSigningRequest, agent_user: &str) -> Verdict {
    if csr.spec.signer_name != SIGNER {
        return Verdict::Skip;
    }
    let status = csr.status.as_ref();
    let decided = status
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Denied" || c.type_ == "Failed"));
    if decided
        || status
            .and_then(|s| s.certificate.as_ref())
            .is_some_and(|c| !c.0.is_empty())
    {
        return Verdict::Skip;
    }
    let user = csr.spec.username.as_deref().unwrap_or_default();
    if user != agent_user {
        return Verdict::Deny(format!(
            "only {agent_user} may ask for an agent certificate, not {user:?}"
        ));
    }
    let nodes = csr
        .spec
        .extra
        .as_ref()
        .and_then(|e| e.get(NODE_NAME_EXTRA))
        .cloned()
        .unwrap_or_default();
    let [node] = nodes.as_slice() else {
        return Verdict::Deny(format!(
            "the request's token names {} nodes ({NODE_NAME_EXTRA}); an agent's pod token names its own",
            nodes.len()
        ));
    };
    let asked = csr
        .spec
        .expiration_seconds
        .map_or(DEFAULT_SECONDS, |s| s.max(600) as u64);
    Verdict::Sign {
        node: node.clone(),
        seconds: asked.min(MAX_SECONDS),
    }
}

fn condition(type_: &str, reason: &str, message: String) -> CertificateSigningRequestCondition {
    CertificateSigningRequestCondition {
        type_: type_.into(),
        status: "True".into(),
        reason: Some(reason.into()),
        message: Some(message),
        last_update_time: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::now())),
        ..Default::default()
    }
}

async fn handle(
    api: &Api<CertificateSigningRequest>,
    cfg: &SignerConfig,
    csr: &CertificateSigningRequest,
) -> Result<(), SignerError> {
    let name = csr.name_any();
    let (node, seconds) = match judge(csr, &cfg.agent_user) {
        Verdict::Skip => return Ok(()),
        Verdict::Deny(why) => {
            tracing::warn!(csr = %name, %why, "agent certificate request denied");
            let denied = condition("Denied", "NotAnAgentOfItsNode", why);
            api.patch_approval(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"conditions": [denied]}})),
            )
            .await?;
            return Ok(());
        }
        Verdict::Sign { node, seconds } => (node, seconds),
    };
    let read = |path: &PathBuf| {
        std::fs::read_to_string(path).map_err(|source| SignerError::Issuer {
            path: path.clone(),
            source,
        })
    };
    let leaf = AgentLeaf {
        node: node.clone(),
        sans: certs::agent_sans(&cfg.agent_name, &cfg.namespace, &cfg.extra_sans),
        seconds,
    };
    let request = String::from_utf8_lossy(&csr.spec.request.0).into_owned();
    let chain = match certs::sign_agent(&read(&cfg.issuer_cert)?, &read(&cfg.issuer_key)?, &request, &leaf) {
        Ok(chain) => chain,
        Err(certs::CertsError::Request(e)) => {
            let failed = condition("Failed", "InvalidRequest", format!("invalid certificate request: {e}"));
            api.patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"conditions": [failed]}})),
            )
            .await?;
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    let approved = condition("Approved", "AgentOfItsNode", format!("the agent of node {node}"));
    // Approval, then the certificate: the API server takes status.certificate only on an
    // approved request.
    let already = csr
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Approved"));
    if !already {
        api.patch_approval(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"conditions": [approved]}})),
        )
        .await?;
    }
    api.patch_status(
        &name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"certificate": ByteString(chain.into_bytes())}})),
    )
    .await?;
    tracing::info!(csr = %name, %node, seconds, "signed an agent certificate");
    Ok(())
}

/// Sign agent certificate requests until `shutdown` (the leader's term ends).
pub async fn run(client: Client, cfg: SignerConfig, shutdown: CancellationToken) {
    let api = Api::<CertificateSigningRequest>::all(client);
    let events = watcher(
        api.clone(),
        watcher::Config::default().fields(&format!("spec.signerName={SIGNER}")),
    )
    .default_backoff()
    .applied_objects();
    let work = events.for_each(|csr| {
        let (api, cfg) = (api.clone(), cfg.clone());
        async move {
            match csr {
                Ok(csr) => {
                    if let Err(error) = handle(&api, &cfg, &csr).await {
                        tracing::warn!(csr = %csr.name_any(), %error, reason = error.metric_label(), "agent certificate not signed");
                    }
                }
                Err(error) => tracing::debug!(%error, "watching certificate requests"),
            }
        }
    });
    tokio::select! {
        _ = work => {}
        _ = shutdown.cancelled() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::certificates::v1::{CertificateSigningRequestSpec, CertificateSigningRequestStatus};

    const AGENT: &str = "system:serviceaccount:kube-migrate:kube-migrate-agent";

    fn csr(user: &str, nodes: &[&str]) -> CertificateSigningRequest {
        CertificateSigningRequest {
            spec: CertificateSigningRequestSpec {
                signer_name: SIGNER.into(),
                username: Some(user.into()),
                extra: Some(
                    [(
                        NODE_NAME_EXTRA.to_string(),
                        nodes.iter().map(|n| n.to_string()).collect(),
                    )]
                    .into(),
                ),
                expiration_seconds: Some(30 * 86_400),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn the_agent_of_a_node_gets_that_node_for_a_week_at_most() {
        assert_eq!(
            judge(&csr(AGENT, &["node-a"]), AGENT),
            Verdict::Sign {
                node: "node-a".into(),
                seconds: MAX_SECONDS
            }
        );
    }

    #[test]
    fn others_are_denied_and_decided_requests_left_alone() {
        assert!(
            matches!(judge(&csr("system:serviceaccount:kube-migrate:default", &["node-a"]), AGENT), Verdict::Deny(w) if w.contains("only"))
        );
        // A token not bound to a node (kubectl create token without a bound object), or two.
        assert!(matches!(judge(&csr(AGENT, &[]), AGENT), Verdict::Deny(w) if w.contains("0 nodes")));
        assert!(matches!(judge(&csr(AGENT, &["a", "b"]), AGENT), Verdict::Deny(_)));
        let mut other = csr(AGENT, &["node-a"]);
        other.spec.signer_name = "kubernetes.io/kube-apiserver-client".into();
        assert_eq!(judge(&other, AGENT), Verdict::Skip);
        let mut signed = csr(AGENT, &["node-a"]);
        signed.status = Some(CertificateSigningRequestStatus {
            certificate: Some(ByteString(b"-----BEGIN CERTIFICATE-----".to_vec())),
            ..Default::default()
        });
        assert_eq!(judge(&signed, AGENT), Verdict::Skip);
        let mut denied = csr(AGENT, &["node-a"]);
        denied.status = Some(CertificateSigningRequestStatus {
            conditions: Some(vec![condition("Denied", "x", "y".into())]),
            ..Default::default()
        });
        assert_eq!(judge(&denied, AGENT), Verdict::Skip);
    }
}
