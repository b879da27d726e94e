//! A small private CA for kube-migrate: the webhook's serving certificate (also its client
//! identity towards the agents), the agents' shared mTLS certificate (`--identity files`), and
//! the agent issuer: an intermediate CA whose key only the controller holds, which signs one
//! certificate per node for agents that ask through the CertificateSigningRequest API
//! (`--identity csr`, see [`sign_agent`]). The root key never enters the cluster.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    #[error("generating certificates: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("invalid certificate signing request: {0}")]
    Request(rcgen::Error),
    #[error("invalid name {0:?} for a certificate")]
    Name(String),
}

impl CertsError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            CertsError::Rcgen(_) => "certificate",
            CertsError::Io { .. } => "certificate_io",
            CertsError::Request(_) | CertsError::Name(_) => "certificate_request",
        }
    }
}

/// What to issue.
#[derive(Debug, Clone)]
pub struct Request {
    pub namespace: String,
    pub webhook_service: String,
    pub agent_name: String,
    /// Extra SANs for both leaf certificates (DNS names or IP addresses).
    pub extra_sans: Vec<String>,
    pub days: i64,
}

impl Default for Request {
    /// The names the manifests use; a year of validity.
    fn default() -> Self {
        Self {
            namespace: "kube-migrate".into(),
            webhook_service: "kube-migrate-webhook".into(),
            agent_name: "kube-migrate-agent".into(),
            extra_sans: Vec::new(),
            days: 365,
        }
    }
}

impl Request {
    pub fn webhook_sans(&self) -> Vec<String> {
        let svc = &self.webhook_service;
        let ns = &self.namespace;
        let mut sans = vec![
            svc.clone(),
            format!("{svc}.{ns}"),
            format!("{svc}.{ns}.svc"),
            format!("{svc}.{ns}.svc.cluster.local"),
        ];
        sans.extend(self.extra_sans.iter().cloned());
        sans
    }

    /// The node's runtime pulls checkpoint images from the agent's registry on the node's
    /// loopback, and checks the certificate against what it dialled: `127.0.0.1` is one.
    pub fn agent_sans(&self) -> Vec<String> {
        agent_sans(&self.agent_name, &self.namespace, &self.extra_sans)
    }
}

fn write(path: &Path, contents: &str, private: bool) -> Result<(), CertsError> {
    let io = |source| CertsError::Io {
        path: path.to_owned(),
        source,
    };
    std::fs::write(path, contents).map_err(io)?;
    if private {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    }
    Ok(())
}

fn validity(params: &mut CertificateParams, days: i64) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(days);
}

/// Load the CA in `dir` or create it; then issue `webhook.{crt,key}` and `agent.{crt,key}`.
/// Re-running keeps the CA (so the caBundle stays valid) and renews the leaves.
pub fn issue(dir: &Path, req: &Request) -> Result<(), CertsError> {
    std::fs::create_dir_all(dir).map_err(|source| CertsError::Io {
        path: dir.to_owned(),
        source,
    })?;
    let (ca_cert, ca_key) = (dir.join("ca.crt"), dir.join("ca.key"));
    let existing = match (std::fs::read_to_string(&ca_cert), std::fs::read_to_string(&ca_key)) {
        // A CA of an earlier version (path length 0) cannot have the agent issuer under it.
        (Ok(cert), Ok(key)) if may_sign_issuers(&cert) => Some(KeyPair::from_pem(&key)?),
        (Ok(_), Ok(_)) => {
            eprintln!(
                "the CA in {} cannot sign an intermediate CA: making a new one",
                dir.display()
            );
            None
        }
        _ => None,
    };
    let ca_key_pair = match existing {
        Some(key) => key,
        None => {
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::new(Vec::<String>::new())?;
            params.distinguished_name = DistinguishedName::new();
            params.distinguished_name.push(DnType::CommonName, "kube-migrate CA");
            // One level below: the agent issuer.
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
            params.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            validity(&mut params, 3650);
            let cert = params.self_signed(&key)?;
            write(&ca_cert, &cert.pem(), false)?;
            write(&ca_key, &key.serialize_pem(), true)?;
            key
        }
    };
    let ca_pem = std::fs::read_to_string(&ca_cert).map_err(|source| CertsError::Io {
        path: ca_cert.clone(),
        source,
    })?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key_pair)?;
    for (name, cn, sans) in [
        ("webhook", "kube-migrate-webhook", req.webhook_sans()),
        ("agent", "kube-migrate-agent", req.agent_sans()),
    ] {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(sans)?;
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        // Both serve and act as clients (webhook → agent, agent → agent).
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        validity(&mut params, req.days);
        let cert = params.signed_by(&key, &issuer)?;
        write(&dir.join(format!("{name}.crt")), &cert.pem(), false)?;
        write(&dir.join(format!("{name}.key")), &key.serialize_pem(), true)?;
    }
    // The agent issuer: renewed with the leaves (certificates it signed stay valid while the
    // root is the same, as they chain to the root through the issuer they were given with).
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, "kube-migrate agent issuer");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    validity(&mut params, req.days);
    let cert = params.signed_by(&key, &issuer)?;
    write(&dir.join("agent-issuer.crt"), &cert.pem(), false)?;
    write(&dir.join("agent-issuer.key"), &key.serialize_pem(), true)?;
    Ok(())
}

fn may_sign_issuers(ca_pem: &str) -> bool {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let Some(Ok(der)) = rustls_pemfile::certs(&mut ca_pem.as_bytes()).next() else {
        return false;
    };
    let Ok((_, cert)) = X509Certificate::from_der(&der) else {
        return false;
    };
    matches!(cert.basic_constraints(), Ok(Some(bc)) if bc.value.ca && bc.value.path_len_constraint != Some(0))
}

/// What the controller puts in a node's agent certificate, whatever the request asked for.
#[derive(Debug, Clone)]
pub struct AgentLeaf {
    pub node: String,
    /// DNS names and IPs: the agent Service's names, `127.0.0.1` (the registry on node
    /// loopback) and any extra the controller was given.
    pub sans: Vec<String>,
    pub seconds: u64,
}

/// The SANs of every agent certificate, see [`Request::agent_sans`].
pub fn agent_sans(agent_name: &str, namespace: &str, extra: &[String]) -> Vec<String> {
    let mut sans = vec![
        agent_name.to_string(),
        format!("{agent_name}.{namespace}.svc"),
        "127.0.0.1".into(),
    ];
    sans.extend(extra.iter().cloned());
    sans
}

/// A new key and a PEM certificate request for node `node`'s agent: `(request, key)`.
pub fn agent_request(agent_name: &str, node: &str) -> Result<(String, String), CertsError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec![agent_name.to_string()])?;
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, agent_name);
    params.subject_alt_names.push(node_uri(node)?);
    let csr = params.serialize_request(&key)?;
    Ok((csr.pem()?, key.serialize_pem()))
}

fn node_uri(node: &str) -> Result<rcgen::SanType, CertsError> {
    let uri = format!("{}{node}", crate::tls::NODE_URI_PREFIX);
    rcgen::string::Ia5String::try_from(uri)
        .map(rcgen::SanType::URI)
        .map_err(|_| CertsError::Name(node.to_string()))
}

/// Sign the public key of `request_pem` (its signature checked) into a certificate for
/// `leaf`, with the agent issuer. Only the key is taken from the request: names, usages and
/// validity are the controller's. Returns the chain (leaf, then issuer) in PEM.
pub fn sign_agent(
    issuer_pem: &str,
    issuer_key_pem: &str,
    request_pem: &str,
    leaf: &AgentLeaf,
) -> Result<String, CertsError> {
    let mut csr = rcgen::CertificateSigningRequestParams::from_pem(request_pem).map_err(CertsError::Request)?;
    let mut params = CertificateParams::new(leaf.sans.clone())?;
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, "kube-migrate-agent");
    params.subject_alt_names.push(node_uri(&leaf.node)?);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    let now = OffsetDateTime::now_utc();
    // Some slack for clocks a little behind ours.
    params.not_before = now - Duration::minutes(5);
    params.not_after = now + Duration::seconds(leaf.seconds as i64);
    csr.params = params;
    let issuer = Issuer::from_ca_cert_pem(issuer_pem, KeyPair::from_pem(issuer_key_pem)?)?;
    let cert = csr.signed_by(&issuer)?;
    Ok(format!("{}{}", cert.pem(), issuer_pem))
}
