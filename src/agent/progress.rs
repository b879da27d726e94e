//! Pushes in progress, for `GET /v1/migrations/{id}/push`: the controller polls it while it
//! waits for a long push and shows the figures in the PodMigration (and so in
//! `kubectl migrate`'s progress bar).

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use axum::{
    Json,
    extract::{Path, State},
};

use super::{
    api::PushProgress,
    server::{AgentError, AgentState},
};

/// The pushes running on this agent, by migration id.
#[derive(Default)]
pub struct Pushes(Mutex<HashMap<String, Arc<Push>>>);

/// One push: its total, and what was read so far (shared with the uploads' readers).
pub struct Push {
    pub total: u64,
    pub read: Arc<AtomicU64>,
    started: Instant,
}

/// Removes its push from [`Pushes`] when the push ends, however it ends.
pub struct Registered<'a> {
    pushes: &'a Pushes,
    id: String,
    pub push: Arc<Push>,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        let mut map = self.pushes.0.lock().expect("pushes poisoned");
        if map.get(&self.id).is_some_and(|p| Arc::ptr_eq(p, &self.push)) {
            map.remove(&self.id);
        }
    }
}

impl Pushes {
    /// Record a push of `total` bytes for `id` (one at a time per id: the caller holds the
    /// migration's lock).
    pub fn start(&self, id: &str, total: u64) -> Registered<'_> {
        let push = Arc::new(Push {
            total,
            read: Arc::default(),
            started: Instant::now(),
        });
        self.0
            .lock()
            .expect("pushes poisoned")
            .insert(id.to_string(), Arc::clone(&push));
        Registered {
            pushes: self,
            id: id.to_string(),
            push,
        }
    }

    pub fn progress(&self, id: &str) -> Option<PushProgress> {
        let map = self.0.lock().expect("pushes poisoned");
        map.get(id).map(|p| PushProgress {
            // Read ahead of the wire by a few chunks at most; never shown past the total.
            bytes: p.read.load(Ordering::Relaxed).min(p.total),
            total_bytes: p.total,
            seconds: p.started.elapsed().as_secs_f64(),
        })
    }
}

/// `GET /v1/migrations/{id}/push`: 404 when no push of `id` is running.
pub async fn progress(
    State(state): State<Arc<AgentState>>,
    Path(id): Path<String>,
) -> Result<Json<PushProgress>, AgentError> {
    state
        .pushes
        .progress(&id)
        .map(Json)
        .ok_or_else(|| AgentError::NotFound(format!("no push of migration {id} is running")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_push_is_shown_while_it_runs_and_capped_at_its_total() {
        let pushes = Pushes::default();
        assert_eq!(pushes.progress("m"), None);
        {
            let running = pushes.start("m", 100);
            running.push.read.fetch_add(40, Ordering::Relaxed);
            let p = pushes.progress("m").unwrap();
            assert_eq!((p.bytes, p.total_bytes), (40, 100));
            running.push.read.fetch_add(90, Ordering::Relaxed);
            assert_eq!(pushes.progress("m").unwrap().bytes, 100);
            assert_eq!(pushes.progress("other"), None);
        }
        assert_eq!(pushes.progress("m"), None, "gone once the push ended");
    }

    #[test]
    fn an_old_push_ending_late_does_not_remove_a_newer_one() {
        let pushes = Pushes::default();
        let old = pushes.start("m", 1);
        let new = pushes.start("m", 2);
        drop(old);
        assert_eq!(pushes.progress("m").unwrap().total_bytes, 2);
        drop(new);
        assert_eq!(pushes.progress("m"), None);
    }
}
