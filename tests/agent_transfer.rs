//! Two agents over real mTLS on loopback: checkpoint through a kubelet endpoint that checks
//! its bearer token, stream to the other agent with digest verification, build the image and
//! pull its manifest and layer back through the registry endpoint.

mod common;

use common::agents::{ID, checkpoint_request, expect_of, node_identity, push_of, refs, setup};

use std::time::Duration;

use axum::http::StatusCode;
use http_body_util::BodyExt;
use kube_migrate::{
    agent::{
        api::{ArchiveRef, CheckpointRequest, ImageRequest, Kind, PushRequest, pull_digest},
        client::{AgentClient, ClientError, empty_body, https_client},
    },
    tls::{CertReloader, agent_client_config, client_config},
};
use serde_json::Value;

#[tokio::test]
async fn checkpoint_transfer_image_and_pull_over_mtls() {
    let (env, source, target, controller) = setup().await;

    let answer = controller
        .checkpoint(&source.url, ID, &checkpoint_request(&["app", "sidecar"]))
        .await
        .unwrap();
    assert_eq!(answer.archives.len(), 2);
    let app = &answer.archives[0];
    assert!(app.path.starts_with(env.kubelet_dir.to_str().unwrap()));
    assert_eq!(app.base_image, "registry.local/counter:1");
    let (digest, size) = kube_migrate::agent::archive::digest_file(std::path::Path::new(&app.path)).unwrap();
    assert_eq!((digest.as_str(), size), (app.digest.as_str(), app.size_bytes));

    // Idempotent: a controller retrying after a restart gets the same checkpoint back.
    let again = controller
        .checkpoint(&source.url, ID, &checkpoint_request(&["app", "sidecar"]))
        .await
        .unwrap();
    assert_eq!(again.archives, answer.archives);

    let refs = refs(&answer.archives);
    let push = PushRequest {
        volumes: Vec::new(),
        target_id: None,
        transfer: Default::default(),
        target: target.url.clone(),
        archives: refs.clone(),
    };
    controller
        .expect(&target.url, ID, &expect_of(&push, "node-a"))
        .await
        .unwrap();
    let pushed = controller.push(&source.url, ID, &push).await.unwrap();
    assert_eq!(pushed.bytes, answer.archives.iter().map(|a| a.size_bytes).sum::<u64>());
    let received = target
        .state_dir
        .join("migrations")
        .join(ID)
        .join("archives")
        .join("app.tar");
    assert_eq!(
        kube_migrate::agent::archive::digest_file(&received).unwrap().0,
        app.digest
    );

    let images = controller
        .build_image(
            &target.url,
            ID,
            &ImageRequest {
                namespace: "shop".into(),
                pod: "db-0".into(),
                archives: refs,
                pull_digest: Some(pull_digest("s3cret")),
                prepull: false,
            },
        )
        .await
        .unwrap();
    assert_eq!(images.images.len(), 2);
    assert_eq!(
        images.images[0].image,
        format!("{}/kube-migrate/{ID}:app", target.registry)
    );

    // Pull through the registry endpoint like a runtime would.
    let http = https_client(client_config(&env.certs.join("ca.crt"), None).unwrap());
    let get_as = |path: String, password: Option<&'static str>| {
        let http = http.clone();
        async move {
            let uri = format!("https://127.0.0.1:{}{path}", target.registry.port());
            let mut request = hyper::Request::get(uri);
            if let Some(password) = password {
                use base64::Engine;
                let basic = base64::engine::general_purpose::STANDARD.encode(format!("kube-migrate:{password}"));
                request = request.header("authorization", format!("Basic {basic}"));
            }
            let response = http.request(request.body(empty_body()).unwrap()).await.unwrap();
            let status = response.status();
            let digest = response
                .headers()
                .get("docker-content-digest")
                .map(|v| v.to_str().unwrap().to_string());
            (status, digest, response.into_body().collect().await.unwrap().to_bytes())
        }
    };
    // Only the pull that holds this migration's credential is served (the runtime, given
    // the replacement's pull Secret by the kubelet); a local process without it is not.
    let manifest_path = format!("/v2/kube-migrate/{ID}/manifests/app");
    let (status, _, _) = get_as("/v2/".into(), None).await;
    assert_eq!(status, 401, "the ping asks for credentials");
    let (status, _, body) = get_as(manifest_path.clone(), None).await;
    assert_eq!(status, 401, "anonymous: {}", String::from_utf8_lossy(&body));
    let (status, _, _) = get_as(manifest_path.clone(), Some("guess")).await;
    assert_eq!(status, 403, "wrong password");
    let get = |path: String| get_as(path, Some("s3cret"));
    let (status, digest, body) = get(manifest_path).await;
    assert_eq!(status, 200);
    assert_eq!(digest.as_deref(), Some(images.images[0].manifest_digest.as_str()));
    let manifest: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        manifest["annotations"]["io.kubernetes.cri-o.annotations.checkpoint.name"],
        "app"
    );
    let layer_digest = manifest["layers"][0]["digest"].as_str().unwrap().to_string();
    assert_eq!(layer_digest, app.digest);
    let (status, _, layer) = get(format!("/v2/kube-migrate/{ID}/blobs/{layer_digest}")).await;
    assert_eq!(status, 200);
    assert_eq!(layer.len() as u64, app.size_bytes);
    let (status, _, _) = get(format!("/v2/kube-migrate/{ID}/manifests/nope")).await;
    assert_eq!(status, 404);

    // Checkpoint memory at rest: every file 0600, every directory 0700, on both nodes.
    for agent in [&source, &target] {
        let mut seen = 0;
        assert_private(&agent.state_dir, &mut seen);
        assert!(seen >= 1, "{:?} holds the migration's record", agent.state_dir);
    }

    // Deleting forgets everything, the kubelet's archives included.
    controller.delete(&source.url, ID).await.unwrap();
    controller.delete(&target.url, ID).await.unwrap();
    assert!(!std::path::Path::new(&app.path).exists());
    assert!(!target.state_dir.join("migrations").join(ID).exists());
}

fn assert_private(dir: &std::path::Path, seen: &mut usize) {
    use std::os::unix::fs::MetadataExt;
    let mode = std::fs::metadata(dir).unwrap().mode() & 0o777;
    assert_eq!(mode, 0o700, "{dir:?} is {mode:o}");
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            assert_private(&path, seen);
        } else {
            let mode = std::fs::metadata(&path).unwrap().mode() & 0o777;
            assert_eq!(mode, 0o600, "{path:?} is {mode:o}");
            *seen += 1;
        }
    }
}

#[tokio::test]
async fn a_digest_mismatch_is_refused_and_leaves_nothing_behind() {
    let (env, source, target, controller) = setup().await;
    let answer = controller
        .checkpoint(&source.url, ID, &checkpoint_request(&["app"]))
        .await
        .unwrap();
    let path = &answer.archives[0].path;
    let wrong = ArchiveRef {
        container: "app".into(),
        digest: format!("sha256:{}", "0".repeat(64)),
        size_bytes: answer.archives[0].size_bytes,
    };
    let file = tokio::fs::File::open(path).await.unwrap();
    // Upload directly, as a source agent with a corrupted archive would: what was expected
    // is not what arrives.
    let expected = kube_migrate::agent::api::ExpectRequest {
        source_node: "node-a".into(),
        archives: vec![wrong.clone()],
        volumes: Vec::new(),
        prepull: false,
    };
    controller.expect(&target.url, ID, &expected).await.unwrap();
    let identity = node_identity(&env, "node-a");
    let peer = AgentClient::new(
        agent_client_config(&env.certs.join("ca.crt"), identity, "kube-migrate-agent").unwrap(),
        Duration::from_secs(60),
    );
    let err = peer
        .upload(&target.url, ID, Kind::Archive, &wrong, file, Default::default())
        .await
        .unwrap_err();
    let ClientError::Status {
        status,
        reason,
        message,
        ..
    } = &err
    else {
        panic!("{err}")
    };
    assert_eq!(*status, 422);
    assert_eq!(reason, "digest_mismatch");
    assert!(message.contains("expected sha256:000"), "{message}");
    let dir = target.state_dir.join("migrations").join(ID).join("archives");
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "no partial archive kept");
    // And the push API refuses a digest it does not hold.
    let err = controller
        .push(
            &source.url,
            ID,
            &PushRequest {
                volumes: Vec::new(),
                target_id: None,
                transfer: Default::default(),
                target: target.url.clone(),
                archives: vec![wrong],
            },
        )
        .await
        .unwrap_err();
    assert!(!err.retryable(), "{err}");
}

/// A new leader resuming `Transferring` pushes again: what the target already verified is
/// not sent a second time.
#[tokio::test]
async fn a_repeated_push_sends_only_what_the_target_lacks() {
    let (_env, source, target, controller) = setup().await;
    let answer = controller
        .checkpoint(&source.url, ID, &checkpoint_request(&["app", "sidecar"]))
        .await
        .unwrap();
    let total: u64 = answer.archives.iter().map(|a| a.size_bytes).sum();
    let push = push_of(&target.url, &answer.archives);
    controller
        .expect(&target.url, ID, &expect_of(&push, "node-a"))
        .await
        .unwrap();
    let first = controller.push(&source.url, ID, &push).await.unwrap();
    assert_eq!((first.bytes, first.already_held_bytes), (total, 0));
    let second = controller.push(&source.url, ID, &push).await.unwrap();
    assert_eq!(second.bytes, total, "the whole state is on the target");
    assert_eq!(second.already_held_bytes, total, "and none of it was sent again");
    // What the target holds is what the controller can ask for.
    let held = controller
        .held(&target.url, ID, Kind::Archive, "app")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(held.digest, answer.archives[0].digest);
    assert!(
        controller
            .held(&target.url, ID, Kind::Archive, "other")
            .await
            .unwrap()
            .is_none()
    );
}

/// An archive truncated on the source after its checkpoint is refused before anything is
/// sent, as corruption (not retryable), not as a network error.
#[tokio::test]
async fn a_truncated_archive_is_named_corrupt_before_sending() {
    let (_env, source, target, controller) = setup().await;
    let answer = controller
        .checkpoint(&source.url, ID, &checkpoint_request(&["app"]))
        .await
        .unwrap();
    let a = &answer.archives[0];
    std::fs::OpenOptions::new()
        .write(true)
        .open(&a.path)
        .unwrap()
        .set_len(a.size_bytes / 2)
        .unwrap();
    let err = controller
        .push(
            &source.url,
            ID,
            &PushRequest {
                volumes: Vec::new(),
                target_id: None,
                transfer: Default::default(),
                target: target.url.clone(),
                archives: refs(&answer.archives),
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.reason(), Some("archive_corrupt"), "{err}");
    assert!(!err.retryable(), "{err}");
    assert!(err.to_string().contains("bytes on disk"), "{err}");
    assert!(
        controller
            .held(&target.url, ID, Kind::Archive, "app")
            .await
            .unwrap()
            .is_none(),
        "nothing kept on the target"
    );
}

#[tokio::test]
async fn kubelet_errors_are_explained() {
    let (_env, source, _target, controller) = setup().await;
    let err = controller
        .checkpoint(&source.url, ID, &checkpoint_request(&["missing"]))
        .await
        .unwrap_err();
    let ClientError::Status {
        status,
        reason,
        message,
        ..
    } = &err
    else {
        panic!("{err}")
    };
    assert_eq!(
        (*status, reason.as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, "checkpoint_unsupported")
    );
    assert!(message.contains("ContainerCheckpoint feature gate"), "{message}");
    let err = controller
        .checkpoint(&source.url, "../etc", &checkpoint_request(&["app"]))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ClientError::Status { status, .. } if status.as_u16() == 400 || status.as_u16() == 404),
        "{err}"
    );
}

/// Inputs that used to panic the connection task (a timeout near `u64::MAX` overflowed an
/// addition) or reach the kubelet's URL unchecked are answered 400, and the agent lives on.
#[tokio::test]
async fn hostile_checkpoint_requests_are_refused_not_panicked_on() {
    let (_env, source, _target, controller) = setup().await;
    let with = |change: &dyn Fn(&mut CheckpointRequest)| {
        let mut req = checkpoint_request(&["app"]);
        change(&mut req);
        req
    };
    let hostile = [
        with(&|r| r.pod = "db-0/../../../pods".into()),
        with(&|r| r.namespace = "shop?x=1".into()),
        with(&|r| r.pod = "DB-0".into()),
        checkpoint_request(&["app-"]),
        // Container IDs go into cgroup and hold-file paths.
        with(&|r| {
            r.freeze = Some(kube_migrate::agent::api::FreezeSpec {
                container_ids: [("app".into(), "cri-o://../../../etc".into())].into(),
                hold_seconds: 60,
            })
        }),
    ];
    for req in &hostile {
        let err = controller.checkpoint(&source.url, ID, req).await.unwrap_err();
        assert!(
            matches!(&err, ClientError::Status { status, .. } if status.as_u16() == 400),
            "{req:?}: {err}"
        );
    }
    // The overflow input is clamped (to an hour) and the checkpoint is taken.
    let answer = controller
        .checkpoint(
            &source.url,
            ID,
            &CheckpointRequest {
                timeout_seconds: u64::MAX,
                ..checkpoint_request(&["app"])
            },
        )
        .await
        .expect("a huge timeout is clamped, not a panic");
    assert_eq!(answer.archives.len(), 1);
}

/// An agent certificate (what root on any node holds) cannot drive another agent, and the
/// controller's cannot hand it archives: each caller may do only its own part.
#[tokio::test]
async fn each_caller_may_do_only_its_own_part() {
    let (env, source, target, controller) = setup().await;
    let agent_identity = CertReloader::new(env.certs.join("agent.crt"), env.certs.join("agent.key")).unwrap();
    let rogue = AgentClient::new(
        agent_client_config(&env.certs.join("ca.crt"), agent_identity, "kube-migrate-agent").unwrap(),
        Duration::from_secs(30),
    );
    let forbidden = |err: ClientError| {
        assert!(
            matches!(&err, ClientError::Status { status, reason, .. } if status.as_u16() == 403 && reason == "forbidden"),
            "{err}"
        );
    };
    forbidden(
        rogue
            .checkpoint(&source.url, ID, &checkpoint_request(&["app"]))
            .await
            .unwrap_err(),
    );
    assert!(
        std::fs::read_dir(&env.kubelet_dir).unwrap().next().is_none(),
        "no checkpoint was taken"
    );
    // The controller checkpoints; an agent identity still may not push it anywhere.
    let answer = controller
        .checkpoint(&source.url, ID, &checkpoint_request(&["app"]))
        .await
        .unwrap();
    let push = push_of(&target.url, &answer.archives);
    forbidden(rogue.push(&source.url, ID, &push).await.unwrap_err());
    forbidden(rogue.push_progress(&source.url, ID).await.unwrap_err());
    forbidden(rogue.delete(&source.url, ID).await.unwrap_err());
    // The controller may not write archives into an agent either: only agents send them.
    // An empty body: the refusal comes before any byte is read, and a body still streaming
    // when the 403 closes the exchange would end the client with a send error instead.
    let empty = env.kubelet_dir.with_file_name("empty.tar");
    std::fs::write(&empty, b"").unwrap();
    let nothing = ArchiveRef {
        size_bytes: 0,
        ..refs(&answer.archives)[0].clone()
    };
    let file = tokio::fs::File::open(&empty).await.unwrap();
    forbidden(
        controller
            .upload(&target.url, ID, Kind::Archive, &nothing, file, Default::default())
            .await
            .unwrap_err(),
    );
    // The real path still works end to end.
    controller
        .expect(&target.url, ID, &expect_of(&push, "node-a"))
        .await
        .unwrap();
    controller.push(&source.url, ID, &push).await.unwrap();
}

async fn nothing_held(controller: &AgentClient, target: &common::agents::Agent) -> bool {
    controller
        .held(&target.url, ID, Kind::Archive, "app")
        .await
        .unwrap()
        .is_none()
}

/// A target keeps only what the controller told it to expect, by digest, and only from the
/// expected source node's own certificate: another node's agent (root there holds its key)
/// cannot plant archives, nor can the source send what was not checkpointed for it.
#[tokio::test]
async fn a_target_takes_only_what_it_expects_from_the_node_it_expects() {
    let (env, source, target, controller) = setup().await;
    let answer = controller
        .checkpoint(&source.url, ID, &checkpoint_request(&["app"]))
        .await
        .unwrap();
    let push = push_of(&target.url, &answer.archives);
    // Nothing expected yet; expected from another node (node-a's agent may not deliver it);
    // expected from node-a but with another digest.
    let mut other_digest = expect_of(&push, "node-a");
    other_digest.archives[0].digest = format!("sha256:{}", "1".repeat(64));
    for (expect, why) in [
        (None, "no upload is expected"),
        (
            Some(expect_of(&push, "node-c")),
            "the caller's certificate names node-a",
        ),
        (Some(other_digest), "expected digest sha256:111"),
    ] {
        if let Some(expect) = expect {
            controller.expect(&target.url, ID, &expect).await.unwrap();
        }
        let err = controller.push(&source.url, ID, &push).await.unwrap_err();
        assert!(!err.retryable(), "{err}");
        assert!(err.to_string().contains(why), "{err} should say {why:?}");
        assert!(nothing_held(&controller, &target).await);
    }
    // Rightly expected from node-a: node-c's agent still may not upload it, however it
    // learnt the digest (the status of the PodMigration shows it).
    controller
        .expect(&target.url, ID, &expect_of(&push, "node-a"))
        .await
        .unwrap();
    let rogue = AgentClient::new(
        agent_client_config(
            &env.certs.join("ca.crt"),
            node_identity(&env, "node-c"),
            "kube-migrate-agent",
        )
        .unwrap(),
        Duration::from_secs(30),
    );
    let file = tokio::fs::File::open(&answer.archives[0].path).await.unwrap();
    let err = rogue
        .upload(
            &target.url,
            ID,
            Kind::Archive,
            &push.archives[0],
            file,
            Default::default(),
        )
        .await
        .unwrap_err();
    // Refused before the body is read: the 403, or, when the target's close reaches the
    // uploader while it is still writing the body (a race seen in 3 of 8 runs), the broken
    // connection. Either way nothing may be held, which is what matters.
    assert!(
        matches!(&err, ClientError::Status { status, .. } if status.as_u16() == 403)
            || matches!(&err, ClientError::Connect { .. }),
        "{err}"
    );
    assert!(nothing_held(&controller, &target).await);
    // The agent of node-a delivers it.
    let pushed = controller.push(&source.url, ID, &push).await.unwrap();
    assert_eq!(pushed.bytes, answer.archives[0].size_bytes);
    let held = controller
        .held(&target.url, ID, Kind::Archive, "app")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(held.digest, answer.archives[0].digest);
}

#[tokio::test]
async fn the_agent_api_requires_a_client_certificate() {
    let (env, source, _target, _controller) = setup().await;
    let anonymous = AgentClient::new(
        client_config(&env.certs.join("ca.crt"), None).unwrap(),
        Duration::from_secs(10),
    );
    let err = anonymous.delete(&source.url, ID).await;
    // The dialled name is the IP, which the agent certificate also carries (issued with
    // --san 127.0.0.1 here), so only the missing client certificate can fail this.
    assert!(
        matches!(err, Err(ClientError::Connect { .. }) | Err(ClientError::Body { .. })),
        "{err:?}"
    );
}
