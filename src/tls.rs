//! TLS for the webhook and the agents: one ring provider, certificates hot-reloaded.
//!
//! Kubernetes updates a mounted Secret by swapping a `..data` symlink, which file watches on
//! the certificate path miss; so the files are polled and reloaded when their content hash
//! changes. Handshakes read the current key through an `ArcSwap`, lock-free.

use std::{
    fmt,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use arc_swap::ArcSwap;
use rustls::{
    ClientConfig, RootCertStore, ServerConfig,
    client::ResolvesClientCert,
    pki_types::CertificateDer,
    server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier},
    sign::CertifiedKey,
};
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path} holds no PEM private key")]
    NoKey { path: PathBuf },
    #[error("invalid key or certificate: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("invalid client CA: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

impl TlsError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            TlsError::Read { .. } => "tls_read",
            TlsError::NoCertificate { .. } | TlsError::NoKey { .. } => "tls_pem",
            TlsError::Rustls(_) | TlsError::Verifier(_) => "tls_invalid",
        }
    }
}

/// Installs the process-wide crypto provider (ring). Call once, first thing in `main`.
pub fn install_crypto_provider() {
    // Err means already installed, which is fine for tests that call it repeatedly.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|source| TlsError::Read {
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { path: path.to_owned() });
    }
    Ok(certs)
}

pub fn root_store(ca: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(ca)? {
        roots.add(cert)?;
    }
    Ok(roots)
}

/// A certificate and key pair read from two files, reloaded when their content changes; or
/// held in memory and replaced by [`CertReloader::install`] (agent certificates from the
/// CertificateSigningRequest API).
pub struct CertReloader {
    cert_path: PathBuf,
    key_path: PathBuf,
    current: ArcSwap<CertifiedKey>,
    hash: ArcSwap<[u8; 32]>,
}

impl fmt::Debug for CertReloader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertReloader")
            .field("cert_path", &self.cert_path)
            .field("key_path", &self.key_path)
            .finish()
    }
}

impl CertReloader {
    pub fn new(cert_path: impl Into<PathBuf>, key_path: impl Into<PathBuf>) -> Result<Arc<Self>, TlsError> {
        let cert_path = cert_path.into();
        let key_path = key_path.into();
        let (key, hash) = Self::load(&cert_path, &key_path)?;
        Ok(Arc::new(Self {
            cert_path,
            key_path,
            current: ArcSwap::from_pointee(key),
            hash: ArcSwap::from_pointee(hash),
        }))
    }

    /// A pair held in memory only (never polled).
    pub fn from_pem(cert: &[u8], key: &[u8]) -> Result<Arc<Self>, TlsError> {
        let (key, hash) = Self::parse(cert, key, Path::new("(memory)"))?;
        Ok(Arc::new(Self {
            cert_path: PathBuf::new(),
            key_path: PathBuf::new(),
            current: ArcSwap::from_pointee(key),
            hash: ArcSwap::from_pointee(hash),
        }))
    }

    /// Replace the pair with one given in PEM; the previous one stays on error.
    pub fn install(&self, cert: &[u8], key: &[u8]) -> Result<(), TlsError> {
        let (key, hash) = Self::parse(cert, key, Path::new("(memory)"))?;
        self.current.store(Arc::new(key));
        self.hash.store(Arc::new(hash));
        Ok(())
    }

    fn load(cert: &Path, key: &Path) -> Result<(CertifiedKey, [u8; 32]), TlsError> {
        Self::parse(&read(cert)?, &read(key)?, cert)
    }

    fn parse(cert_pem: &[u8], key_pem: &[u8], origin: &Path) -> Result<(CertifiedKey, [u8; 32]), TlsError> {
        let mut hasher = Sha256::new();
        hasher.update(cert_pem);
        hasher.update(key_pem);
        let hash: [u8; 32] = hasher.finalize().into();
        let io = |source| TlsError::Read {
            path: origin.to_owned(),
            source,
        };
        let certs: Vec<_> = rustls_pemfile::certs(&mut &*cert_pem)
            .collect::<Result<_, _>>()
            .map_err(io)?;
        if certs.is_empty() {
            return Err(TlsError::NoCertificate {
                path: origin.to_owned(),
            });
        }
        let key = rustls_pemfile::private_key(&mut &*key_pem)
            .map_err(io)?
            .ok_or_else(|| TlsError::NoKey {
                path: origin.to_owned(),
            })?;
        let provider = rustls::crypto::ring::default_provider();
        let certified = CertifiedKey::from_der(certs, key, &provider)?;
        Ok((certified, hash))
    }

    /// Reload when the files changed. Ok(true) when a new pair was installed; on error the
    /// previous pair stays in use (a half-written Secret update must not break TLS).
    pub fn reload(&self) -> Result<bool, TlsError> {
        let (key, hash) = Self::load(&self.cert_path, &self.key_path)?;
        if **self.hash.load() == hash {
            return Ok(false);
        }
        self.current.store(Arc::new(key));
        self.hash.store(Arc::new(hash));
        Ok(true)
    }

    /// Poll the files forever.
    pub fn spawn_poll(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                match this.reload() {
                    Ok(true) => {
                        tracing::info!(cert = %this.cert_path.display(), "reloaded TLS certificate")
                    }
                    Ok(false) => {}
                    Err(error) => {
                        tracing::warn!(%error, "TLS certificate reload failed; keeping the previous one")
                    }
                }
            }
        })
    }

    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current.load_full()
    }
}

impl ResolvesServerCert for CertReloader {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

impl ResolvesClientCert for CertReloader {
    fn resolve(&self, _issuers: &[&[u8]], _schemes: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Server config; with `client_ca`, clients must present a certificate signed by it (mTLS).
pub fn server_config(certs: Arc<CertReloader>, client_ca: Option<&Path>) -> Result<ServerConfig, TlsError> {
    let builder = ServerConfig::builder();
    let builder = match client_ca {
        Some(ca) => {
            builder.with_client_cert_verifier(WebPkiClientVerifier::builder(Arc::new(root_store(ca)?)).build()?)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(certs);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// Client config trusting `ca`, presenting `identity` when given (mTLS).
pub fn client_config(ca: &Path, identity: Option<Arc<CertReloader>>) -> Result<ClientConfig, TlsError> {
    let builder = ClientConfig::builder().with_root_certificates(root_store(ca)?);
    // ALPN is left to the HTTP connector.
    Ok(match identity {
        Some(id) => builder.with_client_cert_resolver(id),
        None => builder.with_no_client_auth(),
    })
}

/// Verifies the server's certificate against the CA for a fixed name, whatever address was
/// dialled. Agents are reached by node or pod IP, unknown when their certificate is issued,
/// so their certificate names the agent Service instead.
#[derive(Debug)]
struct FixedNameVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    name: rustls::pki_types::ServerName<'static>,
}

impl rustls::client::danger::ServerCertVerifier for FixedNameVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _dialled: &rustls::pki_types::ServerName<'_>,
        ocsp: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, &self.name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// mTLS client config for talking to agents: trusts `ca`, expects `server_name` in the
/// agent's certificate, presents `identity`.
pub fn agent_client_config(
    ca: &Path,
    identity: Arc<CertReloader>,
    server_name: &str,
) -> Result<ClientConfig, TlsError> {
    let inner = rustls::client::WebPkiServerVerifier::builder(Arc::new(root_store(ca)?))
        .build()
        .map_err(|e| TlsError::Rustls(rustls::Error::General(e.to_string())))?;
    let name = rustls::pki_types::ServerName::try_from(server_name.to_string())
        .map_err(|e| TlsError::Rustls(rustls::Error::General(e.to_string())))?;
    Ok(ClientConfig::builder()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(FixedNameVerifier { inner, name }))
        .with_client_cert_resolver(identity))
}

/// How long the leaf certificate of `key` is still valid (none when it cannot be read).
pub fn remaining(key: &CertifiedKey) -> Option<Duration> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, cert) = X509Certificate::from_der(key.end_entity_cert().ok()?).ok()?;
    let left = cert.validity().time_to_expiration()?;
    Some(Duration::from_secs(left.whole_seconds().max(0) as u64))
}

/// URI SAN prefix of a per-node agent certificate: `urn:kube-migrate:node:<node name>`. Node
/// names may be 253 bytes long, too long to fit a DNS name under a suffix, hence a URI.
pub const NODE_URI_PREFIX: &str = "urn:kube-migrate:node:";

/// The names a TLS client proved with its certificate (DNS SANs and the common name), for
/// handlers that authorise by caller, and the node a per-node agent certificate names. Empty
/// when the client showed no certificate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerIdentity {
    pub names: Vec<String>,
    pub node: Option<String>,
}

impl PeerIdentity {
    /// The identity in a client's (already verified) leaf certificate.
    pub fn from_certificate(der: &[u8]) -> Self {
        use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
        let Ok((_, cert)) = X509Certificate::from_der(der) else {
            return Self::default();
        };
        let mut names: Vec<String> = cert
            .subject()
            .iter_common_name()
            .filter_map(|cn| cn.as_str().ok().map(str::to_string))
            .collect();
        let mut nodes = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(d) => names.push(d.to_string()),
                    GeneralName::URI(u) => nodes.extend(u.strip_prefix(NODE_URI_PREFIX).map(str::to_string)),
                    _ => {}
                }
            }
        }
        // A certificate naming two nodes names none.
        let node = match nodes.as_slice() {
            [one] => Some(one.clone()),
            _ => None,
        };
        Self { names, node }
    }

    pub fn is(&self, name: &str) -> bool {
        self.names.iter().any(|n| n == name)
    }
}
