//! The target agent pulls a migration's checkpoint images into its node's runtime as soon as
//! they are built, while the controller creates the replacement and the kubelet makes its
//! sandbox: the replacement's start then finds the image in the runtime's storage instead of
//! pulling the whole memory of the container after its sandbox is up.
//!
//! The runtime shares a pull only with an identical request (same credentials, same sandbox):
//! the kubelet's own pull of the same image, if it comes while ours is running, would download
//! every byte a second time beside it. So the registry holds the manifest requests of other
//! pulls of a migration until this agent's pull of it has ended ([`OwnPulls::wait`]); then the
//! runtime finds the layer it already has and the kubelet's pull is only the manifest.
//!
//! The agent pulls with a credential of its own, made at start and never written anywhere:
//! only this process and the runtime it hands it to (over the runtime's root-only socket) know
//! it, and the registry listens on loopback.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::sync::watch;

use super::{
    api,
    cri::Cri,
    expect,
    incoming::Incoming,
    server::{AgentState, build_images},
};

/// The agent's pre-pulling: the runtime's image service (`None`: off) and its pulls.
#[derive(Clone, Default)]
pub struct Prepull {
    pub cri: Option<Cri>,
    pub own: OwnPulls,
}

/// Pull `images` of migration `id` (references as the runtime reaches them) into the runtime
/// in the background, unless pre-pulling is off or this agent is pulling `id` already.
pub fn spawn(state: Arc<AgentState>, id: &str, images: Vec<String>) {
    let Some(cri) = state.prepull.cri.clone() else {
        return;
    };
    let Some(guard) = state.prepull.own.begin(id) else {
        return;
    };
    let id = id.to_string();
    tokio::spawn(async move {
        let held_until_pulled = guard;
        let pulls = images.into_iter().map(|image| {
            let (cri, state) = (cri.clone(), Arc::clone(&state));
            async move {
                let started = Instant::now();
                let result = cri
                    .pull(&image, Some((api::PULL_USER, state.prepull.own.password())))
                    .await
                    .map_err(super::server::AgentError::from);
                state.record_op("prepull", started, &result);
                let pulled = result.is_ok();
                if let Ok(image_ref) = result {
                    let seconds = started.elapsed().as_secs_f64();
                    tracing::info!(%image, %image_ref, seconds, "checkpoint image pulled into the runtime");
                }
                pulled
            }
        });
        if futures::future::join_all(pulls).await.into_iter().all(|ok| ok) {
            state.prepull.own.pulled(&id);
        }
        drop(held_until_pulled);
    });
}

/// An archive of migration `id` was verified here: once every archive the controller said to
/// expect is, and it asked for pre-pulling, build the images and pull them now, a controller
/// round trip before its own build call would (which then finds them built and pulled).
pub async fn after_receipt(state: Arc<AgentState>, id: &str) {
    let built = {
        let _guard = state.lock(id).await;
        let started = Instant::now();
        let result = async {
            let Some(mut record) = state.store.load(id)? else {
                return Ok(None);
            };
            let Some(archives) = expect::ready_to_build(&record) else {
                return Ok(None);
            };
            build_images(&state, id, &mut record, &archives).await.map(Some)
        }
        .await;
        if !matches!(result, Ok(None)) {
            state.record_op("image", started, &result);
        }
        result
    };
    if let Ok(Some(images)) = built {
        tracing::info!(
            id,
            images = images.len(),
            "every expected archive verified; images built, pulling"
        );
        spawn(state, id, images.into_iter().map(|i| i.image).collect());
    }
}

/// Pulls of this agent in progress, by migration, and the agent's own pull password.
#[derive(Clone)]
pub struct OwnPulls {
    running: Arc<Mutex<HashMap<String, watch::Receiver<()>>>>,
    /// Migrations whose images this agent has pulled: not pulled again.
    done: Arc<Mutex<HashSet<String>>>,
    /// Archives still arriving that this agent's pulls may read (and only they).
    pub incoming: Incoming,
    password: Arc<str>,
    /// Its digest, what a presented password is compared with (as for migrations' own: a
    /// comparison of digests tells nothing of the password by its timing).
    digest: Arc<str>,
}

impl Default for OwnPulls {
    fn default() -> Self {
        let bytes: [u8; 32] = rand::random();
        let password = hex::encode(bytes);
        Self {
            running: Default::default(),
            done: Default::default(),
            incoming: Default::default(),
            digest: api::pull_digest(&password).into(),
            password: password.into(),
        }
    }
}

/// While alive, migration `id` is being pulled by this agent; dropped, the held requests go on.
pub struct PullGuard {
    running: Arc<Mutex<HashMap<String, watch::Receiver<()>>>>,
    id: String,
    // Dropping the sender wakes every waiter (their `changed()` returns an error).
    _done: watch::Sender<()>,
}

impl Drop for PullGuard {
    fn drop(&mut self) {
        self.running.lock().expect("pull map poisoned").remove(&self.id);
    }
}

impl OwnPulls {
    /// The password this agent's own pulls present.
    pub fn password(&self) -> &str {
        &self.password
    }

    /// Whether `password` is this agent's own.
    pub fn is_own(&self, password: &str) -> bool {
        api::pull_digest(password) == *self.digest
    }

    /// Mark `id` as being pulled by this agent; `None` if it already is, or was.
    pub fn begin(&self, id: &str) -> Option<PullGuard> {
        let mut running = self.running.lock().expect("pull map poisoned");
        if running.contains_key(id) || self.done.lock().expect("pull set poisoned").contains(id) {
            return None;
        }
        let (done, waiter) = watch::channel(());
        running.insert(id.to_string(), waiter);
        Some(PullGuard {
            running: Arc::clone(&self.running),
            id: id.to_string(),
            _done: done,
        })
    }

    /// Every image of `id` is in the runtime.
    fn pulled(&self, id: &str) {
        self.done.lock().expect("pull set poisoned").insert(id.to_string());
    }

    /// `id` is forgotten: a later migration of the same id (none: ids are UIDs) or a retry
    /// after its images were removed may pull again.
    pub fn forget(&self, id: &str) {
        self.done.lock().expect("pull set poisoned").remove(id);
    }

    /// Wait until this agent's pull of `id` has ended (at once if there is none), at most `max`.
    /// Whether it waited at all.
    pub async fn wait(&self, id: &str, max: Duration) -> bool {
        let waiter = self.running.lock().expect("pull map poisoned").get(id).cloned();
        let Some(mut waiter) = waiter else {
            return false;
        };
        // Err(_) from changed(): the guard is gone; Err(_) from timeout: held long enough.
        let _ = tokio::time::timeout(max, waiter.changed()).await;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn held_until_the_own_pull_ends() {
        let pulls = OwnPulls::default();
        assert!(!pulls.wait("m1", Duration::from_secs(60)).await, "nothing to wait for");
        let guard = pulls.begin("m1").expect("first pull");
        assert!(pulls.begin("m1").is_none(), "one pull of a migration at a time");
        let waiter = {
            let pulls = pulls.clone();
            tokio::spawn(async move {
                let started = tokio::time::Instant::now();
                pulls.wait("m1", Duration::from_secs(60)).await;
                started.elapsed()
            })
        };
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(!waiter.is_finished(), "a held request goes on before the pull ended");
        drop(guard);
        assert_eq!(waiter.await.unwrap(), Duration::from_secs(3));
        assert!(
            !pulls.wait("m1", Duration::from_secs(60)).await,
            "the hold ends with the pull"
        );
        assert!(pulls.begin("m1").is_some(), "a later pull may begin again");
    }

    #[tokio::test(start_paused = true)]
    async fn a_hold_is_bounded() {
        let pulls = OwnPulls::default();
        let _guard = pulls.begin("m1").unwrap();
        let started = tokio::time::Instant::now();
        assert!(pulls.wait("m1", Duration::from_secs(5)).await);
        assert_eq!(started.elapsed(), Duration::from_secs(5));
    }

    #[test]
    fn only_the_own_password_is_own() {
        let (a, b) = (OwnPulls::default(), OwnPulls::default());
        assert!(a.is_own(a.password()));
        assert!(!a.is_own(b.password()), "each agent process has its own");
        assert!(!a.is_own(""));
        assert_eq!(a.password().len(), 64);
    }
}
