//! `POST /v1/migrations/{id}/expect`: the controller tells a target agent what it may receive
//! for a migration (each archive and emptyDir by digest) and from which node. An upload of
//! anything else is refused before a byte is stored: an agent certificate (all that root on
//! some node can take) cannot fill another node's disk or plant an archive the controller did
//! not ask for.

use std::sync::Arc;

use axum::{
    Json,
    extract::{Path, State},
};
use tracing::instrument;

use super::{
    api::{self, ExpectRequest, Kind},
    server::{AgentError, AgentState},
    store::Record,
};
use crate::tls::PeerIdentity;

#[instrument(skip_all, fields(id = %id, source = %req.source_node))]
pub async fn expect(
    State(state): State<Arc<AgentState>>,
    Path(id): Path<String>,
    Json(req): Json<ExpectRequest>,
) -> Result<Json<serde_json::Value>, AgentError> {
    let bad = req
        .archives
        .iter()
        .chain(&req.volumes)
        .find(|a| !api::valid_container(&a.container) || !a.digest.starts_with("sha256:"));
    if let Some(bad) = bad {
        return Err(AgentError::BadRequest(format!("invalid expected archive {bad:?}")));
    }
    if !api::valid_pod_name(&req.source_node) {
        return Err(AgentError::BadRequest(format!(
            "invalid node name {:?}",
            req.source_node
        )));
    }
    state.store.create_dir(&id)?; // also refuses an invalid id
    let _guard = state.lock(&id).await;
    let mut record = state.store.load(&id)?.unwrap_or_default();
    // Replaced, not merged: a migration retried from a new checkpoint expects new digests.
    record.expected = Some(req);
    state.store.save(&id, &record)?;
    Ok(Json(serde_json::json!({})))
}

/// The archives to build images of now: every archive `record` expects, when it asked for
/// pre-pulling and each is verified here with the expected digest; else `None`.
pub fn ready_to_build(record: &Record) -> Option<Vec<api::ArchiveRef>> {
    let expected = record
        .expected
        .as_ref()
        .filter(|e| e.prepull && !e.archives.is_empty())?;
    let all_here = expected
        .archives
        .iter()
        .all(|a| record.received.get(&a.container).is_some_and(|r| r.digest == a.digest));
    all_here.then(|| expected.archives.clone())
}

/// The archive to describe and pull while it arrives: `name`, when it is the only archive
/// `record` expects and pre-pulling was asked for (several containers' images are built and
/// pulled once all are here, by [`ready_to_build`]).
pub fn streamed(record: &Record, name: &str) -> Option<api::ArchiveRef> {
    let expected = record.expected.as_ref().filter(|e| e.prepull)?;
    match expected.archives.as_slice() {
        [only] if only.container == name => Some(only.clone()),
        _ => None,
    }
}

/// May `peer` upload `name` (of `kind`) with `digest` for a migration expecting `expected`?
/// With `require_node`, the uploader's certificate must name the expected source node (per-node
/// agent certificates); without, any agent certificate may (one shared certificate). `Ok` holds
/// the expected size: no more is accepted.
pub fn admit_upload(
    expected: Option<&ExpectRequest>,
    kind: Kind,
    name: &str,
    digest: &str,
    peer: &PeerIdentity,
    require_node: bool,
) -> Result<u64, String> {
    let Some(expected) = expected else {
        return Err("no upload is expected for this migration".into());
    };
    if require_node && peer.node.as_deref() != Some(expected.source_node.as_str()) {
        return Err(format!(
            "uploads for this migration come from node {}'s agent; the caller's certificate names {}",
            expected.source_node,
            peer.node.as_deref().unwrap_or("no node")
        ));
    }
    let list = match kind {
        Kind::Archive => &expected.archives,
        Kind::Volume => &expected.volumes,
    };
    match list.iter().find(|a| a.container == name) {
        None => Err(format!("{} {name} is not expected", kind.segment())),
        Some(a) if a.digest != digest => Err(format!(
            "{} {name}: expected digest {}, the upload claims {digest}",
            kind.segment(),
            a.digest
        )),
        Some(a) => Ok(a.size_bytes),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::api::{ArchiveRecord, ArchiveRef};

    fn expected() -> ExpectRequest {
        let r = |c: &str, d: &str| ArchiveRef {
            container: c.into(),
            digest: d.into(),
            size_bytes: 1,
        };
        ExpectRequest {
            source_node: "node-a".into(),
            archives: vec![r("app", "sha256:aa")],
            volumes: vec![r("scratch", "sha256:bb")],
            prepull: false,
        }
    }

    fn received(container: &str, digest: &str) -> ArchiveRecord {
        ArchiveRecord {
            container: container.into(),
            path: format!("/store/{container}.tar"),
            digest: digest.into(),
            size_bytes: 1,
            base_image: String::new(),
            seconds: 0.0,
        }
    }

    #[test]
    fn images_are_built_early_only_when_asked_and_every_archive_is_verified() {
        let mut e = expected();
        e.archives.push(ArchiveRef {
            container: "sidecar".into(),
            digest: "sha256:cc".into(),
            size_bytes: 1,
        });
        let mut record = Record {
            expected: Some(e.clone()),
            ..Default::default()
        };
        record.received.insert("app".into(), received("app", "sha256:aa"));
        record
            .received
            .insert("sidecar".into(), received("sidecar", "sha256:cc"));
        assert_eq!(ready_to_build(&record), None, "not asked for");
        e.prepull = true;
        record.expected = Some(e.clone());
        assert_eq!(ready_to_build(&record), Some(e.archives.clone()));
        // One container still missing, or held with another digest (an older attempt's).
        record.received.remove("sidecar");
        assert_eq!(ready_to_build(&record), None, "one still to come");
        record
            .received
            .insert("sidecar".into(), received("sidecar", "sha256:old"));
        assert_eq!(ready_to_build(&record), None, "an earlier attempt's archive");
        // Volumes do not hold the images back (they are placed later, by their own call).
        record
            .received
            .insert("sidecar".into(), received("sidecar", "sha256:cc"));
        assert!(record.received_volumes.is_empty());
        assert!(ready_to_build(&record).is_some());
        record.expected = None;
        assert_eq!(ready_to_build(&record), None, "nothing expected");
    }

    #[test]
    fn only_the_only_archive_of_a_pulled_migration_is_streamed() {
        let mut e = expected();
        let mut record = Record {
            expected: Some(e.clone()),
            ..Default::default()
        };
        assert_eq!(streamed(&record, "app"), None, "not asked for");
        e.prepull = true;
        record.expected = Some(e.clone());
        assert_eq!(streamed(&record, "app"), Some(e.archives[0].clone()));
        assert_eq!(streamed(&record, "scratch"), None, "a volume, not an archive");
        e.archives.push(ArchiveRef {
            container: "sidecar".into(),
            digest: "sha256:cc".into(),
            size_bytes: 1,
        });
        record.expected = Some(e);
        assert_eq!(
            streamed(&record, "app"),
            None,
            "two containers: pulled once both are here"
        );
    }

    fn agent_of(node: Option<&str>) -> PeerIdentity {
        PeerIdentity {
            names: vec!["kube-migrate-agent".into()],
            node: node.map(str::to_string),
        }
    }

    #[test]
    fn only_what_was_expected_from_the_expected_node() {
        let e = expected();
        let a = agent_of(Some("node-a"));
        assert_eq!(
            admit_upload(Some(&e), Kind::Archive, "app", "sha256:aa", &a, true),
            Ok(1)
        );
        assert_eq!(
            admit_upload(Some(&e), Kind::Volume, "scratch", "sha256:bb", &a, true),
            Ok(1)
        );
        // Nothing expected, another container, another digest, an archive posing as a volume.
        assert!(admit_upload(None, Kind::Archive, "app", "sha256:aa", &a, true).is_err());
        assert!(admit_upload(Some(&e), Kind::Archive, "other", "sha256:aa", &a, true).is_err());
        assert!(admit_upload(Some(&e), Kind::Archive, "app", "sha256:cc", &a, true).is_err());
        assert!(admit_upload(Some(&e), Kind::Volume, "app", "sha256:aa", &a, true).is_err());
        // Another node's agent, or a certificate naming no node, when nodes are required.
        let why = admit_upload(
            Some(&e),
            Kind::Archive,
            "app",
            "sha256:aa",
            &agent_of(Some("node-c")),
            true,
        )
        .unwrap_err();
        assert!(why.contains("node-a") && why.contains("node-c"), "{why}");
        assert!(admit_upload(Some(&e), Kind::Archive, "app", "sha256:aa", &agent_of(None), true).is_err());
        // The shared certificate of `--identity files`: no node to compare.
        assert_eq!(
            admit_upload(Some(&e), Kind::Archive, "app", "sha256:aa", &agent_of(None), false),
            Ok(1)
        );
    }
}
