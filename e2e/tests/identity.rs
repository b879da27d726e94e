//! End-to-end: who the agents are and what they agree to do (issue #13). Each agent holds a
//! certificate for its own node, signed by the controller through the CertificateSigningRequest
//! API for the node its token is bound to; a request from anyone else is denied. An agent
//! checkpoints only what a PodMigration in `Checkpointing` asks for, whoever calls it: even the
//! controller's own certificate cannot replay a finished migration. Run by `scripts/e2e.sh`.

use std::{collections::BTreeSet, time::Duration};

use k8s_openapi::{
    ByteString,
    api::certificates::v1::{CertificateSigningRequest, CertificateSigningRequestSpec},
};
use kube::{
    Api, ResourceExt,
    api::{ListParams, ObjectMeta, PostParams},
};
use kube_migrate::{
    agent::{api::CheckpointRequest, client::AgentClient, client::ClientError, identity::SIGNER},
    certs,
    tls::{CertReloader, PeerIdentity, agent_client_config, install_crypto_provider},
};
use kube_migrate_e2e::{
    client, drain_a, eventually, fresh_namespace, km_dir, migrations_succeeded, must, opted_in_deployment,
    start_on_node_a,
};

/// The node named by the leaf certificate of a PEM chain.
fn node_of_chain(pem: &[u8]) -> Option<String> {
    let der = rustls_pemfile_first(pem)?;
    PeerIdentity::from_certificate(&der).node
}

fn rustls_pemfile_first(pem: &[u8]) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(pem).ok()?;
    let body: String = text
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN CERTIFICATE"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(body).ok()
}

#[tokio::test]
#[ignore = "needs the local cluster (scripts/e2e.sh)"]
async fn s25_agents_are_their_node_and_checkpoint_only_what_a_podmigration_asks() -> anyhow::Result<()> {
    install_crypto_provider();
    let kube = client().await;
    let csrs: Api<CertificateSigningRequest> = Api::all(kube.clone());

    // 1. Each node's agent holds a certificate naming that node, signed for the node its token
    //    is bound to (the API server's extra, not anything the agent wrote).
    let mut signed = BTreeSet::new();
    for csr in csrs.list(&ListParams::default()).await? {
        if csr.spec.signer_name != SIGNER {
            continue;
        }
        let Some(chain) = csr.status.as_ref().and_then(|s| s.certificate.as_ref()) else {
            continue;
        };
        let node = node_of_chain(&chain.0).expect("the certificate names a node");
        let vouched = csr
            .spec
            .extra
            .as_ref()
            .and_then(|e| e.get("authentication.kubernetes.io/node-name"))
            .cloned()
            .unwrap_or_default();
        assert_eq!(
            vouched,
            vec![node.clone()],
            "{} names the node its token is bound to",
            csr.name_any()
        );
        signed.insert(node);
    }
    assert_eq!(
        signed,
        BTreeSet::from(["node-a".to_string(), "node-b".into(), "node-c".into()])
    );

    // 2. Anyone else asking for an agent certificate (here the cluster admin, for node-b) is
    //    denied with the reason, and gets nothing.
    let (request, _key) = certs::agent_request("kube-migrate-agent", "node-b")?;
    let forged = csrs
        .create(
            &PostParams::default(),
            &CertificateSigningRequest {
                metadata: ObjectMeta {
                    generate_name: Some("forged-agent-".into()),
                    ..Default::default()
                },
                spec: CertificateSigningRequestSpec {
                    request: ByteString(request.into_bytes()),
                    signer_name: SIGNER.into(),
                    usages: Some(vec!["client auth".into(), "server auth".into()]),
                    ..Default::default()
                },
                status: None,
            },
        )
        .await?;
    let name = forged.name_any();
    let denied = eventually("the forged request denied", Duration::from_secs(30), || {
        let csrs = csrs.clone();
        let name = name.clone();
        async move {
            let status = csrs.get(&name).await?.status.unwrap_or_default();
            let denied = status
                .conditions
                .unwrap_or_default()
                .into_iter()
                .find(|c| c.type_ == "Denied");
            Ok(denied.map(|d| (d.message.unwrap_or_default(), status.certificate)))
        }
    })
    .await?;
    println!("forged request: {}", denied.0);
    assert!(
        denied
            .0
            .contains("only system:serviceaccount:kube-migrate:kube-migrate-agent"),
        "{}",
        denied.0
    );
    assert!(denied.1.is_none(), "no certificate for a denied request");
    csrs.delete(&name, &Default::default()).await?;

    // 3. A migration that ran; then its PodMigration replayed to node-a's agent with the
    //    controller's own certificate: refused, and no checkpoint is taken.
    let ns = "e2e-identity";
    fresh_namespace(ns);
    start_on_node_a(ns, &opted_in_deployment(ns, "vault", "identity", 1 << 20, ""), 1).await?;
    let drain = drain_a("e2e=identity");
    must(&["uncordon", "node-a"]);
    assert!(drain.ok, "{}", drain.all());
    let done = migrations_succeeded(ns, 1, Duration::from_secs(120), |_| true).await?;
    let pm = &done[0];
    let certs_dir = km_dir().join("certs");
    let controller = AgentClient::new(
        agent_client_config(
            &certs_dir.join("ca.crt"),
            CertReloader::new(certs_dir.join("webhook.crt"), certs_dir.join("webhook.key"))?,
            "kube-migrate-agent",
        )?,
        Duration::from_secs(30),
    );
    let checkpoints = km_dir().join("node-a").join("checkpoints");
    // Names, not a count: the finished migration's own archive may be cleaned up meanwhile.
    let names = || -> std::collections::BTreeSet<std::ffi::OsString> {
        std::fs::read_dir(&checkpoints)
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default()
    };
    let before = names();
    let replay = |migration: &str| CheckpointRequest {
        migration: migration.into(),
        namespace: ns.into(),
        pod: pm.spec.pod_name.clone(),
        containers: vec!["app".into()],
        timeout_seconds: 30,
        freeze: None,
        empty_dirs: Vec::new(),
    };
    let agent_a = "https://127.0.0.1:19443";
    let id = pm.uid().unwrap();
    for (migration, why) in [
        (pm.name_any(), "is Succeeded, not Checkpointing"),
        ("no-such-migration".to_string(), "does not exist"),
    ] {
        let err = controller
            .checkpoint(agent_a, &id, &replay(&migration))
            .await
            .unwrap_err();
        println!("replay of {migration}: {err}");
        assert!(
            matches!(&err, ClientError::Status { status, reason, message, .. }
                if status.as_u16() == 403 && reason == "forbidden" && message.contains(why)),
            "{err}"
        );
    }
    let taken: Vec<_> = names().difference(&before).cloned().collect();
    assert!(taken.is_empty(), "checkpoints taken on node-a: {taken:?}");
    must(&["delete", "namespace", ns, "--wait=false"]);
    Ok(())
}
