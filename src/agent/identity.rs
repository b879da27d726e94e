//! The agent's own certificate, one per node (`--identity csr`): the agent makes a key in
//! memory, asks for a certificate through the Kubernetes CertificateSigningRequest API
//! (signer [`SIGNER`]) and the controller signs it for the node the API server says the
//! request came from (the node claim of the agent pod's ServiceAccount token). So root on one
//! node holds that node's agent certificate only: it cannot pose as another node's agent
//! towards a target that expects archives from there. Renewed at two thirds of its life; the
//! key never touches the disk.

use std::{sync::Arc, time::Duration};

use k8s_openapi::{
    ByteString,
    api::certificates::v1::{CertificateSigningRequest, CertificateSigningRequestSpec},
};
use kube::{
    Api, ResourceExt,
    api::{ObjectMeta, PostParams},
    runtime::wait::await_condition,
};

use crate::{certs, tls::CertReloader};

/// `spec.signerName` of agent certificate requests: the controller signs these.
pub const SIGNER: &str = "migrate.io/agent";

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("certificate request: {0}")]
    Certs(#[from] certs::CertsError),
    #[error("API server: {0}")]
    Api(#[from] kube::Error),
    #[error("waiting for certificate request {0}: {1}")]
    Wait(String, String),
    #[error("certificate request {name} was {outcome}: {message}")]
    Refused {
        name: String,
        outcome: String,
        message: String,
    },
    #[error("the signed certificate: {0}")]
    Tls(#[from] crate::tls::TlsError),
}

impl IdentityError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            IdentityError::Certs(e) => e.metric_label(),
            IdentityError::Api(_) => "api_server",
            IdentityError::Wait(..) => "certificate_timeout",
            IdentityError::Refused { .. } => "certificate_refused",
            IdentityError::Tls(e) => e.metric_label(),
        }
    }
}

/// Asks for and renews this node's agent certificate.
#[derive(Clone)]
pub struct Identity {
    pub csrs: Api<CertificateSigningRequest>,
    pub node: String,
    /// The name agents' certificates carry (`kube-migrate-agent`).
    pub agent_name: String,
    /// Asked-for lifetime; the signer may give less.
    pub seconds: u64,
    /// How long to wait for the signer each time.
    pub wait: Duration,
}

impl Identity {
    /// One certificate: `(chain PEM, key PEM)`.
    pub async fn obtain(&self) -> Result<(String, String), IdentityError> {
        let (request, key) = certs::agent_request(&self.agent_name, &self.node)?;
        let csr = CertificateSigningRequest {
            metadata: ObjectMeta {
                generate_name: Some(format!("{}-", self.agent_name)),
                labels: Some([("migrate.io/node-agent".to_string(), "true".to_string())].into()),
                annotations: Some([("migrate.io/node".to_string(), self.node.clone())].into()),
                ..Default::default()
            },
            spec: CertificateSigningRequestSpec {
                request: ByteString(request.into_bytes()),
                signer_name: SIGNER.into(),
                usages: Some(
                    ["digital signature", "key encipherment", "server auth", "client auth"]
                        .map(String::from)
                        .into(),
                ),
                expiration_seconds: i32::try_from(self.seconds).ok(),
                ..Default::default()
            },
            status: None,
        };
        let created = self.csrs.create(&PostParams::default(), &csr).await?;
        let name = created.name_any();
        tracing::info!(csr = %name, node = %self.node, "asked for this node's agent certificate");
        let done = await_condition(self.csrs.clone(), &name, |csr: Option<&CertificateSigningRequest>| {
            csr.is_some_and(|c| outcome(c).is_some())
        });
        let csr = match tokio::time::timeout(self.wait, done).await {
            Ok(Ok(Some(csr))) => csr,
            Ok(Ok(None)) => return Err(IdentityError::Wait(name, "it was deleted".into())),
            Ok(Err(e)) => return Err(IdentityError::Wait(name, e.to_string())),
            Err(_) => {
                return Err(IdentityError::Wait(
                    name,
                    format!(
                        "not signed within {} s (is the controller running?)",
                        self.wait.as_secs()
                    ),
                ));
            }
        };
        match outcome(&csr) {
            Some(Ok(chain)) => Ok((chain, key)),
            Some(Err((outcome, message))) => Err(IdentityError::Refused { name, outcome, message }),
            None => unreachable!("awaited until decided"),
        }
    }

    /// Obtain a certificate, retrying until one is signed.
    pub async fn first(&self) -> (String, String) {
        let mut pause = Duration::from_secs(2);
        loop {
            match self.obtain().await {
                Ok(pair) => return pair,
                Err(error) => {
                    tracing::warn!(%error, reason = error.metric_label(), retry_in = pause.as_secs(), "no agent certificate yet");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(60));
                }
            }
        }
    }

    /// Renew `certs` at two thirds of each certificate's life, forever.
    pub fn spawn_renewal(self, certs: Arc<CertReloader>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                let left = crate::tls::remaining(&certs.current()).unwrap_or_default();
                tokio::time::sleep(left * 2 / 3).await;
                let (chain, key) = self.first().await;
                match certs.install(chain.as_bytes(), key.as_bytes()) {
                    Ok(()) => tracing::info!(node = %self.node, "renewed this node's agent certificate"),
                    Err(error) => tracing::warn!(%error, "the renewed agent certificate is unusable"),
                }
            }
        })
    }
}

/// `Some(Ok(chain))` once signed, `Some(Err((outcome, message)))` once denied or failed,
/// `None` while undecided.
fn outcome(csr: &CertificateSigningRequest) -> Option<Result<String, (String, String)>> {
    let status = csr.status.as_ref()?;
    if let Some(refused) = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "Denied" || c.type_ == "Failed")
    {
        return Some(Err((
            refused.type_.to_lowercase(),
            refused.message.clone().unwrap_or_default(),
        )));
    }
    let chain = status.certificate.as_ref().filter(|c| !c.0.is_empty())?;
    Some(Ok(String::from_utf8_lossy(&chain.0).into_owned()))
}
