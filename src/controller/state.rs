//! Pure status transitions of a PodMigration: phase changes with their timings, conditions,
//! failures. The reconciler decides *when*; these functions decide *what the status becomes*.

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, MicroTime, Time},
    jiff::Timestamp,
};

use crate::api::{Phase, PhaseTiming, PodMigration, PodMigrationStatus, Trigger};

pub const CONDITION_READY: &str = "Ready";
pub const CONDITION_SOURCE_STOPPED: &str = "SourceStopped";
pub const CONDITION_QUEUED: &str = "Queued";
pub const CONDITION_DEGRADED: &str = "Degraded";
pub const CONDITION_FAILED: &str = "Failed";

/// Close the current phase's timing and enter `phase`. Returns the closed phase and its
/// duration in seconds. Entering the phase already current changes nothing.
pub fn enter(status: &mut PodMigrationStatus, phase: Phase, now: Timestamp) -> Option<(Phase, f64)> {
    if status.phase == phase && !status.phases.is_empty() {
        return None;
    }
    let mut closed = None;
    if let Some(last) = status.phases.last_mut()
        && last.finished_at.is_none()
    {
        let seconds = (now.as_millisecond() - last.started_at.0.as_millisecond()) as f64 / 1000.0;
        last.finished_at = Some(MicroTime(now));
        last.seconds = Some(seconds);
        closed = Some((last.phase, seconds));
    }
    status.phase = phase;
    status.attempts = 0;
    status.retry_at = None;
    let terminal = phase.is_terminal();
    status.phases.push(PhaseTiming {
        phase,
        started_at: MicroTime(now),
        finished_at: terminal.then_some(MicroTime(now)),
        seconds: terminal.then_some(0.0),
    });
    closed
}

/// The source is stopped (or stopping): when, and how, as the `SourceStopped` condition.
pub fn mark_source_stopped(status: &mut PodMigrationStatus, reason: &str, message: &str, now: Timestamp) {
    status.source_stopped_at = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now));
    set_condition(status, CONDITION_SOURCE_STOPPED, true, reason, message, now);
}

/// Record when `step` happened, once: the first sighting counts (steps observed from watch
/// events are seen again at every later event).
pub fn mark(status: &mut PodMigrationStatus, step: crate::api::Step, at: Timestamp) {
    if !status.timeline.iter().any(|t| t.step == step.as_str()) {
        status.timeline.push(crate::api::TimelineStep {
            step: step.as_str().to_string(),
            at: k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(at),
        });
    }
}

/// Set (or update) a condition; the transition time moves only when the status flips.
pub fn set_condition(
    status: &mut PodMigrationStatus,
    type_: &str,
    value: bool,
    reason: &str,
    message: &str,
    now: Timestamp,
) {
    let value = if value { "True" } else { "False" };
    match status.conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => {
            if c.status != value {
                c.last_transition_time = Time(now);
            }
            c.status = value.to_string();
            c.reason = reason.to_string();
            c.message = message.to_string();
        }
        None => status.conditions.push(Condition {
            type_: type_.to_string(),
            status: value.to_string(),
            reason: reason.to_string(),
            message: message.to_string(),
            last_transition_time: Time(now),
            observed_generation: None,
        }),
    }
}

pub fn condition_is_true(status: &PodMigrationStatus, type_: &str) -> bool {
    status.conditions.iter().any(|c| c.type_ == type_ && c.status == "True")
}

/// Fail the migration with a reason (CamelCase, also the metric label) and a message.
pub fn fail(status: &mut PodMigrationStatus, reason: &str, message: String, now: Timestamp) -> Option<(Phase, f64)> {
    let closed = enter(status, Phase::Failed, now);
    status.reason = Some(reason.to_string());
    set_condition(status, CONDITION_FAILED, true, reason, &message, now);
    set_condition(status, CONDITION_QUEUED, false, "Finished", "", now);
    status.message = Some(message);
    closed
}

/// Mark the migration done.
pub fn succeed(status: &mut PodMigrationStatus, message: String, now: Timestamp) -> Option<(Phase, f64)> {
    let closed = enter(status, Phase::Succeeded, now);
    status.reason = None;
    set_condition(status, CONDITION_READY, true, "Restored", &message, now);
    set_condition(status, CONDITION_DEGRADED, false, "Restored", "", now);
    status.message = Some(message);
    closed
}

/// What a step persisted that metrics count, from the status before it and after it: the
/// phases it closed (with their seconds) and whether it ended the migration. Derived from the
/// written status, so a step whose write failed (and is done again) counts once.
pub fn finished_in_step(before: &PodMigrationStatus, after: &PodMigrationStatus) -> (Vec<(Phase, f64)>, bool) {
    let closed = after
        .phases
        .iter()
        .enumerate()
        .filter(|(i, t)| !t.phase.is_terminal() && before.phases.get(*i).is_none_or(|b| b.seconds.is_none()))
        .filter_map(|(_, t)| t.seconds.map(|s| (t.phase, s)))
        .collect();
    let ended = after.phase.is_terminal() && !before.phase.is_terminal();
    (closed, ended)
}

/// Seconds spent in `phase`, when it finished.
pub fn phase_seconds(status: &PodMigrationStatus, phase: Phase) -> Option<f64> {
    status
        .phases
        .iter()
        .rev()
        .find(|t| t.phase == phase)
        .and_then(|t| t.seconds)
}

/// The drain of `node` as far as kube-migrate saw it: its drain migrations created within an
/// hour of `now`. When all of them are terminal: (first creation second, seconds from the
/// first creation to the last finish). None while any still runs.
pub fn drain_episode<'a>(
    migrations: impl Iterator<Item = &'a PodMigration>,
    node: &str,
    now: Timestamp,
) -> Option<(i64, f64)> {
    let mut first: Option<Timestamp> = None;
    let mut last: Option<Timestamp> = None;
    for m in migrations {
        if m.spec.source_node != node || m.spec.trigger != Trigger::Drain {
            continue;
        }
        let Some(created) = m.metadata.creation_timestamp.as_ref().map(|t| t.0) else {
            continue;
        };
        if now.as_second() - created.as_second() > 3600 {
            continue;
        }
        let finished = m.finished_at()?.0; // still running: no episode yet
        first = Some(first.map_or(created, |f| f.min(created)));
        last = Some(last.map_or(finished, |l| l.max(finished)));
    }
    let (first, last) = (first?, last?);
    Some((
        first.as_second(),
        (last.as_millisecond() - first.as_millisecond()) as f64 / 1000.0,
    ))
}

/// Backoff for retries: 2, 4, 8, ... capped at 60 seconds.
pub fn backoff(attempts: u32) -> std::time::Duration {
    std::time::Duration::from_secs(2u64.saturating_pow(attempts.clamp(1, 6)).min(60))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + secs).unwrap()
    }

    #[test]
    fn a_phase_keeps_its_sub_second_start_through_the_api_server() {
        // The status is read back from the API server between steps: a phase that began at
        // .750 and ends 0.5 s later lasted 0.5 s, not 1.25 s (its start cut to the second).
        let mut status = PodMigrationStatus::default();
        let start = t(0).checked_add(std::time::Duration::from_millis(750)).unwrap();
        enter(&mut status, Phase::Pending, start);
        let mut status: PodMigrationStatus = serde_json::from_value(serde_json::to_value(&status).unwrap()).unwrap();
        let end = start.checked_add(std::time::Duration::from_millis(500)).unwrap();
        assert_eq!(
            enter(&mut status, Phase::Checkpointing, end),
            Some((Phase::Pending, 0.5))
        );
    }

    #[test]
    fn a_step_counts_what_it_finished_once() {
        let mut before = PodMigrationStatus::default();
        enter(&mut before, Phase::Pending, t(0));
        enter(&mut before, Phase::Checkpointing, t(2));
        // One step: Checkpointing done, Transferring entered.
        let mut after = before.clone();
        enter(&mut after, Phase::Transferring, t(5));
        assert_eq!(
            finished_in_step(&before, &after),
            (vec![(Phase::Checkpointing, 3.0)], false)
        );
        // Nothing changed (a step that only waited, or the same state seen again): nothing.
        assert_eq!(finished_in_step(&after, &after), (vec![], false));
        // A step that went through two phases counts both; ending counts once, its own
        // zero-length terminal entry not as a phase.
        let mut end = after.clone();
        enter(&mut end, Phase::BuildingImage, t(7));
        fail(&mut end, "NoTarget", "gone".into(), t(8));
        assert_eq!(
            finished_in_step(&after, &end),
            (vec![(Phase::Transferring, 2.0), (Phase::BuildingImage, 1.0)], true)
        );
        assert_eq!(
            finished_in_step(&end, &end),
            (vec![], false),
            "a finished one is not ended again"
        );
        // The first step of all (no status yet) enters Pending and closes nothing.
        let mut first = PodMigrationStatus::default();
        enter(&mut first, Phase::Pending, t(0));
        assert_eq!(
            finished_in_step(&PodMigrationStatus::default(), &first),
            (vec![], false)
        );
    }

    #[test]
    fn phases_record_their_durations() {
        let mut s = PodMigrationStatus::default();
        assert_eq!(enter(&mut s, Phase::Pending, t(0)), None);
        assert_eq!(enter(&mut s, Phase::Checkpointing, t(2)), Some((Phase::Pending, 2.0)));
        s.attempts = 3;
        assert_eq!(
            enter(&mut s, Phase::Transferring, t(5)),
            Some((Phase::Checkpointing, 3.0))
        );
        assert_eq!(s.attempts, 0, "a new phase starts with no retries");
        assert_eq!(enter(&mut s, Phase::Transferring, t(6)), None, "re-entering is a no-op");
        assert_eq!(phase_seconds(&s, Phase::Checkpointing), Some(3.0));
        assert_eq!(phase_seconds(&s, Phase::Transferring), None);
        succeed(&mut s, "done".into(), t(9));
        assert_eq!(s.phase, Phase::Succeeded);
        assert_eq!(phase_seconds(&s, Phase::Transferring), Some(4.0));
        assert!(condition_is_true(&s, CONDITION_READY));
        let phases: Vec<_> = s.phases.iter().map(|p| p.phase).collect();
        assert_eq!(
            phases,
            [
                Phase::Pending,
                Phase::Checkpointing,
                Phase::Transferring,
                Phase::Succeeded
            ]
        );
    }

    #[test]
    fn failure_records_reason_and_condition() {
        let mut s = PodMigrationStatus::default();
        enter(&mut s, Phase::Pending, t(0));
        fail(&mut s, "NoTarget", "node-b is cordoned".into(), t(1));
        assert_eq!(s.phase, Phase::Failed);
        assert_eq!(s.reason.as_deref(), Some("NoTarget"));
        assert_eq!(s.message.as_deref(), Some("node-b is cordoned"));
        assert!(condition_is_true(&s, CONDITION_FAILED));
        assert!(!condition_is_true(&s, CONDITION_QUEUED));
    }

    #[test]
    fn condition_transition_time_moves_only_on_flips() {
        let mut s = PodMigrationStatus::default();
        set_condition(&mut s, CONDITION_QUEUED, true, "Limit", "a", t(0));
        set_condition(&mut s, CONDITION_QUEUED, true, "Limit", "b", t(5));
        assert_eq!(s.conditions[0].last_transition_time, Time(t(0)));
        assert_eq!(s.conditions[0].message, "b");
        set_condition(&mut s, CONDITION_QUEUED, false, "Started", "", t(7));
        assert_eq!(s.conditions[0].last_transition_time, Time(t(7)));
        assert_eq!(s.conditions.len(), 1);
    }

    fn drain_pm(node: &str, created: i64, finished: Option<i64>) -> PodMigration {
        let mut pm = PodMigration::new(
            &format!("m{created}"),
            crate::api::PodMigrationSpec {
                pod_name: "p".into(),
                pod_uid: "u".into(),
                source_node: node.into(),
                target_node: None,
                trigger: Trigger::Drain,
                policy: Default::default(),
                mode: Default::default(),
                restore_from: None,
            },
        );
        pm.metadata.creation_timestamp = Some(Time(t(created)));
        let mut status = PodMigrationStatus::default();
        enter(&mut status, Phase::Pending, t(created));
        if let Some(f) = finished {
            succeed(&mut status, "ok".into(), t(f));
        }
        pm.status = Some(status);
        pm
    }

    #[test]
    fn a_drain_ends_when_its_last_migration_does() {
        let running = [
            drain_pm("a", 0, Some(5)),
            drain_pm("a", 1, None),
            drain_pm("b", 0, Some(2)),
        ];
        assert_eq!(drain_episode(running.iter(), "a", t(10)), None);
        let done = [
            drain_pm("a", 0, Some(5)),
            drain_pm("a", 1, Some(9)),
            drain_pm("b", 0, Some(2)),
        ];
        assert_eq!(drain_episode(done.iter(), "a", t(10)), Some((t(0).as_second(), 9.0)));
        assert_eq!(drain_episode(done.iter(), "b", t(10)), Some((t(0).as_second(), 2.0)));
        assert_eq!(drain_episode(done.iter(), "c", t(10)), None);
        // Migrations of an older drain of the same node do not count.
        let later = [drain_pm("a", 0, Some(5)), drain_pm("a", 5000, Some(5004))];
        assert_eq!(
            drain_episode(later.iter(), "a", t(5010)),
            Some((t(5000).as_second(), 4.0))
        );
    }

    #[test]
    fn a_step_is_marked_once_the_first_sighting_counts() {
        use crate::api::Step;
        let mut s = PodMigrationStatus::default();
        let t = |ms| Timestamp::from_millisecond(ms).unwrap();
        mark(&mut s, Step::Scheduled, t(1_000));
        mark(&mut s, Step::Started, t(2_500));
        mark(&mut s, Step::Scheduled, t(3_000));
        let steps: Vec<(&str, i64)> = s
            .timeline
            .iter()
            .map(|x| (x.step.as_str(), x.at.0.as_millisecond()))
            .collect();
        assert_eq!(steps, [("scheduled", 1_000), ("started", 2_500)]);
        let names: Vec<&str> = Step::ALL.iter().map(|s| s.as_str()).collect();
        let mut unique = names.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(names.len(), unique.len(), "step names are distinct");
    }

    #[test]
    fn backoff_grows_and_caps() {
        assert_eq!(backoff(0).as_secs(), 2);
        assert_eq!(backoff(1).as_secs(), 2);
        assert_eq!(backoff(3).as_secs(), 8);
        assert_eq!(backoff(40).as_secs(), 60);
    }
}
