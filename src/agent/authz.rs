//! Who may call what on an agent. mTLS proves a caller holds a certificate of the
//! kube-migrate CA; the names in it say which one: the controller (the webhook's
//! certificate) drives migrations, agents only hand archives to each other. So a node's
//! agent certificate, the one thing root on a node can take, cannot make another node
//! checkpoint a pod or send its archives anywhere.

use std::sync::Arc;

use axum::{
    extract::{MatchedPath, Request, State},
    http::Method,
    middleware::Next,
    response::Response,
};

use super::server::{AgentError, AgentState};
use crate::tls::PeerIdentity;

/// The names that identify each kind of caller in its certificate.
#[derive(Debug, Clone)]
pub struct Callers {
    pub controller: String,
    pub agent: String,
}

impl Default for Callers {
    fn default() -> Self {
        Self {
            controller: "kube-migrate-webhook".into(),
            agent: "kube-migrate-agent".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    Controller,
    Agent,
}

/// Everything an agent checks about its callers: their certificate names, whether pushes
/// must come from the expected node's own certificate, and the API server check before a
/// checkpoint (none in tests without an API server).
#[derive(Clone, Default)]
pub struct Access {
    pub callers: Callers,
    /// Per-node agent certificates are in use: an upload must come from the certificate of
    /// the node the controller said (see [`super::expect`]).
    pub require_node: bool,
    pub consent: Option<super::consent::Consent>,
}

/// Who may make the request `method path` (the matched route).
pub fn allowed(method: &Method, path: &str) -> &'static [Caller] {
    if path.ends_with("/archives/{container}") || path.ends_with("/volumes/{volume}") {
        // An agent pushes archives (and emptyDir contents) to another; the controller and
        // the source agent ask whether one is already held.
        if *method == Method::GET {
            &[Caller::Controller, Caller::Agent]
        } else {
            &[Caller::Agent]
        }
    } else {
        &[Caller::Controller]
    }
}

impl Callers {
    fn is(&self, peer: &PeerIdentity, caller: Caller) -> bool {
        peer.is(match caller {
            Caller::Controller => &self.controller,
            Caller::Agent => &self.agent,
        })
    }
}

/// Middleware: refuse (403) a caller the route does not allow.
pub async fn authorise(
    State(state): State<Arc<AgentState>>,
    request: Request,
    next: Next,
) -> Result<Response, AgentError> {
    let path = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let peer = request
        .extensions()
        .get::<Arc<PeerIdentity>>()
        .cloned()
        .unwrap_or_default();
    let may = allowed(request.method(), &path);
    if !may.iter().any(|c| state.access.callers.is(&peer, *c)) {
        return Err(AgentError::Forbidden(format!(
            "{} {path} is for {may:?}; the caller's certificate names {:?}",
            request.method(),
            peer.names
        )));
    }
    Ok(next.run(request).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_agents_push_and_only_the_controller_drives() {
        for pushed in [
            "/v1/migrations/{id}/archives/{container}",
            "/v1/migrations/{id}/volumes/{volume}",
        ] {
            assert_eq!(allowed(&Method::PUT, pushed), &[Caller::Agent]);
            assert_eq!(allowed(&Method::GET, pushed), &[Caller::Controller, Caller::Agent]);
        }
        for path in [
            "/v1/migrations/{id}/checkpoint",
            "/v1/migrations/{id}/volumes",
            "/v1/migrations/{id}/source/{action}",
            "/v1/migrations/{id}/push",
            "/v1/migrations/{id}/image",
            "/v1/migrations/{id}",
        ] {
            assert_eq!(allowed(&Method::POST, path), &[Caller::Controller], "{path}");
        }
        // A push's progress tells how much of which migration moves where: the controller's.
        assert_eq!(allowed(&Method::GET, "/v1/migrations/{id}/push"), &[Caller::Controller]);
        let callers = Callers::default();
        let agent = PeerIdentity {
            names: vec!["kube-migrate-agent".into(), "127.0.0.1".into()],
            node: None,
        };
        assert!(callers.is(&agent, Caller::Agent));
        assert!(!callers.is(&agent, Caller::Controller));
        assert!(!callers.is(&PeerIdentity::default(), Caller::Agent));
    }
}
