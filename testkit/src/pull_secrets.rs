//! Registry credentials from a pod's `imagePullSecrets`, as the kubelet finds them: each
//! listed `kubernetes.io/dockerconfigjson` Secret of the pod's namespace, the entry for the
//! registry's `host:port`. Secrets that cannot be read are skipped (the kubelet warns and
//! pulls anyway); the registry then refuses the pull.

use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::{Api, Client, ResourceExt};

/// The `Authorization` header for `registry` from a dockerconfigjson document.
pub fn auth_for(config: &[u8], registry: &str) -> Option<String> {
    let config: serde_json::Value = serde_json::from_slice(config).ok()?;
    let auth = config["auths"][registry]["auth"].as_str()?;
    Some(format!("Basic {auth}"))
}

/// The first credential for `registry` among the pod's pull Secrets.
pub async fn basic_auth(client: &Client, pod: &Pod, registry: &str) -> Option<String> {
    let names = pod.spec.as_ref()?.image_pull_secrets.clone().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &pod.namespace().unwrap_or_default());
    for name in names {
        match secrets.get(&name.name).await {
            Ok(secret) => {
                let found = secret
                    .data
                    .as_ref()
                    .and_then(|d| d.get(".dockerconfigjson"))
                    .and_then(|c| auth_for(&c.0, registry));
                if found.is_some() {
                    return found;
                }
            }
            Err(error) => {
                tracing::warn!(secret = %name.name, %error, "pull secret unavailable; pulling without it")
            }
        }
    }
    None
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
