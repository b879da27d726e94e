//! Registry credentials from a pod's `imagePullSecrets`, as the kubelet finds and uses them:
//! each listed `kubernetes.io/dockerconfigjson` Secret of the pod's namespace, the entry for
//! the registry's `host:port`, tried in order until one pull succeeds (a replacement gated for
//! several candidate migrations lists each one's credential). Secrets that cannot be read are
//! skipped (the kubelet warns and pulls anyway); the registry then refuses the pull.

use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::{Api, Client, ResourceExt};

use crate::restore::{ImageRef, Manifest, Puller, RestoreError};

/// The `Authorization` header for `registry` from a dockerconfigjson document.
pub fn auth_for(config: &[u8], registry: &str) -> Option<String> {
    let config: serde_json::Value = serde_json::from_slice(config).ok()?;
    let auth = config["auths"][registry]["auth"].as_str()?;
    Some(format!("Basic {auth}"))
}

/// Every credential for `registry` among the pod's pull Secrets, in their order.
pub async fn basic_auths(client: &Client, pod: &Pod, registry: &str) -> Vec<String> {
    let names = pod
        .spec
        .as_ref()
        .and_then(|s| s.image_pull_secrets.clone())
        .unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &pod.namespace().unwrap_or_default());
    let mut found = Vec::new();
    for name in names {
        match secrets.get(&name.name).await {
            Ok(secret) => found.extend(
                secret
                    .data
                    .as_ref()
                    .and_then(|d| d.get(".dockerconfigjson"))
                    .and_then(|c| auth_for(&c.0, registry)),
            ),
            Err(error) => {
                tracing::warn!(secret = %name.name, %error, "pull secret unavailable; pulling without it")
            }
        }
    }
    found
}

/// The image's manifest, pulled as the kubelet pulls (`kuberuntime_image.go`): with each
/// credential for its registry in turn until one is accepted (anonymously when there is
/// none); `reference` keeps the credential that worked for the layers.
pub async fn manifest(
    client: &Client,
    pod: &Pod,
    puller: &Puller,
    reference: &mut ImageRef,
) -> Result<Manifest, RestoreError> {
    let auths = basic_auths(client, pod, &reference.registry).await;
    if auths.is_empty() {
        reference.auth = None;
        return puller.manifest(reference).await;
    }
    let mut last = None;
    for auth in auths {
        reference.auth = Some(auth);
        match puller.manifest(reference).await {
            Ok(manifest) => return Ok(manifest),
            Err(e) => last = Some(e),
        }
    }
    Err(last.expect("at least one credential was tried"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_entry_of_the_registry_is_taken() {
        let config = br#"{"auths":{"127.0.0.1:5443":{"auth":"a3ViZTpwdw=="},"other:1":{"auth":"x"}}}"#;
        assert_eq!(
            auth_for(config, "127.0.0.1:5443").as_deref(),
            Some("Basic a3ViZTpwdw==")
        );
        assert_eq!(auth_for(config, "127.0.0.1:5444"), None);
        assert_eq!(auth_for(b"not json", "127.0.0.1:5443"), None);
    }
}
