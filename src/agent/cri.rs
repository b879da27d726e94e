//! The node runtime's image service over the CRI (`runtime.v1.ImageService` on the runtime's
//! socket), for what the agent asks of it: pull a migration's checkpoint image into the
//! runtime's storage as soon as it is built, so that the replacement's start does not wait for
//! it; before a freeze, whether the base images of the pod are there (CRI-O's restore never
//! pulls one). And CRI-O's own configuration, which it serves over HTTP on the same socket
//! (`GET /config`, what `crio status config` reads): whether it can restore at all.
//!
//! The messages are declared here with prost's derive, field numbers as in cri-api's
//! `pkg/apis/runtime/v1/api.proto` (CRI v1 never renumbers a field; fields left out are simply
//! not sent, and unknown ones in answers skipped). The generated bindings (the `k8s-cri` crate)
//! would need `protoc` on every machine that builds kube-migrate, for two calls; the protocol
//! work itself (protobuf, gRPC, HTTP/2) is tonic's and prost's.

use std::time::Duration;

use http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint};

const PULL_IMAGE: &str = "/runtime.v1.ImageService/PullImage";
const IMAGE_STATUS: &str = "/runtime.v1.ImageService/ImageStatus";

#[derive(Clone, PartialEq, prost::Message)]
pub struct ImageSpec {
    #[prost(string, tag = "1")]
    pub image: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct AuthConfig {
    #[prost(string, tag = "1")]
    pub username: String,
    #[prost(string, tag = "2")]
    pub password: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PullImageRequest {
    #[prost(message, optional, tag = "1")]
    pub image: Option<ImageSpec>,
    #[prost(message, optional, tag = "2")]
    pub auth: Option<AuthConfig>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PullImageResponse {
    #[prost(string, tag = "1")]
    pub image_ref: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ImageStatusRequest {
    #[prost(message, optional, tag = "1")]
    pub image: Option<ImageSpec>,
    #[prost(bool, tag = "2")]
    pub verbose: bool,
}

/// The fields of `runtime.v1.Image` the agent reads.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Image {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(string, repeated, tag = "2")]
    pub repo_tags: Vec<String>,
    #[prost(string, repeated, tag = "3")]
    pub repo_digests: Vec<String>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ImageStatusResponse {
    /// Absent when the runtime has no such image.
    #[prost(message, optional, tag = "1")]
    pub image: Option<Image>,
    /// With `verbose`: CRI-O puts the image's OCI configuration under `info`, as JSON
    /// (`{"imageSpec": {"config": {"Entrypoint": [...], "Cmd": [...]}}}`).
    #[prost(map = "string, string", tag = "2")]
    pub info: std::collections::HashMap<String, String>,
}

#[derive(Debug, thiserror::Error)]
pub enum CriError {
    #[error("CRI endpoint {0:?}: {1}")]
    Endpoint(String, String),
    #[error("CRI {call}: {status}")]
    Call {
        call: &'static str,
        status: Box<tonic::Status>,
    },
    #[error("CRI {0}: the runtime is not ready: {1}")]
    NotReady(&'static str, String),
    #[error("runtime configuration (GET /config on {0}): {1}")]
    Config(String, String),
}

impl CriError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            CriError::Endpoint(..) => "cri_endpoint",
            CriError::Call { .. } => "cri_call",
            CriError::NotReady(..) => "cri_unavailable",
            CriError::Config(..) => "runtime_config",
        }
    }
}

/// A client of the runtime's image service. Connects on first use and again after the
/// runtime restarts (the channel reconnects), so it can be made before the runtime is up.
#[derive(Clone)]
pub struct Cri {
    channel: Channel,
    /// The socket's path, for the runtime's HTTP endpoints.
    socket: Option<std::path::PathBuf>,
    timeout: Duration,
}

impl Cri {
    /// `endpoint`: `unix:///run/crio/crio.sock` (the kubelet's `--container-runtime-endpoint`
    /// form); `timeout` bounds each call (a pull of a large image included).
    pub fn new(endpoint: &str, timeout: Duration) -> Result<Self, CriError> {
        let channel = Endpoint::from_shared(endpoint.to_string())
            .map_err(|e| CriError::Endpoint(endpoint.into(), e.to_string()))?
            .connect_timeout(Duration::from_secs(2))
            .timeout(timeout)
            .connect_lazy();
        let socket = endpoint.strip_prefix("unix://").map(std::path::PathBuf::from);
        Ok(Self {
            channel,
            socket,
            timeout,
        })
    }

    async fn unary<Q, A>(&self, call: &'static str, request: Q) -> Result<A, CriError>
    where
        Q: prost::Message + Send + Sync + 'static,
        A: prost::Message + Default + Send + Sync + 'static,
    {
        let mut grpc = tonic::client::Grpc::new(self.channel.clone());
        grpc.ready()
            .await
            .map_err(|e| CriError::NotReady(call, e.to_string()))?;
        let codec = tonic_prost::ProstCodec::<Q, A>::default();
        grpc.unary(tonic::Request::new(request), PathAndQuery::from_static(call), codec)
            .await
            .map(tonic::Response::into_inner)
            .map_err(|status| CriError::Call {
                call,
                status: Box::new(status),
            })
    }

    /// Pull `image` into the runtime's storage, with HTTP Basic `(user, password)` or, with
    /// `None`, without credentials (a base image, as the node pulls one for a pod without pull
    /// secrets); the runtime's reference of what it pulled (an image ID).
    pub async fn pull(&self, image: &str, basic: Option<(&str, &str)>) -> Result<String, CriError> {
        let request = PullImageRequest {
            image: Some(ImageSpec { image: image.into() }),
            auth: basic.map(|(user, password)| AuthConfig {
                username: user.into(),
                password: password.into(),
            }),
        };
        let response: PullImageResponse = self.unary(PULL_IMAGE, request).await?;
        Ok(response.image_ref)
    }

    /// The runtime's record of `image` (a name, a digest reference or an image ID), with
    /// the runtime's verbose information; `image` is `None` when it has no such image.
    pub async fn image_status(&self, image: &str) -> Result<ImageStatusResponse, CriError> {
        let request = ImageStatusRequest {
            image: Some(ImageSpec { image: image.into() }),
            verbose: true,
        };
        self.unary(IMAGE_STATUS, request).await
    }

    /// CRI-O's configuration as TOML (`GET /config` over HTTP/1 on the CRI socket); `None`
    /// when the runtime serves none there (not CRI-O, or not a Unix socket).
    pub async fn runtime_config(&self) -> Result<Option<String>, CriError> {
        use http_body_util::BodyExt;
        let Some(socket) = &self.socket else {
            return Ok(None);
        };
        let fail = |e: &dyn std::fmt::Display| CriError::Config(socket.display().to_string(), e.to_string());
        let get = async {
            let stream = tokio::net::UnixStream::connect(socket).await.map_err(|e| fail(&e))?;
            let (mut sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| fail(&e))?;
            tokio::spawn(connection);
            let request = http::Request::get("/config")
                .header(http::header::HOST, "localhost")
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .map_err(|e| fail(&e))?;
            let response = sender.send_request(request).await.map_err(|e| fail(&e))?;
            let status = response.status();
            let body = response.into_body().collect().await.map_err(|e| fail(&e))?.to_bytes();
            if status == http::StatusCode::NOT_FOUND {
                return Ok(None);
            }
            if !status.is_success() {
                return Err(fail(&format!("HTTP {status}")));
            }
            String::from_utf8(body.to_vec()).map(Some).map_err(|e| fail(&e))
        };
        tokio::time::timeout(self.timeout, get)
            .await
            .unwrap_or_else(|_| Err(fail(&"timed out")))
    }
}
