//! The node runtime's image service over the CRI (`runtime.v1.ImageService` on the runtime's
//! socket), for what the agent asks of it: pull a migration's checkpoint image into the
//! runtime's storage as soon as it is built, so that the replacement's start does not wait for
//! it.
//!
//! The four messages are declared here with prost's derive, field numbers as in cri-api's
//! `pkg/apis/runtime/v1/api.proto` (CRI v1 never renumbers a field; fields left out are simply
//! not sent, and unknown ones in answers skipped). The generated bindings (the `k8s-cri` crate)
//! would need `protoc` on every machine that builds kube-migrate, for one call; the protocol
//! work itself (protobuf, gRPC, HTTP/2) is tonic's and prost's.

use std::time::Duration;

use http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint};

const PULL_IMAGE: &str = "/runtime.v1.ImageService/PullImage";

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
}

impl CriError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            CriError::Endpoint(..) => "cri_endpoint",
            CriError::Call { .. } => "cri_call",
            CriError::NotReady(..) => "cri_unavailable",
        }
    }
}

/// A client of the runtime's image service. Connects on first use and again after the
/// runtime restarts (the channel reconnects), so it can be made before the runtime is up.
#[derive(Clone)]
pub struct Cri {
    channel: Channel,
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
        Ok(Self { channel })
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

    /// Pull `image` into the runtime's storage with HTTP Basic `user`/`password`; the
    /// runtime's reference of what it pulled (an image ID).
    pub async fn pull(&self, image: &str, user: &str, password: &str) -> Result<String, CriError> {
        let request = PullImageRequest {
            image: Some(ImageSpec { image: image.into() }),
            auth: Some(AuthConfig {
                username: user.into(),
                password: password.into(),
            }),
        };
        let response: PullImageResponse = self.unary(PULL_IMAGE, request).await?;
        Ok(response.image_ref)
    }
}
