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
    /// sha256 of the manifest and of the layer it read from the registry with that credential
    /// (or why the layer's download failed).
    manifest_sha256: String,
    layer_sha256: Result<String, String>,
    /// When the runtime was asked to pull, and when its download of the layer ended.
    asked: std::time::Instant,
    downloaded: std::time::Instant,
}

/// GET `path` of the registry at `port` with HTTP Basic `kube-migrate:password`.
async fn get(ca: std::path::PathBuf, port: u16, path: String, password: String) -> (u16, Result<bytes::Bytes, String>) {
    use base64::Engine;
    let http = https_client(client_config(&ca, None).unwrap());
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("kube-migrate:{password}"));
    let request = hyper::Request::get(format!("https://127.0.0.1:{port}{path}"))
        .header("authorization", format!("Basic {basic}"))
        .body(empty_body())
        .unwrap();
    let response = http.request(request).await.unwrap();
    let status = response.status().as_u16();
    let body = response.into_body().collect().await;
    (status, body.map(|b| b.to_bytes()).map_err(|e| e.to_string()))
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
            let asked = std::time::Instant::now();
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
            let manifest = manifest.unwrap();
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
            let failed = blob.as_ref().err().cloned();
            seen.send(Pulled {
                image,
                user: auth.username,
                password: auth.password,
                manifest_sha256,
                layer_sha256: blob.map(|b| format!("sha256:{}", hex::encode(Sha256::digest(&b)))),
                asked,
                downloaded: std::time::Instant::now(),
            })
            .unwrap();
            finish.acquire().await.unwrap().forget();
            if let Some(why) = failed {
                // As CRI-O: a download that broke off is a failed pull.
                return Err(tonic::Status::unknown(why));
            }
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
    assert_eq!(pulled.layer_sha256.as_ref(), Ok(&rt.answer.archives[0].digest));

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
    assert_eq!(pulled.layer_sha256.as_ref(), Ok(&rt.answer.archives[0].digest));

    // The controller's build, while that pull runs and after it, names the very manifest the
    // runtime pulled (a rebuild must not move the tag) and starts no second pull.
    let build = controllers_build(&rt);
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
        format!("sha256:{}", hex::encode(Sha256::digest(manifest.unwrap()))),
        pulled.manifest_sha256
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(rt.pulls.try_recv().is_err(), "one pull into the runtime per migration");
}

/// The controller's image build for the replacement, with the migration's pull credential.
fn controllers_build(rt: &Runtime) -> ImageRequest {
    ImageRequest {
        namespace: "shop".into(),
        pod: "db-0".into(),
        archives: rt.push.archives.clone(),
        pull_digest: Some(pull_digest("s3cret")),
        prepull: true,
    }
}

/// The target told to expect the only archive of a migration and to pull it; the push of it
/// at a bounded rate, so that it takes a while, and its size.
async fn slow_push(rt: &Runtime) -> (PushRequest, u64) {
    let expect = kube_migrate::agent::api::ExpectRequest {
        prepull: true,
        ..expect_of(&rt.push, "node-a")
    };
    rt.controller.expect(&rt.target.url, ID, &expect).await.unwrap();
    let size = rt.answer.archives[0].size_bytes;
    let mut push = rt.push.clone();
    // About 1.5 s on the wire.
    push.transfer.bytes_per_second = Some((size * 2 / 3).max(1));
    (push, size)
}

#[tokio::test]
async fn the_runtime_downloads_the_layer_while_the_archive_arrives_and_gets_it_whole_once_verified() {
    let mut rt = with_runtime().await;
    let (push, size) = slow_push(&rt).await;
    let started = std::time::Instant::now();
    let pushed = rt.controller.push(&rt.source.url, ID, &push).await.unwrap();
    let verified = std::time::Instant::now();
    assert_eq!(pushed.bytes, size);
    assert!(
        verified - started > Duration::from_millis(800),
        "the push was not slow enough to tell"
    );

    let pulled = tokio::time::timeout(Duration::from_secs(20), rt.pulls.recv())
        .await
        .expect("the runtime was asked to pull")
        .unwrap();
    // Asked within the first part of the transfer, not after it, and it read every byte of
    // the verified archive, ending its download no sooner than the verification.
    assert!(
        pulled.asked - started < (verified - started) / 2,
        "the pull began {:?} into a {:?} transfer",
        pulled.asked - started,
        verified - started
    );
    assert_eq!(pulled.layer_sha256.as_ref(), Ok(&rt.answer.archives[0].digest));
    assert!(
        pulled.downloaded - started >= (verified - started) * 3 / 4,
        "the download ended {:?} into a {:?} transfer: it did not follow the arrival",
        pulled.downloaded - started,
        verified - started
    );
    rt.finish.add_permits(1);
    // The controller's build names the manifest that was pulled, and pulls nothing again.
    let build = controllers_build(&rt);
    let built = rt.controller.build_image(&rt.target.url, ID, &build).await.unwrap();
    assert_eq!(built.images[0].manifest_digest, pulled.manifest_sha256);
    let (status, layer) = get(
        rt.ca.clone(),
        rt.port,
        format!("/v2/kube-migrate/{ID}/blobs/{}", rt.answer.archives[0].digest),
        "s3cret".into(),
    )
    .await;
    assert_eq!(status, 200, "the layer is served from the image layout afterwards");
    assert_eq!(layer.unwrap().len() as u64, size);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(rt.pulls.try_recv().is_err(), "one pull into the runtime per migration");
}

#[tokio::test]
async fn a_corrupt_archive_fails_the_runtimes_download_before_its_last_byte() {
    let mut rt = with_runtime().await;
    // node-a's agent sends bytes that are not what it checkpointed, under the expected digest
    // and size: the runtime is streamed the part that arrives, never all of it.
    let (push, size) = slow_push(&rt).await;
    let original = std::fs::read(&rt.answer.archives[0].path).unwrap();
    let mut corrupt = original.clone();
    let last = corrupt.len() - 1;
    corrupt[last] ^= 0xff;
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &corrupt).unwrap();
    let peer = kube_migrate::agent::client::AgentClient::new(
        kube_migrate::tls::agent_client_config(
            &rt.ca,
            common::agents::node_identity(&rt._keep.1, "node-a"),
            "kube-migrate-agent",
        )
        .unwrap(),
        Duration::from_secs(60),
    );
    let err = peer
        .upload(
            &rt.target.url,
            ID,
            kube_migrate::agent::api::Kind::Archive,
            &push.archives[0],
            tokio::fs::File::open(file.path()).await.unwrap(),
            kube_migrate::agent::client::Sending {
                options: push.transfer,
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("digest"), "{err}");
    let pulled = tokio::time::timeout(Duration::from_secs(20), rt.pulls.recv())
        .await
        .expect("the runtime was asked to pull while the archive arrived")
        .unwrap();
    let why = pulled
        .layer_sha256
        .expect_err("the runtime got a whole layer that was refused");
    assert!(!why.is_empty());
    assert_eq!(original.len() as u64, size);
    rt.finish.add_permits(1);
    // The real archive, sent again, is pulled whole.
    rt.controller.push(&rt.source.url, ID, &rt.push).await.unwrap();
    let pulled = tokio::time::timeout(Duration::from_secs(20), rt.pulls.recv())
        .await
        .expect("pulled again once the archive is verified")
        .unwrap();
    assert_eq!(pulled.layer_sha256.as_ref(), Ok(&rt.answer.archives[0].digest));
}
