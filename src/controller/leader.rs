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
    /// How often a candidate asks for the lease (client-go's retryPeriod): after a leader
    /// released it on shutdown, the next one leads within this.
    retry_every: Duration,
    /// The last renewal of another holder this process saw, and when it saw it.
    observed: std::sync::Mutex<Option<(String, tokio::time::Instant)>>,
}

/// What identifies one renewal of a Lease by its holder: a new value means the holder is alive.
fn renewal_of(lease: &Lease) -> Option<String> {
    let spec = lease.spec.as_ref()?;
    let holder = spec.holder_identity.as_deref().filter(|h| !h.is_empty())?;
    Some(format!(
        "{holder}/{:?}/{}",
        spec.renew_time.as_ref().map(|t| t.0),
        lease.metadata.resource_version.as_deref().unwrap_or_default()
    ))
}

/// Is a lease held by someone else still valid? Judged like client-go does: by how long ago
/// *this* process last saw the holder renew it (a change of its renewal), never by comparing
/// the holder's `renewTime` with the local clock, which may be skewed.
pub fn held_by_other(
    holder: Option<&str>,
    identity: &str,
    last_change_seen: Duration,
    lease_duration: Duration,
) -> bool {
    match holder.filter(|h| !h.is_empty()) {
        None => false,
        Some(h) if h == identity => false,
        Some(_) => last_change_seen < lease_duration,
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
            retry_every: (lease_duration / 3).min(Duration::from_secs(2)),
            observed: std::sync::Mutex::new(None),
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
        let since_change = {
            let mut observed = self.observed.lock().expect("lease observation poisoned");
            let renewal = renewal_of(&lease).unwrap_or_default();
            match observed.as_ref() {
                Some((seen, at)) if *seen == renewal => at.elapsed(),
                _ => {
                    *observed = Some((renewal, tokio::time::Instant::now()));
                    Duration::ZERO
                }
            }
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        let lease_duration = Duration::from_secs(spec.lease_duration_seconds.unwrap_or(15).max(1) as u64);
        if held_by_other(
            spec.holder_identity.as_deref(),
            &self.identity,
            since_change,
            lease_duration,
        ) {
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

    /// Give the lease up (holder cleared, a 1 s term), if this process still holds it: on a
    /// graceful shutdown, once its controller has stopped, so that a standby leads at its next
    /// retry instead of after a whole lease term (a drain of the leader's node waited ~17 s for
    /// its migrations to start). Compare-and-swap like every other write.
    pub async fn release(&self) -> Result<bool, LeaderError> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            return Ok(false);
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(false);
        }
        spec.holder_identity = Some(String::new());
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
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
                        _ = tokio::time::sleep(self.retry_every) => continue,
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "leader election failed");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(self.retry_every) => continue,
                    }
                }
            }
            tracing::info!(identity = %self.identity, lease = %self.name, "became leader");
            let token = shutdown.child_token();
            let mut task = tokio::spawn(work(token.clone()));
            let mut last_renewal = tokio::time::Instant::now();
            // A JoinHandle must not be awaited again once it completed (tokio panics: "polled
            // after completion"), and a panic here would end the process while it still owes
            // admission answers during its shutdown delay.
            let mut finished = false;
            loop {
                tokio::select! {
                    _ = &mut task => {
                        tracing::warn!("controller stopped while leading");
                        finished = true;
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
            if !finished {
                let _ = task.await;
            }
            // Only after the controller stopped acting: releasing earlier could let the next
            // leader act while this one's in-flight step still runs.
            if shutdown.is_cancelled() {
                match self.release().await {
                    Ok(true) => tracing::info!(identity = %self.identity, "lease released on shutdown"),
                    Ok(false) => {}
                    Err(error) => tracing::warn!(%error, "could not release the lease; it expires by itself"),
                }
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_validity_is_judged_from_local_observation() {
        let d = Duration::from_secs(15);
        assert!(held_by_other(Some("b"), "a", Duration::from_secs(5), d));
        assert!(
            !held_by_other(Some("b"), "a", Duration::from_secs(16), d),
            "no renewal seen for a full term"
        );
        assert!(!held_by_other(Some("a"), "a", Duration::ZERO, d), "mine");
        assert!(!held_by_other(None, "a", Duration::ZERO, d), "unheld");
        assert!(!held_by_other(Some(""), "a", Duration::ZERO, d), "released");
    }

    #[test]
    fn a_renewal_is_a_change_of_holder_time_or_version() {
        let lease = |holder: &str, renewed: i64, rv: &str| Lease {
            metadata: ObjectMeta {
                resource_version: Some(rv.into()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(holder.into()),
                renew_time: Some(MicroTime(Timestamp::from_second(renewed).unwrap())),
                ..Default::default()
            }),
        };
        let a = renewal_of(&lease("b", 100, "7"));
        assert_eq!(a, renewal_of(&lease("b", 100, "7")));
        assert_ne!(a, renewal_of(&lease("b", 101, "8")));
        assert_ne!(a, renewal_of(&lease("c", 100, "7")));
        assert_eq!(renewal_of(&lease("", 100, "7")), None);
    }
}
