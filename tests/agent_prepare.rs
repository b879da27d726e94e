//! Before a freeze the controller asks the target agent whether its node can restore the pod
//! (agent/prepare.rs). A stand-in CRI-O on a Unix socket serves the CRI image service and, on the
//! same socket, its configuration over HTTP/1 (`GET /config`), as CRI-O does.

mod common;

use common::agents::{ID, serve_runtime, setup_with};

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use kube_migrate::agent::{
    api::{BaseImage, PrepareRequest, TARGET_UNFIT},
    client::ClientError,
    cri::{Cri, Image, ImageStatusRequest, ImageStatusResponse, PullImageRequest, PullImageResponse},
    prepull::Prepull,
};

/// What the stand-in runtime holds and what it was asked.
#[derive(Default)]
struct Runtime {
    /// References (names, digest references, IDs) of the images it has.
    present: HashSet<String>,
    /// What a pull of a reference adds to `present`; a reference not here fails to pull.
    pullable: HashMap<String, Vec<String>>,
    /// Images (by any reference) whose configuration has neither Entrypoint nor Cmd.
    commandless: HashSet<String>,
    /// Its `GET /config` answer (`None`: 404, as a runtime that serves none).
    config: Option<String>,
    pulls: Vec<(String, bool)>,
}

type Shared = Arc<Mutex<Runtime>>;

const CRIO_CONFIG: &str = "[crio]\n  [crio.runtime]\n    enable_criu_support = true\n    enable_pod_events = false\n";

fn stand_in_crio(socket: &std::path::Path, runtime: Shared) {
    serve_runtime(socket, move |request| answer(Arc::clone(&runtime), request));
}

type Answer = hyper::Response<tonic::body::Body>;

async fn answer(runtime: Shared, request: hyper::Request<hyper::body::Incoming>) -> Answer {
    match request.uri().path() {
        "/config" => {
            let config = runtime.lock().unwrap().config.clone();
            let (status, body) = match config {
                Some(toml) => (200, toml),
                None => (404, String::new()),
            };
            hyper::Response::builder()
                .status(status)
                .body(tonic::body::Body::new(http_body_util::Full::new(bytes::Bytes::from(
                    body,
                ))))
                .unwrap()
        }
        "/runtime.v1.ImageService/ImageStatus" => {
            let mut grpc =
                tonic::server::Grpc::new(tonic_prost::ProstCodec::<ImageStatusResponse, ImageStatusRequest>::default());
            grpc.unary(Status(runtime), request).await
        }
        "/runtime.v1.ImageService/PullImage" => {
            let mut grpc =
                tonic::server::Grpc::new(tonic_prost::ProstCodec::<PullImageResponse, PullImageRequest>::default());
            grpc.unary(Pull(runtime), request).await
        }
        other => panic!("unexpected call {other}"),
    }
}

struct Status(Shared);
struct Pull(Shared);

type Reply<T> = futures::future::BoxFuture<'static, Result<tonic::Response<T>, tonic::Status>>;

impl tonic::server::UnaryService<ImageStatusRequest> for Status {
    type Response = ImageStatusResponse;
    type Future = Reply<ImageStatusResponse>;

    fn call(&mut self, request: tonic::Request<ImageStatusRequest>) -> Self::Future {
        let request = request.into_inner();
        let image = request.image.unwrap_or_default().image;
        let runtime = self.0.lock().unwrap();
        let present = runtime.present.contains(&image);
        // As CRI-O's verbose answer: the OCI configuration under "info".
        let config = if runtime.commandless.contains(&image) {
            r#"{"Env": ["PATH=/bin"]}"#
        } else {
            r#"{"Cmd": ["sh"]}"#
        };
        let info = (present && request.verbose).then(|| {
            (
                "info".to_string(),
                format!(r#"{{"imageSpec": {{"config": {config}}}}}"#),
            )
        });
        Box::pin(async move {
            Ok(tonic::Response::new(ImageStatusResponse {
                image: present.then(|| Image {
                    id: "stand-in".into(),
                    ..Default::default()
                }),
                info: info.into_iter().collect(),
            }))
        })
    }
}

impl tonic::server::UnaryService<PullImageRequest> for Pull {
    type Response = PullImageResponse;
    type Future = Reply<PullImageResponse>;

    fn call(&mut self, request: tonic::Request<PullImageRequest>) -> Self::Future {
        let request = request.into_inner();
        let image = request.image.unwrap_or_default().image;
        let mut runtime = self.0.lock().unwrap();
        runtime.pulls.push((image.clone(), request.auth.is_some()));
        let added = runtime.pullable.get(&image).cloned();
        let result = match added {
            Some(refs) => {
                runtime.present.extend(refs);
                Ok(tonic::Response::new(PullImageResponse { image_ref: image }))
            }
            None => Err(tonic::Status::not_found(format!("{image}: manifest unknown"))),
        };
        Box::pin(async move { result })
    }
}

fn base(container: &str, image: &str, image_id: &str) -> BaseImage {
    BaseImage {
        container: container.into(),
        image: image.into(),
        image_id: image_id.into(),
    }
}

/// An agent whose runtime is the stand-in, and the controller's client.
async fn with_runtime(
    runtime: Runtime,
) -> (
    common::agents::Env,
    common::agents::Agent,
    kube_migrate::agent::client::AgentClient,
    Shared,
) {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("crio.sock");
    let runtime = Arc::new(Mutex::new(runtime));
    stand_in_crio(&socket, Arc::clone(&runtime));
    let cri = Cri::new(&format!("unix://{}", socket.display()), Duration::from_secs(20)).unwrap();
    let (env, _source, target, controller) = setup_with(Prepull {
        cri: Some(cri),
        own: Default::default(),
    })
    .await;
    // The socket's directory lives as long as the runtime task: leak it with the test.
    std::mem::forget(dir);
    (env, target, controller, runtime)
}

/// The refusal an unfit node answers: its message.
fn unfit(result: Result<kube_migrate::agent::api::PrepareResponse, ClientError>) -> String {
    match result {
        Err(ClientError::Status { reason, message, .. }) if reason == TARGET_UNFIT => message,
        other => panic!("expected a {TARGET_UNFIT} refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn present_base_images_pass_and_a_missing_one_is_pulled_by_its_digest() {
    let app = "quay.io/shop/app@sha256:aaaa";
    let side = "quay.io/shop/side@sha256:bbbb";
    let (_env, target, controller, runtime) = with_runtime(Runtime {
        present: HashSet::from([app.to_string()]),
        pullable: HashMap::from([(side.to_string(), vec![side.to_string()])]),
        config: Some(CRIO_CONFIG.into()),
        ..Default::default()
    })
    .await;
    let request = PrepareRequest {
        images: vec![
            base("app", "quay.io/shop/app:1", app),
            base("side", "quay.io/shop/side:2", side),
        ],
    };
    let answer = controller.prepare(&target.url, ID, &request).await.unwrap();
    assert!(answer.checked);
    assert_eq!(answer.pulled, vec![side.to_string()]);
    // Exactly what the container runs, by digest, without credentials; the present one not.
    assert_eq!(runtime.lock().unwrap().pulls, vec![(side.to_string(), false)]);
    // Asked again (a controller retrying): nothing left to pull.
    let again = controller.prepare(&target.url, ID, &request).await.unwrap();
    assert!(again.pulled.is_empty());
    assert_eq!(runtime.lock().unwrap().pulls.len(), 1);
}

#[tokio::test]
async fn a_node_that_cannot_get_the_base_image_is_refused() {
    let id = "0123456789abcdef";
    let (_env, target, controller, runtime) = with_runtime(Runtime {
        // The tag now names another image than the one the container runs.
        pullable: HashMap::from([("localhost/app:1".to_string(), vec!["fedcba9876543210".to_string()])]),
        config: Some(CRIO_CONFIG.into()),
        ..Default::default()
    })
    .await;
    let moved_tag = PrepareRequest {
        images: vec![base("app", "localhost/app:1", id)],
    };
    let why = unfit(controller.prepare(&target.url, ID, &moved_tag).await);
    assert!(
        why.contains("container app") && why.contains(id) && why.contains("another one"),
        "{why}"
    );

    let nowhere = PrepareRequest {
        images: vec![base(
            "app",
            "localhost/only-on-node-1:1",
            "localhost/only-on-node-1@sha256:cccc",
        )],
    };
    let why = unfit(controller.prepare(&target.url, ID, &nowhere).await);
    assert!(
        why.contains("pulling localhost/only-on-node-1@sha256:cccc failed"),
        "{why}"
    );
    assert_eq!(runtime.lock().unwrap().pulls.len(), 2);
}

#[tokio::test]
async fn an_image_without_a_command_of_its_own_is_refused() {
    // CRI-O restores with the image's Entrypoint/Cmd only: measured on real nodes, such a
    // restore fails with `no command specified` after the source is gone.
    let bare = "localhost/bare@sha256:dddd";
    let (_env, target, controller, _runtime) = with_runtime(Runtime {
        present: HashSet::from([bare.to_string()]),
        commandless: HashSet::from([bare.to_string()]),
        config: Some(CRIO_CONFIG.into()),
        ..Default::default()
    })
    .await;
    let request = PrepareRequest {
        images: vec![base("app", "localhost/bare:1", bare)],
    };
    let why = unfit(controller.prepare(&target.url, ID, &request).await);
    assert!(
        why.contains("neither Entrypoint nor Cmd") && why.contains("localhost/bare:1"),
        "{why}"
    );
}

#[tokio::test]
async fn a_runtime_that_cannot_restore_or_hides_restores_is_refused_before_any_image_work() {
    let image = "quay.io/shop/app@sha256:aaaa";
    let request = PrepareRequest {
        images: vec![base("app", "quay.io/shop/app:1", image)],
    };
    for (config, expect) in [
        (
            CRIO_CONFIG.replace("criu_support = true", "criu_support = false"),
            "enable_criu_support = false",
        ),
        (
            CRIO_CONFIG.replace("pod_events = false", "pod_events = true"),
            "enable_pod_events = true",
        ),
    ] {
        let (_env, target, controller, runtime) = with_runtime(Runtime {
            config: Some(config),
            ..Default::default()
        })
        .await;
        let why = unfit(controller.prepare(&target.url, ID, &request).await);
        assert!(why.contains(expect), "{why}");
        assert!(runtime.lock().unwrap().pulls.is_empty());
    }
    // A runtime that serves no configuration (not CRI-O) is judged by its images only.
    let (_env, target, controller, _runtime) = with_runtime(Runtime {
        present: HashSet::from([image.to_string()]),
        config: None,
        ..Default::default()
    })
    .await;
    assert!(controller.prepare(&target.url, ID, &request).await.unwrap().checked);
}

#[tokio::test]
async fn an_agent_without_a_runtime_checks_nothing_and_says_so() {
    let (_env, _source, target, controller) = setup_with(Prepull::default()).await;
    let request = PrepareRequest {
        images: vec![base("app", "quay.io/shop/app:1", "")],
    };
    let answer = controller.prepare(&target.url, ID, &request).await.unwrap();
    assert!(!answer.checked && answer.pulled.is_empty());
    // Bad input is refused, not checked.
    let bad = PrepareRequest {
        images: vec![base("../x", "", "")],
    };
    match controller.prepare(&target.url, ID, &bad).await {
        Err(ClientError::Status { status, .. }) => assert_eq!(status.as_u16(), 400),
        other => panic!("expected 400, got {other:?}"),
    }
}
