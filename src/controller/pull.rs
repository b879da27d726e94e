//! The per-migration credential that lets the target node's runtime, and nothing else, pull a
//! migration's checkpoint images from the target agent's registry.
//!
//! The password is `HMAC-SHA256(key, PodMigration UID)` with the controller's own TLS key as
//! the key (both replicas mount the same Secret), so every replica derives the same one and
//! nothing has to be stored or read back: the controller only creates (applies) and deletes
//! the pull Secret, it never reads Secrets of user namespaces. The agent is given the
//! password's digest with the image build; the pod webhook lists the Secret in the
//! replacement's `imagePullSecrets` when the pod is created (the field is immutable after).

use std::path::Path;

use base64::Engine;
use k8s_openapi::{ByteString, api::core::v1::Secret, apimachinery::pkg::apis::meta::v1::ObjectMeta};
use kube::{Resource, ResourceExt};

use crate::{
    agent::api::PULL_USER,
    api::{self, PodMigration},
};

/// The pull password of migration `uid`, from the key file's bytes.
pub fn password(key: &[u8], uid: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    hex::encode(ring::hmac::sign(&key, uid.as_bytes()).as_ref())
}

/// The password of `pm` from the key file at `key_file`, read each time (it is rotated
/// with the certificates).
pub fn password_of(key_file: &Path, pm: &PodMigration) -> std::io::Result<String> {
    let key = std::fs::read(key_file)?;
    Ok(password(&key, pm.uid().as_deref().unwrap_or_default()))
}

/// The `kubernetes.io/dockerconfigjson` Secret holding `password` for `registry` (the
/// `host:port` the runtime pulls from), owned by the PodMigration.
pub fn secret(pm: &PodMigration, registry: &str, password: &str) -> Secret {
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{PULL_USER}:{password}"));
    let config = serde_json::json!({ "auths": { registry: { "auth": auth } } });
    Secret {
        metadata: ObjectMeta {
            name: Some(api::pull_secret_name(&pm.name_any())),
            namespace: pm.namespace(),
            labels: Some([("app.kubernetes.io/managed-by".to_string(), "kube-migrate".to_string())].into()),
            owner_references: pm.controller_owner_ref(&()).map(|o| vec![o]),
            ..Default::default()
        },
        type_: Some("kubernetes.io/dockerconfigjson".into()),
        data: Some(
            [(
                ".dockerconfigjson".to_string(),
                ByteString(config.to_string().into_bytes()),
            )]
            .into(),
        ),
        ..Default::default()
    }
}

/// `host:port` of an image reference `host:port/repo:tag`.
pub fn registry_of(image: &str) -> Option<&str> {
    image.split_once('/').map(|(host, _)| host)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::PodMigrationSpec;

    #[test]
    fn one_password_per_migration_and_key_in_a_pull_secret() {
        assert_eq!(password(b"key", "uid-1"), password(b"key", "uid-1"));
        assert_ne!(password(b"key", "uid-1"), password(b"key", "uid-2"));
        assert_ne!(password(b"key", "uid-1"), password(b"other", "uid-1"));
        let spec = PodMigrationSpec {
            pod_name: "db-0".into(),
            pod_uid: "0c9a8d74".into(),
            source_node: "node-a".into(),
            target_node: None,
            trigger: crate::api::Trigger::Drain,
            policy: Default::default(),
            mode: Default::default(),
            restore_from: None,
        };
        let mut pm = PodMigration::new("db-0-0c9a8d74", spec);
        pm.metadata.namespace = Some("shop".into());
        pm.metadata.uid = Some("uid-1".into());
        let s = secret(&pm, "127.0.0.1:5443", "pw");
        assert_eq!(s.metadata.name.as_deref(), Some("db-0-0c9a8d74-pull"));
        assert_eq!(s.type_.as_deref(), Some("kubernetes.io/dockerconfigjson"));
        let config: serde_json::Value = serde_json::from_slice(&s.data.unwrap()[".dockerconfigjson"].0).unwrap();
        let auth = config["auths"]["127.0.0.1:5443"]["auth"].as_str().unwrap();
        let decoded = base64::engine::general_purpose::STANDARD.decode(auth).unwrap();
        assert_eq!(decoded, b"kube-migrate:pw");
        assert_eq!(s.metadata.owner_references.unwrap()[0].name, "db-0-0c9a8d74");
        assert_eq!(registry_of("127.0.0.1:5443/kube-migrate/x:app"), Some("127.0.0.1:5443"));
    }
}
