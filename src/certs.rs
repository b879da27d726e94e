//! A small private CA for kube-migrate: the webhook's serving certificate (also its client
//! identity towards the agents) and the agents' mTLS certificate.

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

    pub fn agent_sans(&self) -> Vec<String> {
        let mut sans = vec![
            self.agent_name.clone(),
            format!("{}.{}.svc", self.agent_name, self.namespace),
            // The node's runtime pulls checkpoint images from the agent's registry on the
            // node's loopback, and checks the certificate against what it dialled.
            "127.0.0.1".into(),
        ];
        sans.extend(self.extra_sans.iter().cloned());
        sans
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
    let ca_key_pair = match (std::fs::read_to_string(&ca_cert), std::fs::read_to_string(&ca_key)) {
        (Ok(_), Ok(key)) => KeyPair::from_pem(&key)?,
        _ => {
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::new(Vec::<String>::new())?;
            params.distinguished_name = DistinguishedName::new();
            params.distinguished_name.push(DnType::CommonName, "kube-migrate CA");
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
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
    Ok(())
}
