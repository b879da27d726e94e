//! The target agent pulls a checkpoint image into its node's runtime as soon as it is built
//! (agent/prepull.rs), through a stand-in runtime that serves the CRI image service on a Unix
//! socket and, like CRI-O, pulls from the agent's registry with the credential it was handed.
//! Other pulls of the same migration wait for it; nobody else gets the agent's credential.

mod common;

use common::agents::{ID, checkpoint_request, expect_of, push_of, serve_runtime, setup_with};

use std::{sync::Arc, time::Duration};

use http_body_util::BodyExt;
use kube_migrate::{
    agent::{
        api::{CheckpointResponse, ImageRequest, PushRequest, pull_digest},
        client::{empty_body, https_client},
        cri::{Cri, PullImageRequest, PullImageResponse},
        prepull::Prepull,
    },
    tls::client_config,
};
use sha2::{Digest, Sha256};
use tokio::sync::{Semaphore, mpsc};

/// What the stand-in runtime saw of one PullImage call.
#[derive(Debug)]
struct Pulled {
    image: String,
    user: String,
    password: String,
    /// sha256 of the manifest and of the layer it read from the registry with that credential.
    manifest_sha256: String,
    layer_sha256: String,
}

/// GET `path` of the registry at `port` with HTTP Basic `kube-migrate:password`.
async fn get(ca: std::path::PathBuf, port: u16, path: String, password: String) -> (u16, bytes::Bytes) {
    use base64::Engine;
    let http = https_client(client_config(&ca, None).unwrap());
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("kube-migrate:{password}"));
    let request = hyper::Request::get(format!("https://127.0.0.1:{port}{path}"))
        .header("authorization", format!("Basic {basic}"))
        .body(empty_body())
        .unwrap();
    let response = http.request(request).await.unwrap();
    let status = response.status().as_u16();
    (status, response.into_body().collect().await.unwrap().to_bytes())
}

/// A runtime on `socket` answering PullImage: it reads the image's manifest and layer from the
/// registry at `port` with the request's credential, reports it, then waits for a permit of
/// `finish` before answering (the pull is "running" until then).
fn stand_in_runtime(
    socket: &std::path::Path,
    ca: std::path::PathBuf,
    port: u16,
    finish: Arc<Semaphore>,
) -> mpsc::UnboundedReceiver<Pulled> {
    let (seen, pulls) = mpsc::unbounded_channel();
    serve_runtime(socket, move |request| {
        let pull = PullService {
            seen: seen.clone(),
            ca: ca.clone(),
            port,
            finish: Arc::clone(&finish),
        };
        async move {
            assert_eq!(request.uri().path(), "/runtime.v1.ImageService/PullImage");
            let mut grpc =
                tonic::server::Grpc::new(tonic_prost::ProstCodec::<PullImageResponse, PullImageRequest>::default());
            grpc.unary(pull, request).await
        }
    });
    pulls
}

struct PullService {
    seen: mpsc::UnboundedSender<Pulled>,
    ca: std::path::PathBuf,
    port: u16,
    finish: Arc<Semaphore>,
}

impl tonic::server::UnaryService<PullImageRequest> for PullService {
    type Response = PullImageResponse;
    type Future = futures::future::BoxFuture<'static, Result<tonic::Response<PullImageResponse>, tonic::Status>>;

    fn call(&mut self, request: tonic::Request<PullImageRequest>) -> Self::Future {
        let (seen, ca, port, finish) = (self.seen.clone(), self.ca.clone(), self.port, Arc::clone(&self.finish));
        Box::pin(async move {
            let request = request.into_inner();
            let image = request.image.unwrap_or_default().image;
            let auth = request.auth.unwrap_or_default();
            // <host:port>/kube-migrate/<id>:<tag>, as CRI-O resolves it.
            let (repository, tag) = image.split_once('/').unwrap().1.rsplit_once(':').unwrap();
            let (status, manifest) = get(
                ca.clone(),
                port,
                format!("/v2/{repository}/manifests/{tag}"),
                auth.password.clone(),
            )
            .await;
            assert_eq!(status, 200, "{}", String::from_utf8_lossy(&manifest));
            let manifest_sha256 = format!("sha256:{}", hex::encode(Sha256::digest(&manifest)));
            let manifest: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
            let layer = manifest["layers"][0]["digest"].as_str().unwrap();
            let (status, blob) = get(
                ca,
                port,
                format!("/v2/{repository}/blobs/{layer}"),
                auth.password.clone(),
            )
            .await;
            assert_eq!(status, 200);
            seen.send(Pulled {
                image,
                user: auth.username,
                password: auth.password,
                manifest_sha256,
                layer_sha256: format!("sha256:{}", hex::encode(Sha256::digest(&blob))),
            })
            .unwrap();
            finish.acquire().await.unwrap().forget();
            Ok(tonic::Response::new(PullImageResponse {
                image_ref: "stand-in-image-id".into(),
            }))
        })
    }
}

/// Two agents whose target pre-pulls into a stand-in runtime (its pulls end on `finish`
/// permits), with container `app` checkpointed on the source and the push to the target.
struct Runtime {
    _keep: (tempfile::TempDir, common::agents::Env),
    /// The registry's CA and port.
    ca: std::path::PathBuf,
    port: u16,
    source: common::agents::Agent,
    target: common::agents::Agent,
    controller: kube_migrate::agent::client::AgentClient,
    finish: Arc<Semaphore>,
    pulls: mpsc::UnboundedReceiver<Pulled>,
    answer: CheckpointResponse,
    push: PushRequest,
}

async fn with_runtime() -> Runtime {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("crio.sock");
    let cri = Cri::new(&format!("unix://{}", socket.display()), Duration::from_secs(60)).unwrap();
    let (env, source, target, controller) = setup_with(Prepull {
        cri: Some(cri),
        own: Default::default(),
    })
    .await;
    let (ca, port) = (env.certs.join("ca.crt"), target.registry.port());
    let finish = Arc::new(Semaphore::new(0));
    let pulls = stand_in_runtime(&socket, ca.clone(), port, Arc::clone(&finish));
    let answer = controller
        .checkpoint(&source.url, ID, &checkpoint_request(&["app"]))
        .await
        .unwrap();
    let push = push_of(&target.url, &answer.archives);
    Runtime {
        _keep: (dir, env),
        ca,
        port,
        source,
        target,
        controller,
        finish,
        pulls,
        answer,
        push,
    }
}

#[tokio::test]
async fn the_image_is_pulled_into_the_runtime_once_and_other_pulls_wait_for_it() {
    let mut rt = with_runtime().await;
    rt.controller
        .expect(&rt.target.url, ID, &expect_of(&rt.push, "node-a"))
        .await
        .unwrap();
    rt.controller.push(&rt.source.url, ID, &rt.push).await.unwrap();
    let build = ImageRequest {
        namespace: "shop".into(),
        pod: "db-0".into(),
        archives: rt.push.archives.clone(),
        pull_digest: Some(pull_digest("s3cret")),
        prepull: false,
    };
    // A checkpoint kept for later is not put in the runtime's storage.
    rt.controller.build_image(&rt.target.url, ID, &build).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(rt.pulls.try_recv().is_err(), "pulled a checkpoint nobody restores yet");
    let build = ImageRequest { prepull: true, ..build };
    let images = rt.controller.build_image(&rt.target.url, ID, &build).await.unwrap();

    // The runtime was asked to pull the built image, with a credential that is the agent's
    // own (not the migration's), and the registry served it the exact layer with it.
    let pulled = tokio::time::timeout(Duration::from_secs(20), rt.pulls.recv())
        .await
        .expect("the runtime is asked to pull the image once it is built")
        .unwrap();
    assert_eq!(pulled.image, images.images[0].image);
    assert_eq!(pulled.user, "kube-migrate");
    assert!(!pulled.password.is_empty() && pulled.password != "s3cret");
    assert_eq!(pulled.layer_sha256, rt.answer.archives[0].digest);

    // While that pull runs, the kubelet's pull (the migration's credential) waits for it at the
    // manifest instead of downloading the same bytes beside it.
    let manifest_path = format!("/v2/kube-migrate/{ID}/manifests/app");
    let kubelets = tokio::spawn(get(rt.ca.clone(), rt.port, manifest_path.clone(), "s3cret".into()));
    // A controller retrying the build does not start a second pull.
    rt.controller.build_image(&rt.target.url, ID, &build).await.unwrap();
    // Wrong credentials are refused at once, held pull or not.
    let (status, _) = get(rt.ca.clone(), rt.port, manifest_path.clone(), "guess".into()).await;
    assert_eq!(status, 403);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!kubelets.is_finished(), "the kubelet's pull went on beside the agent's");
    rt.finish.add_permits(1);
    let (status, _) = tokio::time::timeout(Duration::from_secs(10), kubelets)
        .await
        .expect("the held pull goes on once the agent's has ended")
        .unwrap();
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(rt.pulls.try_recv().is_err(), "one pull into the runtime per migration");

    // A guess at the agent's own credential is refused like any wrong one.
    let (status, _) = get(rt.ca.clone(), rt.port, manifest_path, hex::encode([0u8; 32])).await;
    assert_eq!(status, 403);
}

#[tokio::test]
async fn once_every_expected_archive_is_verified_the_image_is_pulled_without_a_build_call() {
    let mut rt = with_runtime().await;
    let expect = kube_migrate::agent::api::ExpectRequest {
        prepull: true,
        ..expect_of(&rt.push, "node-a")
    };
    rt.controller.expect(&rt.target.url, ID, &expect).await.unwrap();
    rt.controller.push(&rt.source.url, ID, &rt.push).await.unwrap();

    // No build call yet: the target built the image and asked its runtime to pull it on its own.
    let pulled = tokio::time::timeout(Duration::from_secs(20), rt.pulls.recv())
        .await
        .expect("the runtime is asked to pull once the last expected archive is verified")
        .unwrap();
    assert_eq!(pulled.image, format!("{}/kube-migrate/{ID}:app", rt.target.registry));
    assert_eq!(pulled.user, "kube-migrate");
    assert_eq!(pulled.layer_sha256, rt.answer.archives[0].digest);

    // The controller's build, while that pull runs and after it, names the very manifest the
    // runtime pulled (a rebuild must not move the tag) and starts no second pull.
    let build = ImageRequest {
        namespace: "shop".into(),
        pod: "db-0".into(),
        archives: rt.push.archives.clone(),
        pull_digest: Some(pull_digest("s3cret")),
        prepull: true,
    };
    let during = rt.controller.build_image(&rt.target.url, ID, &build).await.unwrap();
    assert_eq!(during.images[0].manifest_digest, pulled.manifest_sha256);
    assert_eq!(during.images[0].image, pulled.image);
    rt.finish.add_permits(1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = rt.controller.build_image(&rt.target.url, ID, &build).await.unwrap();
    assert_eq!(after, during);
    // The kubelet's pull, with the credential the build brought, gets that same manifest.
    let (status, manifest) = get(
        rt.ca.clone(),
        rt.port,
        format!("/v2/kube-migrate/{ID}/manifests/app"),
        "s3cret".into(),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        format!("sha256:{}", hex::encode(Sha256::digest(&manifest))),
        pulled.manifest_sha256
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(rt.pulls.try_recv().is_err(), "one pull into the runtime per migration");
}
