//! Delegated authentication and authorization, as the real kubelet does it
//! (`--authentication-token-webhook`, `--authorization-mode=Webhook`): the bearer token is
//! checked with a TokenReview, then the reviewed user is checked with a SubjectAccessReview
//! on the node's subresource. The node's own credentials may create both reviews (the Node
//! authorizer allows it). Nothing is cached, so RBAC changes apply at once.

use http::HeaderMap;
use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec, UserInfo},
    authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec},
};
use kube::{Api, Client, api::PostParams};

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("Unauthorized")]
    MissingToken,
    #[error("Unauthorized: {0}")]
    InvalidToken(String),
    #[error("Unauthorized: TokenReview failed: {0}")]
    TokenReview(kube::Error),
    /// The message format of the real kubelet.
    #[error("Forbidden (user={user}, verb={verb}, resource=nodes, subresource={subresource})")]
    Forbidden {
        user: String,
        verb: String,
        subresource: String,
        reason: String,
    },
    #[error("Authorization error (user={user}, verb={verb}, resource=nodes, subresource={subresource}): {source}")]
    SubjectAccessReview {
        user: String,
        verb: String,
        subresource: String,
        source: kube::Error,
    },
}

impl AuthError {
    /// 401, 403 or 500, as the kubelet answers.
    pub fn status(&self) -> u16 {
        match self {
            AuthError::MissingToken | AuthError::InvalidToken(_) | AuthError::TokenReview(_) => 401,
            AuthError::Forbidden { .. } => 403,
            AuthError::SubjectAccessReview { .. } => 500,
        }
    }
}

/// The bearer token of a request, if any.
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

#[derive(Clone)]
pub struct Authorizer {
    client: Client,
    node: String,
}

impl Authorizer {
    pub fn new(client: Client, node: impl Into<String>) -> Self {
        Self {
            client,
            node: node.into(),
        }
    }

    /// Who presents `token` (TokenReview).
    pub async fn authenticate(&self, token: &str) -> Result<UserInfo, AuthError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: None,
            },
            ..Default::default()
        };
        let answer = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(AuthError::TokenReview)?;
        let status = answer.status.unwrap_or_default();
        match (status.authenticated, status.user) {
            (Some(true), Some(user)) => Ok(user),
            _ => Err(AuthError::InvalidToken(
                status.error.unwrap_or_else(|| "token not authenticated".into()),
            )),
        }
    }

    /// May `user` do `verb` on `nodes/<subresource>` of this node (SubjectAccessReview)?
    pub async fn authorize(&self, user: &UserInfo, verb: &str, subresource: &str) -> Result<(), AuthError> {
        let name = user.username.clone().unwrap_or_default();
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: user.username.clone(),
                groups: user.groups.clone(),
                uid: user.uid.clone(),
                extra: user.extra.clone(),
                resource_attributes: Some(ResourceAttributes {
                    verb: Some(verb.to_string()),
                    group: Some(String::new()),
                    version: Some("v1".into()),
                    resource: Some("nodes".into()),
                    subresource: Some(subresource.to_string()),
                    name: Some(self.node.clone()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let answer = Api::<SubjectAccessReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|source| AuthError::SubjectAccessReview {
                user: name.clone(),
                verb: verb.to_string(),
                subresource: subresource.to_string(),
                source,
            })?;
        let status = answer.status.unwrap_or_default();
        if status.allowed {
            Ok(())
        } else {
            Err(AuthError::Forbidden {
                user: name,
                verb: verb.to_string(),
                subresource: subresource.to_string(),
                reason: status.reason.or(status.evaluation_error).unwrap_or_default(),
            })
        }
    }

    /// Both checks for a request: 401 without a valid token, 403 without the permission.
    pub async fn check(&self, headers: &HeaderMap, verb: &str, subresource: &str) -> Result<UserInfo, AuthError> {
        let token = bearer_token(headers).ok_or(AuthError::MissingToken)?;
        let user = self.authenticate(token).await?;
        self.authorize(&user, verb, subresource).await?;
        Ok(user)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer_token(&h), None);
        h.insert("authorization", "Bearer abc.def".parse().unwrap());
        assert_eq!(bearer_token(&h), Some("abc.def"));
        h.insert("authorization", "bearer  xyz ".parse().unwrap());
        assert_eq!(bearer_token(&h), Some("xyz"));
        h.insert("authorization", "Basic dXNlcg==".parse().unwrap());
        assert_eq!(bearer_token(&h), None);
        h.insert("authorization", "Bearer ".parse().unwrap());
        assert_eq!(bearer_token(&h), None);
    }

    #[test]
    fn forbidden_message_names_the_missing_permission() {
        let e = AuthError::Forbidden {
            user: "system:serviceaccount:ns:sa".into(),
            verb: "create".into(),
            subresource: "checkpoint".into(),
            reason: String::new(),
        };
        assert_eq!(e.status(), 403);
        assert_eq!(
            e.to_string(),
            "Forbidden (user=system:serviceaccount:ns:sa, verb=create, resource=nodes, subresource=checkpoint)"
        );
    }
}
