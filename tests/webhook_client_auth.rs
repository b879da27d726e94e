//! The API server authenticating to the webhooks (`--client-ca`, `--client-name`): a caller
//! without a client certificate, or with one of another CA, does not get past the handshake; one
//! of the CA that names someone else gets 403; the named one is served.

use std::sync::Arc;

use axum::{Router, routing::get};
use http_body_util::BodyExt;
use kube_migrate::{
    agent::client::{empty_body, https_client},
    certs,
    server::{require_peer_names, serve_tls},
    tls::{CertReloader, client_config, install_crypto_provider, server_config},
};
use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair};

/// A client certificate named `cn`, signed by the CA in `dir`.
fn client_cert(dir: &std::path::Path, cn: &str) -> Arc<CertReloader> {
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
    let issuer = Issuer::from_ca_cert_pem(&read("ca.crt"), KeyPair::from_pem(&read("ca.key")).unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, &issuer).unwrap();
    CertReloader::from_pem(cert.pem().as_bytes(), key.serialize_pem().as_bytes()).unwrap()
}

#[tokio::test]
async fn only_the_named_client_of_the_client_ca_is_served() {
    install_crypto_provider();
    let (ours, theirs) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    for dir in [&ours, &theirs] {
        let request = certs::Request {
            days: 1,
            extra_sans: vec!["127.0.0.1".into()],
            ..Default::default()
        };
        certs::issue(dir.path(), &request).unwrap();
    }
    let serving = CertReloader::new(ours.path().join("webhook.crt"), ours.path().join("webhook.key")).unwrap();
    // The API server's client CA is ours here; in a cluster it is whatever signed the
    // certificate of the API server's AdmissionConfiguration.
    let tls = server_config(serving, Some(&ours.path().join("ca.crt"))).unwrap();
    let router = require_peer_names(
        Router::new().route("/validate/eviction", get(|| async { "reviewed" })),
        vec!["kube-apiserver-webhook-client".into()],
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "https://127.0.0.1:{}/validate/eviction",
        listener.local_addr().unwrap().port()
    );
    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn(serve_tls(listener, tls, router, shutdown.clone()));

    let call = |identity: Option<Arc<CertReloader>>| {
        let http = https_client(client_config(&ours.path().join("ca.crt"), identity).unwrap());
        let url = url.clone();
        async move {
            let response = http
                .request(hyper::Request::get(url).body(empty_body()).unwrap())
                .await
                .map_err(|e| e.to_string())?;
            let status = response.status().as_u16();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok::<_, String>((status, String::from_utf8_lossy(&body).into_owned()))
        }
    };
    // No client certificate, or one of another CA: the handshake fails.
    assert!(call(None).await.is_err());
    assert!(
        call(Some(client_cert(theirs.path(), "kube-apiserver-webhook-client")))
            .await
            .is_err()
    );
    // Of the CA, but naming another client (the controller's own certificate here).
    let (status, body) = call(Some(client_cert(ours.path(), "kube-migrate-webhook")))
        .await
        .unwrap();
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("kube-apiserver-webhook-client"), "{body}");
    let (status, body) = call(Some(client_cert(ours.path(), "kube-apiserver-webhook-client")))
        .await
        .unwrap();
    assert_eq!((status, body.as_str()), (200, "reviewed"));
    shutdown.cancel();
}
