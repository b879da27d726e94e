//! Holding an eviction while its migration is about to make the state safe.
//!
//! kubectl drain sleeps a fixed 5 s after every 429, so a migration whose state is verified
//! on the target 1 s after the first eviction still costs the drain 5 s, and a drain of many
//! pods pays that step once per wave. Instead of answering 429 at once, the webhook keeps the
//! request open (well inside the API server's webhook timeout, which it reads from the request)
//! and answers as soon as the migration's state is safe; only then, or when the hold runs out,
//! does it answer. The number of requests held at once is capped: each one occupies an API
//! server request slot (API Priority and Fairness seat) while it waits.

use std::{sync::Arc, time::Duration};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

/// Time kept between the end of a hold and the API server's deadline for the answer.
pub const MARGIN: Duration = Duration::from_secs(2);

/// What the API server tells a webhook about its deadline, when the request does not say:
/// assume the default `timeoutSeconds` (10 s) minus nothing we can know, so hold for little.
pub const UNKNOWN_TIMEOUT_HOLD: Duration = Duration::from_secs(3);

/// The webhook's holding policy and the signal that migrations changed.
#[derive(Clone)]
pub struct Holds {
    /// Longest hold (`--eviction-hold-seconds`); zero turns holding off.
    pub max: Duration,
    permits: Arc<Semaphore>,
    changed: watch::Receiver<()>,
}

impl Holds {
    /// `concurrent` requests may be held at once; `changed` fires on every migration event.
    pub fn new(max: Duration, concurrent: usize, changed: watch::Receiver<()>) -> Self {
        Self {
            max,
            permits: Arc::new(Semaphore::new(concurrent)),
            changed,
        }
    }

    /// Off: every answer is immediate (what tests and benches that need no cluster use).
    pub fn off() -> Self {
        Self::new(Duration::ZERO, 0, watch::channel(()).1)
    }

    /// A place to hold one request for at most `budget`, or None when holding is off, the
    /// budget is too short to matter, or as many requests as allowed are held already.
    pub fn acquire(&self, budget: Duration) -> Option<Hold> {
        if budget < Duration::from_millis(100) {
            return None;
        }
        let permit = Arc::clone(&self.permits).try_acquire_owned().ok()?;
        let mut changed = self.changed.clone();
        changed.mark_unchanged();
        Some(Hold {
            deadline: tokio::time::Instant::now() + budget,
            changed,
            _permit: permit,
        })
    }
}

/// One held request.
pub struct Hold {
    deadline: tokio::time::Instant,
    changed: watch::Receiver<()>,
    _permit: OwnedSemaphorePermit,
}

impl Hold {
    /// Wait for the next change of any migration; false once the hold has run out (or the
    /// caches stopped: the replica is shutting down).
    pub async fn next_change(&mut self) -> bool {
        matches!(
            tokio::time::timeout_at(self.deadline, self.changed.changed()).await,
            Ok(Ok(()))
        )
    }
}

/// How long this request may be held: the configured maximum, cut to leave [`MARGIN`] before
/// the deadline the API server sent as the `timeout` query parameter (a Go duration such as
/// `15s` or `9.5s`: what is left of the webhook's `timeoutSeconds`).
pub fn budget(max: Duration, query: Option<&str>) -> Duration {
    let timeout = query.and_then(|q| {
        q.split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == "timeout")
            .and_then(|(_, v)| go_duration(v))
    });
    match timeout {
        Some(t) => max.min(t.saturating_sub(MARGIN)),
        None => max.min(UNKNOWN_TIMEOUT_HOLD),
    }
}

/// Parse what Go's `time.Duration.String` prints (`1m0s`, `9.5s`, `250ms`, `1h2m3.5s`).
pub fn go_duration(s: &str) -> Option<Duration> {
    let mut rest = s.trim();
    if rest.is_empty() {
        return None;
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        let (number, tail) = rest.split_at(digits);
        let value: f64 = number.parse().ok()?;
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let scale = match unit {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        total += value * scale;
        rest = tail;
    }
    Duration::try_from_secs_f64(total).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations_parse_as_go_prints_them() {
        assert_eq!(go_duration("15s"), Some(Duration::from_secs(15)));
        assert_eq!(go_duration("9.5s"), Some(Duration::from_millis(9500)));
        assert_eq!(go_duration("1m0s"), Some(Duration::from_secs(60)));
        assert_eq!(go_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(go_duration("1h2m3.5s"), Some(Duration::from_millis(3_723_500)));
        for bad in ["", "s", "15", "15x", "-1s", "1.2.3s"] {
            assert_eq!(go_duration(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_budget_leaves_a_margin_before_the_api_servers_deadline() {
        let max = Duration::from_secs(10);
        assert_eq!(budget(max, Some("timeout=15s")), max);
        assert_eq!(budget(max, Some("timeout=5s")), Duration::from_secs(3));
        assert_eq!(budget(max, Some("x=1&timeout=9.5s")), Duration::from_millis(7500));
        // Less time left than the margin: no hold at all.
        assert_eq!(budget(max, Some("timeout=1s")), Duration::ZERO);
        // Not told: hold briefly (the API server's default timeout is 10 s).
        assert_eq!(budget(max, None), UNKNOWN_TIMEOUT_HOLD);
        assert_eq!(budget(max, Some("timeout=soon")), UNKNOWN_TIMEOUT_HOLD);
        assert_eq!(budget(Duration::ZERO, Some("timeout=15s")), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn holds_are_capped_and_end_on_a_change_or_at_their_deadline() {
        let (tx, rx) = watch::channel(());
        let holds = Holds::new(Duration::from_secs(10), 1, rx);
        let mut first = holds.acquire(Duration::from_secs(5)).expect("room for one");
        assert!(holds.acquire(Duration::from_secs(5)).is_none(), "only one at a time");
        assert!(holds.acquire(Duration::from_millis(50)).is_none(), "too short");
        tx.send_replace(());
        assert!(first.next_change().await, "a change wakes the hold");
        let started = tokio::time::Instant::now();
        assert!(!first.next_change().await, "no change: the hold runs out");
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        drop(first);
        assert!(
            holds.acquire(Duration::from_secs(5)).is_some(),
            "the place is free again"
        );
        assert!(Holds::off().acquire(Duration::from_secs(5)).is_none());
    }
}
