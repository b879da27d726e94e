//! HTTPS clients: controller to agent, agent to agent (both mTLS) and agent to kubelet.

use std::{
    io,
    sync::{Arc, atomic::AtomicU64},
    time::Duration,
};

use bytes::Bytes;
use futures::TryStreamExt;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::{Method, Request, StatusCode, body::Frame};
use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use rustls::ClientConfig;
use serde::{Serialize, de::DeserializeOwned};

use super::{
    api::{
        self, ArchiveRef, CheckpointRequest, CheckpointResponse, ErrorBody, ExpectRequest, ImageRequest, ImageResponse,
        Kind, PrepareRequest, PrepareResponse, PushProgress, PushRequest, PushResponse, ReceiveResponse, SourceRequest,
        SourceResponse, VolumesRequest, VolumesResponse,
    },
    chunks,
};

/// How an upload goes ([`AgentClient::upload`]): its options and two counters, of the bytes
/// read from the file and of the bytes that went on the wire.
#[derive(Debug, Clone, Default)]
pub struct Sending {
    pub options: api::TransferOptions,
    pub wire: Arc<AtomicU64>,
    pub read: Arc<AtomicU64>,
}

pub type Body = BoxBody<Bytes, io::Error>;
pub type HttpsClient = Client<HttpsConnector<HttpConnector>, Body>;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid URL {0:?}")]
    Url(String),
    #[error("cannot reach {url}: {source}")]
    Connect {
        url: String,
        source: hyper_util::client::legacy::Error,
    },
    #[error("reading the answer of {url}: {source}")]
    Body {
        url: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{url} answered more than {limit} bytes")]
    TooLarge { url: String, limit: usize },
    #[error("{url} answered {status}: {reason}: {message}")]
    Status {
        url: String,
        status: StatusCode,
        reason: String,
        message: String,
    },
    #[error("{url} answered something unexpected: {source}")]
    Decode { url: String, source: serde_json::Error },
    #[error("{url} did not answer within {seconds} s")]
    Timeout { url: String, seconds: u64 },
}

impl ClientError {
    /// Connection failures, timeouts and 5xx/429 answers may succeed later.
    pub fn retryable(&self) -> bool {
        match self {
            ClientError::Connect { .. } | ClientError::Body { .. } | ClientError::Timeout { .. } => true,
            ClientError::Status { status, .. } => status.is_server_error() || *status == StatusCode::TOO_MANY_REQUESTS,
            ClientError::Url(_) | ClientError::Decode { .. } | ClientError::TooLarge { .. } => false,
        }
    }

    pub fn metric_label(&self) -> &'static str {
        match self {
            ClientError::Url(_) => "invalid_url",
            ClientError::Connect { .. } | ClientError::Body { .. } => "unreachable",
            ClientError::Status { .. } => "error_status",
            ClientError::Decode { .. } | ClientError::TooLarge { .. } => "bad_answer",
            ClientError::Timeout { .. } => "timeout",
        }
    }

    /// The server's reason, for an error answer.
    pub fn reason(&self) -> Option<&str> {
        match self {
            ClientError::Status { reason, .. } => Some(reason),
            _ => None,
        }
    }
}

/// An HTTPS-only client with the given TLS configuration.
pub fn https_client(config: ClientConfig) -> HttpsClient {
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_only()
        .enable_http1()
        .build();
    Client::builder(TokioExecutor::new()).build(connector)
}

pub fn empty_body() -> Body {
    Full::new(Bytes::new()).map_err(|never| match never {}).boxed()
}

pub fn json_body<T: Serialize>(value: &T) -> Body {
    Full::new(Bytes::from(serde_json::to_vec(value).expect("request types serialize")))
        .map_err(|never| match never {})
        .boxed()
}

/// Largest answer read from an agent or a kubelet (they are small JSON documents).
pub const MAX_ANSWER: usize = 4 << 20;

/// Send a request and decode a JSON answer; error answers become [`ClientError::Status`].
pub async fn send<T: DeserializeOwned>(
    client: &HttpsClient,
    request: Request<Body>,
    timeout: Duration,
) -> Result<T, ClientError> {
    let url = request.uri().to_string();
    // One deadline for the answer and its body: a peer that trickles bytes is a timeout too.
    let answer = async {
        let response = client.request(request).await.map_err(|source| ClientError::Connect {
            url: url.clone(),
            source,
        })?;
        let status = response.status();
        // Every answer of an agent or a kubelet here is a small JSON document.
        let body = http_body_util::Limited::new(response.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|source| match source.downcast::<http_body_util::LengthLimitError>() {
                Ok(_) => ClientError::TooLarge {
                    url: url.clone(),
                    limit: MAX_ANSWER,
                },
                Err(source) => ClientError::Body {
                    url: url.clone(),
                    source,
                },
            })?
            .to_bytes();
        Ok::<_, ClientError>((status, body))
    };
    let (status, body) = match tokio::time::timeout(timeout, answer).await {
        Ok(r) => r?,
        Err(_) => {
            return Err(ClientError::Timeout {
                url,
                seconds: timeout.as_secs(),
            });
        }
    };
    if !status.is_success() {
        let (reason, message) = match serde_json::from_slice::<ErrorBody>(&body) {
            Ok(e) => (e.reason, e.message),
            Err(_) => (
                status.canonical_reason().unwrap_or("error").to_string(),
                String::from_utf8_lossy(&body).into_owned(),
            ),
        };
        return Err(ClientError::Status {
            url,
            status,
            reason,
            message,
        });
    }
    serde_json::from_slice(&body).map_err(|source| ClientError::Decode { url, source })
}

fn request(method: Method, url: &str, body: Body) -> Result<Request<Body>, ClientError> {
    Request::builder()
        .method(method)
        .uri(url)
        .header("content-type", "application/json")
        .body(body)
        .map_err(|_| ClientError::Url(url.to_string()))
}

/// Client of the agents' API, used by the controller and (for uploads) by agents.
#[derive(Clone)]
pub struct AgentClient {
    http: HttpsClient,
    /// Upper bound for a checkpoint, a push or an image build.
    pub long_timeout: Duration,
}

impl AgentClient {
    pub fn new(tls: ClientConfig, long_timeout: Duration) -> Self {
        Self {
            http: https_client(tls),
            long_timeout,
        }
    }

    /// POST `req` as JSON to `/v1/migrations/{id}/{path}` and decode the answer.
    async fn post<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        base: &str,
        id: &str,
        path: &str,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, ClientError> {
        let url = format!("{base}/v1/migrations/{id}/{path}");
        send(&self.http, request(Method::POST, &url, json_body(req))?, timeout).await
    }

    pub async fn checkpoint(
        &self,
        base: &str,
        id: &str,
        req: &CheckpointRequest,
    ) -> Result<CheckpointResponse, ClientError> {
        self.post(base, id, "checkpoint", req, self.long_timeout).await
    }

    /// Thaw (`"thaw"`) or kill (`"kill"`) the frozen source containers of migration `id`.
    pub async fn source(
        &self,
        base: &str,
        id: &str,
        action: &str,
        req: &SourceRequest,
    ) -> Result<SourceResponse, ClientError> {
        self.post(base, id, &format!("source/{action}"), req, Duration::from_secs(30))
            .await
    }

    pub async fn push(&self, base: &str, id: &str, req: &PushRequest) -> Result<PushResponse, ClientError> {
        self.post(base, id, "push", req, self.long_timeout).await
    }

    /// Ask a target agent, before the freeze, whether its node can restore the pod (an
    /// error with reason [`api::TARGET_UNFIT`] when it cannot).
    pub async fn prepare(&self, base: &str, id: &str, req: &PrepareRequest) -> Result<PrepareResponse, ClientError> {
        self.post(base, id, "prepare", req, self.long_timeout).await
    }

    /// Tell a target agent what to accept for migration `id`.
    pub async fn expect(&self, base: &str, id: &str, req: &ExpectRequest) -> Result<(), ClientError> {
        self.post::<_, serde_json::Value>(base, id, "expect", req, Duration::from_secs(30))
            .await
            .map(|_| ())
    }

    pub async fn build_image(&self, base: &str, id: &str, req: &ImageRequest) -> Result<ImageResponse, ClientError> {
        self.post(base, id, "image", req, self.long_timeout).await
    }

    /// Fill a replacement's emptyDirs from what this agent received, then release it.
    pub async fn place_volumes(
        &self,
        base: &str,
        id: &str,
        req: &VolumesRequest,
    ) -> Result<VolumesResponse, ClientError> {
        self.post(base, id, "volumes", req, self.long_timeout).await
    }

    pub async fn delete(&self, base: &str, id: &str) -> Result<serde_json::Value, ClientError> {
        let url = format!("{base}/v1/migrations/{id}");
        send(
            &self.http,
            request(Method::DELETE, &url, empty_body())?,
            Duration::from_secs(30),
        )
        .await
    }

    /// The verified archive (or emptyDir contents) another agent holds under `name`, if any.
    pub async fn held(
        &self,
        base: &str,
        id: &str,
        kind: Kind,
        name: &str,
    ) -> Result<Option<ReceiveResponse>, ClientError> {
        let url = format!("{base}/v1/migrations/{id}/{}/{name}", kind.segment());
        self.get_if_found(&url, Duration::from_secs(30)).await
    }

    /// GET `url`: `None` when the agent answers 404.
    async fn get_if_found<T: DeserializeOwned>(&self, url: &str, timeout: Duration) -> Result<Option<T>, ClientError> {
        match send(&self.http, request(Method::GET, url, empty_body())?, timeout).await {
            Ok(found) => Ok(Some(found)),
            Err(ClientError::Status { status, .. }) if status == StatusCode::NOT_FOUND => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// How far a push of migration `id` on that agent is; `None` when none is running.
    pub async fn push_progress(&self, base: &str, id: &str) -> Result<Option<PushProgress>, ClientError> {
        let url = format!("{base}/v1/migrations/{id}/push");
        self.get_if_found(&url, Duration::from_secs(5)).await
    }

    /// Upload one archive (or emptyDir contents) to another agent, streamed from disk,
    /// compressed and paced as `sending` says, counting what it read and sent.
    pub async fn upload(
        &self,
        base: &str,
        id: &str,
        kind: Kind,
        archive: &ArchiveRef,
        file: tokio::fs::File,
        sending: Sending,
    ) -> Result<ReceiveResponse, ClientError> {
        let Sending {
            options: transfer,
            wire,
            read,
        } = sending;
        let url = format!("{base}/v1/migrations/{id}/{}/{}", kind.segment(), archive.container);
        let file = chunks::Counted::new(file.into_std().await, read);
        let mut req = Request::builder()
            .method(Method::PUT)
            .uri(&url)
            .header("content-type", "application/x-tar")
            .header(api::DIGEST_HEADER, &archive.digest);
        let pace = chunks::Pace {
            bytes_per_second: transfer.bytes_per_second,
            sent: wire,
        };
        let reader: Box<dyn std::io::Read + Send> = match transfer.zstd_level {
            Some(level) => {
                req = req.header("content-encoding", api::ZSTD_ENCODING);
                let level = level.clamp(1, api::MAX_ZSTD_LEVEL);
                Box::new(
                    zstd::stream::read::Encoder::new(file, level).map_err(|source| ClientError::Body {
                        url: url.clone(),
                        source: Box::new(source),
                    })?,
                )
            }
            None => {
                req = req.header("content-length", archive.size_bytes);
                Box::new(file)
            }
        };
        let body = BodyExt::boxed(StreamBody::new(chunks::reader_stream(reader, pace).map_ok(Frame::data)));
        let req = req.body(body).map_err(|_| ClientError::Url(url.clone()))?;
        send(&self.http, req, self.long_timeout).await
    }
}
