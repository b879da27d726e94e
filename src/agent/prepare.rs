//! `POST /v1/migrations/{id}/prepare`: before the source is frozen, the controller asks the
//! target agent whether its node can restore the pod. What would otherwise fail only after the
//! source is gone is found while the pod still runs, and another node is chosen:
//!
//! * CRI-O with `enable_criu_support = false` cannot restore at all;
//! * CRI-O with `enable_pod_events = true` (the kubelet's EventedPLEG) sends no event for a
//!   restored container: the kubelet sees it only at its 300 s relist (measured, see
//!   docs/install-cri-o.md section 4);
//! * CRI-O's restore looks each container's base image up by ID and never pulls it: a missing
//!   one is pulled now (without credentials, as for a pod without pull secrets), and if that
//!   fails the node is refused;
//! * CRI-O's restore starts the container with its image's `Entrypoint`/`Cmd` only (the pod's
//!   `command` is not passed on: cri-o `server/container_restore.go`), so an image with neither
//!   fails every restore with `no command specified`: refused too, whatever the node.
//!
//! An agent without a runtime endpoint checks nothing and says so (`checked: false`).

use std::{sync::Arc, time::Instant};

use axum::{
    Json,
    extract::{Path, State},
};
use tracing::instrument;

use super::{
    api::{self, BaseImage, PrepareRequest, PrepareResponse},
    cri::Cri,
    server::{AgentError, AgentState},
};

/// What CRI-O's configuration says about restores (`None`: not in it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RuntimeFacts {
    pub criu: Option<bool>,
    pub pod_events: Option<bool>,
}

/// Read the two settings from CRI-O's configuration (`[crio.runtime]`).
pub fn runtime_facts(config: &str) -> Result<RuntimeFacts, toml::de::Error> {
    let table: toml::Table = toml::from_str(config)?;
    let runtime = table
        .get("crio")
        .and_then(|c| c.get("runtime"))
        .and_then(toml::Value::as_table);
    let flag = |key: &str| runtime.and_then(|r| r.get(key)).and_then(toml::Value::as_bool);
    Ok(RuntimeFacts {
        criu: flag("enable_criu_support"),
        pod_events: flag("enable_pod_events"),
    })
}

/// Why a runtime with these settings cannot be a target, if it cannot.
pub fn runtime_unfit(facts: RuntimeFacts) -> Option<String> {
    if facts.criu == Some(false) {
        return Some("CRI-O runs with enable_criu_support = false: it cannot restore a checkpoint".into());
    }
    if facts.pod_events == Some(true) {
        return Some(
            "CRI-O runs with enable_pod_events = true (EventedPLEG): it reports no event for a restored \
             container, so the kubelet would see the replacement only after minutes"
                .into(),
        );
    }
    None
}

/// For one container: the reference to look up (what the container runs), and what to pull
/// when the node does not have it. A digest reference pulls exactly that image; an image ID
/// cannot be pulled, only the spec's name, which must then resolve to the same ID.
pub fn wanted(image: &BaseImage) -> (&str, &str) {
    if image.image_id.is_empty() {
        return (&image.image, &image.image);
    }
    if image.image_id.contains('@') {
        (&image.image_id, &image.image_id)
    } else {
        (&image.image_id, &image.image)
    }
}

/// Whether an image, by CRI-O's verbose `ImageStatus` information, has no command of its own
/// (neither `Entrypoint` nor `Cmd`); `None` when the runtime does not say.
pub fn lacks_command(info: &std::collections::HashMap<String, String>) -> Option<bool> {
    let info: serde_json::Value = serde_json::from_str(info.get("info")?).ok()?;
    let config = info.get("imageSpec")?.get("config");
    let has = |key: &str| {
        config
            .and_then(|c| c.get(key))
            .and_then(serde_json::Value::as_array)
            .is_some_and(|a| !a.is_empty())
    };
    Some(!has("Entrypoint") && !has("Cmd"))
}

#[instrument(skip_all, fields(id = %id))]
pub async fn prepare(
    State(state): State<Arc<AgentState>>,
    Path(id): Path<String>,
    Json(req): Json<PrepareRequest>,
) -> Result<Json<PrepareResponse>, AgentError> {
    if let Some(bad) = req
        .images
        .iter()
        .find(|b| !api::valid_container(&b.container) || b.image.is_empty())
    {
        return Err(AgentError::BadRequest(format!("invalid base image {bad:?}")));
    }
    let Some(cri) = state.prepull.cri.clone() else {
        return Ok(Json(PrepareResponse::default()));
    };
    let started = Instant::now();
    let result = check(&cri, &req).await;
    state.record_op("prepare", started, &result);
    if let Ok(answer) = &result
        && !answer.pulled.is_empty()
    {
        tracing::info!(pulled = ?answer.pulled, seconds = started.elapsed().as_secs_f64(), "base images pulled before the freeze");
    }
    result.map(Json)
}

async fn check(cri: &Cri, req: &PrepareRequest) -> Result<PrepareResponse, AgentError> {
    match cri.runtime_config().await {
        Ok(Some(config)) => match runtime_facts(&config) {
            Ok(facts) => {
                if let Some(why) = runtime_unfit(facts) {
                    return Err(AgentError::Unfit(why));
                }
            }
            Err(error) => tracing::warn!(%error, "the runtime's configuration is not TOML; its settings not checked"),
        },
        // Not CRI-O: nothing to read; the image checks below still hold.
        Ok(None) => {}
        Err(error) => tracing::warn!(%error, "the runtime's configuration could not be read; its settings not checked"),
    }
    let unanswered = |e: super::cri::CriError| AgentError::Unfit(format!("the node's runtime did not answer: {e}"));
    let mut pulled = Vec::new();
    for image in &req.images {
        let (look_up, pull) = wanted(image);
        let mut status = cri.image_status(look_up).await.map_err(unanswered)?;
        if status.image.is_none() {
            if let Err(e) = cri.pull(pull, None).await {
                return Err(AgentError::Unfit(format!(
                    "container {}: the node has no image {look_up} (CRI-O restores only onto its base image) \
                     and pulling {pull} failed: {e}",
                    image.container
                )));
            }
            status = cri.image_status(look_up).await.map_err(unanswered)?;
            if status.image.is_none() {
                return Err(AgentError::Unfit(format!(
                    "container {}: the node has no image {look_up}, and {pull} pulled now is another one",
                    image.container
                )));
            }
            pulled.push(pull.to_string());
        }
        if lacks_command(&status.info) == Some(true) {
            return Err(AgentError::Unfit(format!(
                "container {}: its image {} has neither Entrypoint nor Cmd; CRI-O restores a container with \
                 its image's command only (not the pod's), so the restore would fail with `no command specified`",
                image.container, image.image
            )));
        }
    }
    Ok(PrepareResponse { checked: true, pulled })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_read_from_crio_runtime() {
        // As CRI-O v1.34 prints it (GET /config), shortened.
        let config = "[crio]\n  root = \"/x\"\n  [crio.runtime]\n    enable_criu_support = true\n    \
                      enable_pod_events = false\n    [crio.runtime.runtimes]\n";
        let facts = runtime_facts(config).unwrap();
        assert_eq!(
            facts,
            RuntimeFacts {
                criu: Some(true),
                pod_events: Some(false)
            }
        );
        assert_eq!(runtime_unfit(facts), None);
        assert_eq!(runtime_facts("[crio]\n").unwrap(), RuntimeFacts::default());
        assert!(runtime_facts("not = toml = here").is_err());
    }

    #[test]
    fn a_runtime_that_cannot_restore_or_hides_restores_is_unfit() {
        let no_criu = runtime_unfit(RuntimeFacts {
            criu: Some(false),
            pod_events: None,
        });
        assert!(no_criu.unwrap().contains("enable_criu_support = false"));
        let events = runtime_unfit(RuntimeFacts {
            criu: Some(true),
            pod_events: Some(true),
        });
        assert!(events.unwrap().contains("enable_pod_events = true"));
        // Unknown is not unfit: a runtime that does not say is given the benefit of the doubt.
        assert_eq!(runtime_unfit(RuntimeFacts::default()), None);
    }

    #[test]
    fn an_image_without_entrypoint_or_cmd_lacks_a_command() {
        let info = |json: &str| std::collections::HashMap::from([("info".to_string(), json.to_string())]);
        let spec = |config: &str| info(&format!(r#"{{"imageSpec": {{"config": {config}}}}}"#));
        assert_eq!(lacks_command(&spec(r#"{"Env": ["A=1"]}"#)), Some(true));
        assert_eq!(lacks_command(&spec(r#"{"Cmd": [], "Entrypoint": null}"#)), Some(true));
        assert_eq!(lacks_command(&spec(r#"{"Cmd": ["sh"]}"#)), Some(false));
        assert_eq!(lacks_command(&spec(r#"{"Entrypoint": ["/bin/memhog"]}"#)), Some(false));
        // No config at all in the spec: nothing to run either.
        assert_eq!(lacks_command(&info(r#"{"imageSpec": {}}"#)), Some(true));
        // The runtime said nothing usable: unknown.
        assert_eq!(lacks_command(&Default::default()), None);
        assert_eq!(lacks_command(&info("not json")), None);
        assert_eq!(lacks_command(&info(r#"{"labels": {}}"#)), None);
    }

    #[test]
    fn a_digest_reference_is_pulled_as_is_an_image_id_by_its_name() {
        let base = |image: &str, image_id: &str| BaseImage {
            container: "c".into(),
            image: image.into(),
            image_id: image_id.into(),
        };
        let digest = "quay.io/x/y@sha256:aaaa";
        assert_eq!(wanted(&base("quay.io/x/y:1", digest)), (digest, digest));
        let id = "0123abcd";
        assert_eq!(wanted(&base("quay.io/x/y:1", id)), (id, "quay.io/x/y:1"));
        assert_eq!(wanted(&base("quay.io/x/y:1", "")), ("quay.io/x/y:1", "quay.io/x/y:1"));
    }
}
