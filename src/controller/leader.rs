//! Leader election on a `coordination.k8s.io/v1` Lease, so that several webhook replicas
//! can run while exactly one drives migrations. Every write is a compare-and-swap on the
//! Lease's resourceVersion.

use std::{future::Future, time::Duration};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
    jiff::Timestamp,
};
use kube::{
    Api,
    api::{ObjectMeta, PostParams},
};
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("lease API: {0}")]
    Kube(#[from] kube::Error),
}

pub struct LeaderElector {
    api: Api<Lease>,
    name: String,
    identity: String,
    lease_duration: Duration,
    renew_every: Duration,
}

/// Is a lease held by someone else still valid at `now`?
pub fn held_by_other(spec: &LeaseSpec, identity: &str, now: Timestamp) -> bool {
    let Some(holder) = spec.holder_identity.as_deref().filter(|h| !h.is_empty()) else {
        return false;
    };
    if holder == identity {
        return false;
    }
    let duration = i64::from(spec.lease_duration_seconds.unwrap_or(15));
    match &spec.renew_time {
        Some(renewed) => renewed.0.as_second() + duration > now.as_second(),
        None => false,
    }
}

impl LeaderElector {
    pub fn new(
        api: Api<Lease>,
        name: impl Into<String>,
        identity: impl Into<String>,
        lease_duration: Duration,
    ) -> Self {
        Self {
            api,
            name: name.into(),
            identity: identity.into(),
            lease_duration,
            renew_every: lease_duration / 3,
        }
    }

    /// One acquire-or-renew round: Ok(true) when this process holds the lease afterwards.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, LeaderError> {
        let now = Timestamp::now();
        let seconds = i32::try_from(self.lease_duration.as_secs()).unwrap_or(15);
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(seconds),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e.into()),
            };
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        if held_by_other(spec, &self.identity, now) {
            return Ok(false);
        }
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            spec.holder_identity = Some(self.identity.clone());
            spec.acquire_time = Some(MicroTime(now));
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.renew_time = Some(MicroTime(now));
        spec.lease_duration_seconds = Some(seconds);
        // replace() carries the resourceVersion we read: a concurrent writer makes it 409.
        match self.api.replace(&self.name, &PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Run `work` while leading; stop it (by cancelling its token) when the lease is lost or
    /// `shutdown` fires, then campaign again.
    pub async fn run<F, Fut>(self, shutdown: CancellationToken, work: F)
    where
        F: Fn(CancellationToken) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            match self.try_acquire_or_renew().await {
                Ok(true) => {}
                Ok(false) => {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(self.renew_every) => continue,
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "leader election failed");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(self.renew_every) => continue,
                    }
                }
            }
            tracing::info!(identity = %self.identity, lease = %self.name, "became leader");
            let token = shutdown.child_token();
            let mut task = tokio::spawn(work(token.clone()));
            let mut last_renewal = tokio::time::Instant::now();
            loop {
                tokio::select! {
                    _ = &mut task => {
                        tracing::warn!("controller stopped while leading");
                        break;
                    }
                    _ = tokio::time::sleep(self.renew_every) => {}
                }
                match self.try_acquire_or_renew().await {
                    Ok(true) => last_renewal = tokio::time::Instant::now(),
                    Ok(false) => break,
                    Err(error) => {
                        tracing::warn!(%error, "lease renewal failed");
                        // Stop before the lease can expire for the others.
                        if last_renewal.elapsed() > self.lease_duration - self.renew_every {
                            break;
                        }
                    }
                }
            }
            tracing::warn!(identity = %self.identity, "lost leadership; stopping the controller");
            token.cancel();
            let _ = task.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_validity() {
        let now = Timestamp::from_second(1_000_000).unwrap();
        let spec = |holder: &str, renewed: i64| LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(Timestamp::from_second(renewed).unwrap())),
            ..Default::default()
        };
        assert!(held_by_other(&spec("b", 1_000_000 - 5), "a", now));
        assert!(!held_by_other(&spec("b", 1_000_000 - 16), "a", now), "expired");
        assert!(!held_by_other(&spec("a", 1_000_000 - 5), "a", now), "mine");
        assert!(!held_by_other(&LeaseSpec::default(), "a", now), "unheld");
    }
}
