//! The kubelet checkpoint API (KEP-2008): `POST /checkpoint/{ns}/{pod}/{container}`.
//!
//! The agent calls its own node's kubelet with its ServiceAccount token, which needs only
//! `create` on `nodes/checkpoint`: no node proxy (which would also allow exec into every pod
//! on the node) and no kubelet client certificate.

use std::{path::PathBuf, sync::Arc, time::Duration};

use hyper::{Method, Request};
use rustls::{
    ClientConfig, DigitallySignedStruct, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    pki_types::{CertificateDer, ServerName, UnixTime},
};

use super::client::{ClientError, HttpsClient, empty_body, https_client, send};

#[derive(Debug, thiserror::Error)]
pub enum KubeletError {
    #[error("reading the ServiceAccount token {path}: {source}")]
    Token { path: PathBuf, source: std::io::Error },
    #[error(
        "the kubelet has no checkpoint endpoint for this container (unknown pod or container, or the \
         ContainerCheckpoint feature gate is off): {0}"
    )]
    NotFound(String),
    #[error("the kubelet refused the checkpoint (the agent needs create on nodes/checkpoint): {0}")]
    Forbidden(String),
    #[error("the container runtime failed to checkpoint (is CRIU installed and enabled in the runtime?): {0}")]
    Runtime(String),
    #[error("the kubelet answered without an archive path: {0}")]
    NoArchive(String),
    #[error(transparent)]
    Client(#[from] ClientError),
}

impl KubeletError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            KubeletError::Token { .. } => "token",
            KubeletError::NotFound(_) => "checkpoint_unsupported",
            KubeletError::Forbidden(_) => "checkpoint_forbidden",
            KubeletError::Runtime(_) => "checkpoint_runtime",
            KubeletError::NoArchive(_) => "checkpoint_no_archive",
            KubeletError::Client(e) => e.metric_label(),
        }
    }
}

#[derive(serde::Deserialize)]
struct CheckpointAnswer {
    #[serde(default)]
    items: Vec<String>,
}

/// Accepts any kubelet serving certificate. Kubelets often serve self-signed certificates;
/// using this is an explicit operator choice (`--kubelet-insecure-tls`), as in metrics-server.
#[derive(Debug)]
struct AcceptAnyServerCert(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAnyServerCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// TLS to the kubelet: verified against `ca`, or not verified at all when `ca` is None.
pub fn kubelet_tls(ca: Option<&std::path::Path>) -> Result<ClientConfig, crate::tls::TlsError> {
    Ok(match ca {
        Some(ca) => ClientConfig::builder()
            .with_root_certificates(crate::tls::root_store(ca)?)
            .with_no_client_auth(),
        None => ClientConfig::builder()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyServerCert(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))))
            .with_no_client_auth(),
    })
}

#[derive(Clone)]
pub struct KubeletClient {
    http: HttpsClient,
    /// e.g. `https://10.0.0.1:10250`
    base: String,
    token_path: PathBuf,
}

impl KubeletClient {
    pub fn new(tls: ClientConfig, base: impl Into<String>, token_path: impl Into<PathBuf>) -> Self {
        Self {
            http: https_client(tls),
            base: base.into(),
            token_path: token_path.into(),
        }
    }

    /// Checkpoint one container; returns the archive path on this node.
    pub async fn checkpoint(
        &self,
        namespace: &str,
        pod: &str,
        container: &str,
        timeout: Duration,
    ) -> Result<PathBuf, KubeletError> {
        // Projected tokens rotate: read the file on every call.
        let token = tokio::fs::read_to_string(&self.token_path)
            .await
            .map_err(|source| KubeletError::Token {
                path: self.token_path.clone(),
                source,
            })?;
        let url = format!(
            "{}/checkpoint/{namespace}/{pod}/{container}?timeout={}",
            self.base,
            timeout.as_secs().max(1)
        );
        let request = Request::builder()
            .method(Method::POST)
            .uri(&url)
            .header("authorization", format!("Bearer {}", token.trim()))
            .body(empty_body())
            .map_err(|_| ClientError::Url(url.clone()))?;
        // Give the kubelet its own timeout plus a margin to answer.
        let answer: CheckpointAnswer =
            match send(&self.http, request, timeout.saturating_add(Duration::from_secs(15))).await {
                Ok(a) => a,
                Err(ClientError::Status { status, message, .. }) if status == 404 => {
                    return Err(KubeletError::NotFound(message));
                }
                Err(ClientError::Status { status, message, .. }) if status == 401 || status == 403 => {
                    return Err(KubeletError::Forbidden(message));
                }
                Err(ClientError::Status { status, message, .. }) if status.is_server_error() => {
                    return Err(KubeletError::Runtime(message));
                }
                Err(e) => return Err(e.into()),
            };
        answer
            .items
            .into_iter()
            .next()
            .map(PathBuf::from)
            .ok_or_else(|| KubeletError::NoArchive(url))
    }
}
