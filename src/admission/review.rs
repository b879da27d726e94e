//! Reading AdmissionReviews defensively and writing well-formed answers.
//!
//! The API server must always get a JSON AdmissionReview back, even for a body that is not
//! one: the answer then denies with a message saying what was wrong, and carries the request
//! uid whenever it can be found.

use kube::core::{
    DynamicObject, Status,
    admission::{AdmissionRequest, AdmissionResponse, AdmissionReview},
};

/// Why a body could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    #[error("request body is not JSON: {0}")]
    NotJson(#[source] serde_json::Error),
    #[error("body is not an admission.k8s.io/v1 AdmissionReview: {0}")]
    NotAReview(String),
    #[error("AdmissionReview has no request")]
    NoRequest,
    #[error("unexpected request: {0}")]
    Unexpected(String),
}

impl ReviewError {
    /// Label for the webhook decision metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            ReviewError::NotJson(_) => "malformed_json",
            ReviewError::NotAReview(_) | ReviewError::NoRequest => "malformed_review",
            ReviewError::Unexpected(_) => "unexpected_request",
        }
    }
}

/// Parse a raw body into an AdmissionRequest. On failure returns the error and whatever
/// request uid could be recovered, so the answer still matches the request.
pub fn parse(body: &[u8]) -> Result<AdmissionRequest<DynamicObject>, (ReviewError, String)> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| (ReviewError::NotJson(e), String::new()))?;
    let uid = value
        .pointer("/request/uid")
        .and_then(|u| u.as_str())
        .unwrap_or_default()
        .to_string();
    let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or_default();
    let api_version = value.get("apiVersion").and_then(|k| k.as_str()).unwrap_or_default();
    if kind != "AdmissionReview" || api_version != "admission.k8s.io/v1" {
        return Err((
            ReviewError::NotAReview(format!("got kind {kind:?} apiVersion {api_version:?}")),
            uid,
        ));
    }
    let review: AdmissionReview<DynamicObject> =
        serde_json::from_value(value).map_err(|e| (ReviewError::NotAReview(e.to_string()), uid.clone()))?;
    let mut request = review.request.ok_or((ReviewError::NoRequest, uid.clone()))?;
    // The answer's apiVersion/kind are copied from here: the API server rejects an answer
    // without them.
    request.types = review.types;
    if request.uid.is_empty() {
        return Err((ReviewError::Unexpected("request.uid is empty".into()), uid));
    }
    Ok(request)
}

/// An answer for a body that could not be used: a denial with the reason, code 400.
pub fn invalid(uid: String, error: &ReviewError) -> AdmissionReview<DynamicObject> {
    let mut response = AdmissionResponse::invalid(format!("kube-migrate: {error}"));
    response.uid = uid;
    response.result.code = 400;
    response.into_review()
}

/// Deny with an HTTP code and a Kubernetes reason (the API server keeps codes >= 400, so
/// `429 TooManyRequests` reaches kubectl, which retries every 5 s).
pub fn deny(request: &AdmissionRequest<DynamicObject>, code: u16, reason: &str, message: String) -> AdmissionResponse {
    let mut response = AdmissionResponse::from(request).deny(message.clone());
    response.result = Status::failure(&message, reason).with_code(code);
    response
}

/// Allow, optionally with a warning shown by kubectl.
pub fn allow(request: &AdmissionRequest<DynamicObject>, warning: Option<String>) -> AdmissionResponse {
    let mut response = AdmissionResponse::from(request);
    response.warnings = warning.map(|w| vec![w]);
    response
}
