//! Every run-policy rule, without a cluster.

use dinoflow_api::cluster::{CleanPodPolicy, ClusterSpec, RunPolicy};
use dinoflow_api::status::{JobPhase, JobStatus, condition};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use super::*;
use crate::observe::fixtures::{deleting, exited, finished_at, pod, with_condition};
use crate::observe::observe;

const NOW: i64 = 10_000;

fn at(secs: i64) -> Time {
    Time(Timestamp::from_second(secs).unwrap())
}

struct World {
    job: JobRef,
    cluster: ClusterSpec,
    status: JobStatus,
    teacher: Option<TeacherState>,
    invalid: Option<String>,
    operating_since: Option<i64>,
    now: i64,
}

impl World {
    fn new(nodes: i32) -> Self {
        Self {
            job: JobRef::test("j"),
            cluster: ClusterSpec {
                nodes,
                ..Default::default()
            },
            status: JobStatus::default(),
            teacher: None,
            invalid: None,
            operating_since: None,
            now: NOW,
        }
    }

    fn policy(mut self, f: impl FnOnce(&mut RunPolicy)) -> Self {
        f(&mut self.cluster.run_policy);
        self
    }

    fn decide(&self, pods: &[k8s_openapi::api::core::v1::Pod]) -> Decision {
        let facts = JobFacts {
            job: &self.job,
            cluster: &self.cluster,
            status: &self.status,
            teacher: self.teacher.clone(),
            invalid: self.invalid.clone(),
            operating_since: self
                .operating_since
                .map(|t| Timestamp::from_second(t).unwrap()),
            now: Timestamp::from_second(self.now).unwrap(),
        };
        let observed: Vec<_> = pods.iter().map(observe).collect();
        decide(&facts, &observed)
    }

    /// Applies a decision's status, as the controller would.
    fn step(&mut self, pods: &[k8s_openapi::api::core::v1::Pod]) -> Decision {
        let d = self.decide(pods);
        self.status = d.status.clone();
        d
    }
}

fn running_gang(nodes: i32, attempt: i32) -> Vec<k8s_openapi::api::core::v1::Pod> {
    (0..nodes).map(|r| pod(r, attempt, "Running")).collect()
}

fn reasons(d: &Decision) -> Vec<&'static str> {
    d.events.iter().map(|e| e.reason).collect()
}

#[test]
fn new_job_creates_the_gang_for_attempt_zero() {
    let mut w = World::new(2);
    let d = w.step(&[]);
    assert!(d.ensure_gang);
    assert_eq!(d.status.run_attempt, Some(0));
    assert_eq!(d.status.restarts, Some(0));
    assert_eq!(d.status.phase, Some(JobPhase::Pending));
    assert!(d.status.is_true(condition::CREATED));
    assert_eq!(d.status.start_time, Some(at(NOW)));
    assert_eq!(reasons(&d), [reason::GANG_CREATED]);
    // Reconciling again creates nothing new and emits no duplicate event.
    let again = w.step(&[]);
    assert!(again.ensure_gang);
    assert!(again.events.is_empty());
}

#[test]
fn all_pods_running_makes_the_job_running_once() {
    let mut w = World::new(2);
    w.step(&[]);
    let d = w.step(&running_gang(2, 0));
    assert_eq!(d.status.phase, Some(JobPhase::Running));
    assert!(d.status.is_true(condition::RUNNING));
    assert_eq!(d.status.pods.unwrap().running, 2);
    assert_eq!(reasons(&d), [reason::ALL_PODS_RUNNING]);
    assert!(w.step(&running_gang(2, 0)).events.is_empty());
}

#[test]
fn one_running_pod_of_two_is_still_pending() {
    let mut w = World::new(2);
    w.now = 1010; // fixture pods were created at t=1000, well within the pending timeout
    w.step(&[]);
    let d = w.step(&[pod(0, 0, "Running"), pod(1, 0, "Pending")]);
    assert_eq!(d.status.phase, Some(JobPhase::Pending));
    assert_eq!(
        d.status.condition(condition::RUNNING).unwrap().reason,
        reason::PODS_PENDING
    );
}

#[test]
fn retryable_failure_restarts_the_whole_gang_and_counts_it() {
    let mut w = World::new(2);
    w.step(&[]);
    w.step(&running_gang(2, 0));
    let gang = [exited(pod(0, 0, "Running"), 1), pod(1, 0, "Running")];
    let d = w.step(&gang);
    assert!(!d.ensure_gang);
    assert_eq!(d.delete_pods, ["j-a0-0", "j-a0-1"]);
    assert_eq!(d.status.run_attempt, Some(1));
    assert_eq!(d.status.restarts, Some(1));
    assert_eq!(d.status.phase, Some(JobPhase::Restarting));
    assert!(d.status.is_true(condition::RESTARTING));
    assert_eq!(reasons(&d), [reason::POD_FAILED, reason::RESTARTING]);
    assert!(
        d.events[0]
            .note
            .contains("on node-0 failed with exit code 1"),
        "{}",
        d.events[0].note
    );
    assert!(
        d.events[1].note.contains("restart 1/3"),
        "{}",
        d.events[1].note
    );
}

#[test]
fn replaying_a_restart_on_a_stale_cache_does_not_count_twice() {
    let mut w = World::new(2);
    w.step(&[]);
    let gang = [exited(pod(0, 0, "Running"), 1), pod(1, 0, "Running")];
    w.step(&gang);
    // Same pods observed again after the status moved to attempt 1: they are stale.
    let d = w.step(&gang);
    assert_eq!(d.status.restarts, Some(1));
    assert_eq!(d.status.run_attempt, Some(1));
    assert!(
        !d.ensure_gang,
        "the next gang waits for the old one to be gone"
    );
    assert_eq!(d.delete_pods, ["j-a0-0", "j-a0-1"]);
    // Once the old pods are gone the new attempt is created.
    let d = w.step(&[]);
    assert!(d.ensure_gang);
    assert_eq!(reasons(&d), [reason::GANG_CREATED]);
    let d = w.step(&running_gang(2, 1));
    assert_eq!(d.status.phase, Some(JobPhase::Running));
    assert!(!d.status.is_true(condition::RESTARTING));
}

#[test]
fn terminating_old_pods_are_waited_for_not_deleted_again() {
    let mut w = World::new(1);
    w.status.run_attempt = Some(1);
    let mut old = pod(0, 0, "Running");
    old.metadata.deletion_timestamp = Some(at(NOW));
    let d = w.decide(&[old]);
    assert!(d.delete_pods.is_empty());
    assert!(!d.ensure_gang);
    assert!(d.requeue_after.is_some());
}

#[test]
fn permanent_exit_code_fails_the_job_without_restart() {
    for code in [78, 79] {
        let mut w = World::new(2);
        w.step(&[]);
        let d = w.step(&[exited(pod(0, 0, "Running"), code), pod(1, 0, "Running")]);
        assert_eq!(d.status.phase, Some(JobPhase::Failed));
        assert_eq!(d.status.restarts, Some(0));
        assert_eq!(d.status.run_attempt, Some(0));
        let failed = d.status.condition(condition::FAILED).unwrap();
        assert_eq!(failed.reason, reason::PERMANENT_FAILURE);
        assert!(failed.message.contains(&format!("code {code}")));
        // The straggler is stopped; the failed pod stays for its logs.
        assert_eq!(d.delete_pods, ["j-a0-1"]);
        assert_eq!(d.status.completion_time, Some(at(NOW)));
    }
}

#[test]
fn user_listed_exit_codes_are_permanent_too() {
    let mut w = World::new(1).policy(|p| p.permanent_exit_codes = vec![3]);
    w.step(&[]);
    let d = w.step(&[exited(pod(0, 0, "Running"), 3)]);
    assert_eq!(d.status.phase, Some(JobPhase::Failed));
}

#[test]
fn exhausted_backoff_limit_fails_the_job() {
    let mut w = World::new(1);
    w.status.restarts = Some(3);
    w.status.run_attempt = Some(3);
    let d = w.step(&[exited(pod(0, 3, "Running"), 1)]);
    assert_eq!(d.status.phase, Some(JobPhase::Failed));
    assert_eq!(
        d.status.condition(condition::FAILED).unwrap().reason,
        reason::BACKOFF_LIMIT_EXCEEDED
    );
    assert_eq!(d.status.restarts, Some(3));
}

#[test]
fn backoff_limit_zero_never_restarts() {
    let mut w = World::new(1).policy(|p| p.backoff_limit = 0);
    w.step(&[]);
    let d = w.step(&[exited(pod(0, 0, "Running"), 137)]);
    assert_eq!(d.status.phase, Some(JobPhase::Failed));
}

#[test]
fn eviction_restarts_without_using_the_backoff_budget() {
    let mut w = World::new(2);
    w.status.restarts = Some(3); // budget already used up
    w.step(&[]);
    let mut evicted = exited(pod(1, 0, "Running"), 137);
    evicted.status.as_mut().unwrap().reason = Some("Evicted".into());
    let d = w.step(&[pod(0, 0, "Running"), evicted]);
    assert_eq!(d.status.phase, Some(JobPhase::Restarting));
    assert_eq!(d.status.restarts, Some(3));
    assert_eq!(d.status.disruptions, Some(1));
    assert_eq!(d.status.run_attempt, Some(1));
    assert_eq!(reasons(&d), [reason::POD_DISRUPTED, reason::RESTARTING]);
}

#[test]
fn node_loss_restarts_without_using_the_backoff_budget() {
    let mut w = World::new(1);
    w.step(&[]);
    let lost = with_condition(
        pod(0, 0, "Running"),
        "DisruptionTarget",
        "True",
        "DeletionByTaintManager",
        "",
    );
    let d = w.step(&[lost]);
    assert_eq!(
        (d.status.restarts, d.status.disruptions),
        (Some(0), Some(1))
    );
}

#[test]
fn suspend_deletes_the_pods_keeps_the_job_and_resume_recreates_them() {
    let mut w = World::new(2);
    w.step(&[]);
    w.step(&running_gang(2, 0));
    w.cluster.run_policy.suspend = true;
    let d = w.step(&running_gang(2, 0));
    assert_eq!(d.delete_pods, ["j-a0-0", "j-a0-1"]);
    assert!(!d.ensure_gang);
    assert_eq!(d.status.phase, Some(JobPhase::Suspended));
    assert!(d.status.is_true(condition::SUSPENDED));
    assert_eq!(reasons(&d), [reason::SUSPENDED]);
    assert_eq!(d.status.restarts, Some(0));
    // Still suspended, pods gone: nothing happens.
    let d = w.step(&[]);
    assert!(d.events.is_empty() && !d.ensure_gang);
    // Resume: a fresh gang with the next attempt number.
    w.cluster.run_policy.suspend = false;
    let d = w.step(&[]);
    assert!(d.ensure_gang);
    assert_eq!(d.status.run_attempt, Some(1));
    assert!(!d.status.is_true(condition::SUSPENDED));
    assert_eq!(reasons(&d), [reason::RESUMED, reason::GANG_CREATED]);
}

#[test]
fn job_created_suspended_never_creates_pods() {
    let mut w = World::new(2).policy(|p| p.suspend = true);
    let d = w.step(&[]);
    assert!(!d.ensure_gang);
    assert_eq!(d.status.run_attempt, Some(0));
}

#[test]
fn active_deadline_fails_the_job_and_stops_the_pods() {
    let mut w = World::new(1).policy(|p| p.active_deadline_seconds = Some(100));
    w.step(&[]);
    w.now += 50;
    let d = w.step(&running_gang(1, 0));
    assert_eq!(d.requeue_after, Some(Duration::from_secs(50)));
    w.now += 50;
    let d = w.step(&running_gang(1, 0));
    assert_eq!(d.status.phase, Some(JobPhase::Failed));
    assert_eq!(
        d.status.condition(condition::FAILED).unwrap().reason,
        reason::DEADLINE_EXCEEDED
    );
    assert_eq!(d.delete_pods, ["j-a0-0"]);
}

#[test]
fn all_pods_exiting_zero_succeeds_the_job() {
    let mut w = World::new(2);
    w.step(&[]);
    let done = [
        exited(pod(0, 0, "Running"), 0),
        exited(pod(1, 0, "Running"), 0),
    ];
    let d = w.step(&done);
    assert_eq!(d.status.phase, Some(JobPhase::Succeeded));
    assert!(d.status.is_true(condition::SUCCEEDED));
    assert!(
        d.delete_pods.is_empty(),
        "finished pods keep their logs by default"
    );
    assert!(!d.ensure_gang);
}

#[test]
fn rank_zero_done_while_others_run_keeps_the_job_running() {
    let mut w = World::new(2);
    w.step(&[]);
    let d = w.step(&[exited(pod(0, 0, "Running"), 0), pod(1, 0, "Running")]);
    assert_eq!(d.status.phase, Some(JobPhase::Running));
}

#[test]
fn clean_pod_policy_all_deletes_finished_pods_and_none_keeps_stragglers() {
    let mut w = World::new(2).policy(|p| p.clean_pod_policy = CleanPodPolicy::All);
    w.step(&[]);
    let done = [
        exited(pod(0, 0, "Running"), 0),
        exited(pod(1, 0, "Running"), 0),
    ];
    assert_eq!(w.step(&done).delete_pods, ["j-a0-0", "j-a0-1"]);

    let mut w = World::new(2).policy(|p| p.clean_pod_policy = CleanPodPolicy::None);
    w.step(&[]);
    let d = w.step(&[exited(pod(0, 0, "Running"), 78), pod(1, 0, "Running")]);
    assert_eq!(d.status.phase, Some(JobPhase::Failed));
    assert!(d.delete_pods.is_empty());
}

#[test]
fn ttl_after_finished_deletes_the_job_when_due() {
    let mut w = World::new(1).policy(|p| p.ttl_seconds_after_finished = Some(60));
    w.step(&[]);
    let d = w.step(&[exited(pod(0, 0, "Running"), 0)]);
    assert_eq!(d.requeue_after, Some(Duration::from_secs(60)));
    assert!(!d.delete_job);
    w.now += 60;
    let d = w.step(&[exited(pod(0, 0, "Running"), 0)]);
    assert!(d.delete_job);
    assert_eq!(reasons(&d), [reason::TTL_EXPIRED]);
}

#[test]
fn finished_job_is_never_restarted() {
    let mut w = World::new(1);
    w.status.phase = Some(JobPhase::Failed);
    let d = w.step(&[exited(pod(0, 0, "Running"), 1)]);
    assert_eq!(d.status.phase, Some(JobPhase::Failed));
    assert!(!d.ensure_gang && d.events.is_empty());
}

#[test]
fn gang_pending_past_the_timeout_reports_the_schedulers_reason_once() {
    let mut w = World::new(2).policy(|p| p.pending_timeout_seconds = 300);
    w.step(&[]);
    let unsched = |r| {
        with_condition(
            pod(r, 0, "Pending"),
            "PodScheduled",
            "False",
            "Unschedulable",
            "0/4 nodes are available: 4 Insufficient nvidia.com/gpu.",
        )
    };
    w.now = 1000 + 299; // pods were created at t=1000
    let d = w.step(&[unsched(0), unsched(1)]);
    assert_eq!(
        d.status.condition(condition::RUNNING).unwrap().reason,
        reason::PODS_PENDING
    );
    assert_eq!(d.requeue_after, Some(Duration::from_secs(1)));
    w.now = 1000 + 300;
    let d = w.step(&[unsched(0), unsched(1)]);
    let c = d.status.condition(condition::RUNNING).unwrap();
    assert_eq!(c.reason, reason::PENDING_TIMEOUT);
    assert!(
        c.message.contains("Insufficient nvidia.com/gpu"),
        "{}",
        c.message
    );
    assert_eq!(reasons(&d), [reason::PENDING_TIMEOUT]);
    assert!(d.events[0].warning);
    assert!(w.step(&[unsched(0), unsched(1)]).events.is_empty());
    assert_eq!(
        w.status.phase,
        Some(JobPhase::Pending),
        "pending jobs keep waiting"
    );
}

#[test]
fn gang_without_progress_past_the_hang_timeout_is_restarted() {
    let mut w = World::new(1).policy(|p| p.hang_timeout_seconds = Some(600));
    w.step(&[]);
    w.step(&running_gang(1, 0));
    w.status.last_progress_time = Some(at(NOW + 100));
    w.now = NOW + 699;
    assert_eq!(
        w.step(&running_gang(1, 0)).status.phase,
        Some(JobPhase::Running)
    );
    w.now = NOW + 700;
    let d = w.step(&running_gang(1, 0));
    assert_eq!(d.status.phase, Some(JobPhase::Restarting));
    assert_eq!(d.status.restarts, Some(1));
    assert_eq!(reasons(&d), [reason::HUNG, reason::RESTARTING]);
}

#[test]
fn distill_job_waits_for_its_teacher_then_uses_its_checkpoint() {
    let mut w = World::new(1);
    w.teacher = Some(TeacherState::Waiting {
        name: "big".into(),
        phase: JobPhase::Running,
    });
    let d = w.step(&[]);
    assert!(!d.ensure_gang);
    assert_eq!(d.status.phase, Some(JobPhase::WaitingForTeacher));
    assert!(d.status.is_true(condition::WAITING_FOR_TEACHER));
    assert_eq!(reasons(&d), [reason::WAITING_FOR_TEACHER]);
    assert!(w.step(&[]).events.is_empty());
    w.teacher = Some(TeacherState::Ready {
        checkpoint: "/ckpt/big/final".into(),
    });
    let d = w.step(&[]);
    assert!(d.ensure_gang);
    assert!(!d.status.is_true(condition::WAITING_FOR_TEACHER));
    assert_eq!(
        d.status.teacher_checkpoint.as_deref(),
        Some("/ckpt/big/final")
    );
    assert_eq!(reasons(&d), [reason::TEACHER_READY, reason::GANG_CREATED]);
}

#[test]
fn missing_teacher_waits_and_failed_teacher_fails_the_distillation() {
    let mut w = World::new(1);
    w.teacher = Some(TeacherState::Missing("big".into()));
    assert_eq!(w.step(&[]).status.phase, Some(JobPhase::WaitingForTeacher));
    w.teacher = Some(TeacherState::Failed(
        "teacher PretrainJob big failed".into(),
    ));
    let d = w.step(&[]);
    assert_eq!(d.status.phase, Some(JobPhase::Failed));
    assert_eq!(
        d.status.condition(condition::FAILED).unwrap().reason,
        reason::TEACHER_FAILED
    );
}

#[test]
fn pods_of_a_newer_attempt_mean_a_stale_view_and_nothing_is_done() {
    let w = World::new(2);
    let d = w.decide(&running_gang(2, 1));
    assert!(d.delete_pods.is_empty());
    assert!(!d.ensure_gang);
    assert!(d.events.is_empty());
    assert_eq!(d.requeue_after, Some(Duration::from_secs(1)));
}

fn checkpoint(iteration: i64) -> Option<dinoflow_api::status::CheckpointRef> {
    Some(dinoflow_api::status::CheckpointRef {
        iteration,
        path: format!("/ckpt/iter-{iteration}"),
        time: at(NOW),
    })
}

/// A pod that exited with `code` at `secs` (finishedAt).
fn exited_at(rank: i32, attempt: i32, code: i32, secs: i64) -> k8s_openapi::api::core::v1::Pod {
    finished_at(exited(pod(rank, attempt, "Running"), code), secs)
}

#[test]
fn gang_pending_longer_than_the_hang_timeout_is_not_hung_once_it_runs() {
    let mut w = World::new(2).policy(|p| p.hang_timeout_seconds = Some(600));
    w.step(&[]);
    // Scheduling and image pulls take longer than the hang timeout.
    w.now = NOW + 900;
    let pending = [pod(0, 0, "Pending"), pod(1, 0, "Pending")];
    assert_eq!(w.step(&pending).status.phase, Some(JobPhase::Pending));
    w.now = NOW + 1000;
    let d = w.step(&running_gang(2, 0));
    assert_eq!(d.status.phase, Some(JobPhase::Running));
    assert_eq!(d.status.attempt_running_time, Some(at(NOW + 1000)));
    assert_eq!(d.requeue_after, Some(Duration::from_secs(600)));
    // The gang has been running for one second: not hung, nothing restarted.
    w.now = NOW + 1001;
    let d = w.step(&running_gang(2, 0));
    assert_eq!(d.status.phase, Some(JobPhase::Running));
    assert_eq!(d.status.restarts, Some(0));
    // Silent for the whole timeout once running: hung.
    w.now = NOW + 1600;
    let d = w.step(&running_gang(2, 0));
    assert_eq!(d.status.phase, Some(JobPhase::Restarting));
    assert_eq!(reasons(&d), [reason::HUNG, reason::RESTARTING]);
}

#[test]
fn operator_outage_longer_than_the_hang_timeout_does_not_restart_a_healthy_gang() {
    let mut w = World::new(1).policy(|p| p.hang_timeout_seconds = Some(600));
    w.step(&[]);
    w.step(&running_gang(1, 0));
    w.status.last_progress_time = Some(at(NOW + 100));
    // The operator was down from NOW+150 to NOW+2000: no report could reach it.
    w.operating_since = Some(NOW + 2000);
    w.now = NOW + 2001;
    let d = w.step(&running_gang(1, 0));
    assert_eq!(d.status.phase, Some(JobPhase::Running));
    assert_eq!(d.status.restarts, Some(0));
    assert!(d.events.is_empty());
    assert_eq!(d.requeue_after, Some(Duration::from_secs(599)));
    // A gang that stays silent a whole timeout after the operator is back is hung.
    w.now = NOW + 2600;
    let d = w.step(&running_gang(1, 0));
    assert_eq!(d.status.phase, Some(JobPhase::Restarting));
    assert_eq!(reasons(&d), [reason::HUNG, reason::RESTARTING]);
}

#[test]
fn peer_exit_beside_an_evicted_pod_is_a_disruption_not_a_counted_restart() {
    for peer_code in [70, 143] {
        let mut w = World::new(2);
        w.step(&[]);
        w.step(&running_gang(2, 0));
        let mut evicted = exited(pod(1, 0, "Running"), 143);
        evicted.status.as_mut().unwrap().reason = Some("Evicted".into());
        // Rank 0 sorts first and only shows its peer's failure.
        let d = w.step(&[exited_at(0, 0, peer_code, NOW - 1), evicted]);
        assert_eq!(d.status.phase, Some(JobPhase::Restarting));
        assert_eq!(
            (d.status.restarts, d.status.disruptions),
            (Some(0), Some(1)),
            "peer code {peer_code}"
        );
        assert_eq!(reasons(&d), [reason::POD_DISRUPTED, reason::RESTARTING]);
    }
}

/// The chaos e2e's race: a pod deleted from outside (graceful) while the operator is away
/// (its leader just killed) is first seen failed with 143, its peer with 70, after a new
/// checkpoint. It is a disruption, not a failure charged to the progress or backoff budget.
#[test]
fn pod_first_seen_after_an_outside_deletion_stopped_it_is_a_disruption() {
    let mut w = World::new(2);
    w.step(&[]);
    w.step(&running_gang(2, 0));
    w.status.last_checkpoint = Some(dinoflow_api::status::CheckpointRef {
        iteration: 9,
        path: "/ckpt/ckpt-000000009".into(),
        time: at(NOW - 30),
    });
    let mut deleted = deleting(
        finished_at(exited(pod(1, 0, "Running"), 143), NOW - 5),
        NOW + 10,
    );
    deleted.metadata.deletion_grace_period_seconds = Some(20);
    let d = w.step(&[exited_at(0, 0, 70, NOW - 4), deleted]);
    assert_eq!(d.status.phase, Some(JobPhase::Restarting));
    assert_eq!(
        (
            d.status.restarts.unwrap_or(0),
            d.status.progress_restarts.unwrap_or(0),
            d.status.disruptions
        ),
        (0, 0, Some(1))
    );
    assert_eq!(reasons(&d), [reason::POD_DISRUPTED, reason::RESTARTING]);
}

#[test]
fn permanent_exit_seen_after_a_peers_collective_failure_still_fails_the_job() {
    let mut w = World::new(2);
    w.step(&[]);
    w.step(&running_gang(2, 0));
    // Rank 1's collective failed a second ago; rank 0's own status has not arrived yet.
    let d = w.step(&[pod(0, 0, "Running"), exited_at(1, 0, 70, NOW - 1)]);
    assert_eq!(d.status.restarts, Some(0));
    assert_eq!(d.status.run_attempt, Some(0));
    assert!(d.delete_pods.is_empty() && !d.ensure_gang);
    assert_eq!(
        d.requeue_after,
        Some(Duration::from_secs(PEER_EXIT_SETTLE_SECONDS as u64 - 1))
    );
    // Then rank 0's permanent failure arrives: it wins.
    w.now = NOW + 2;
    let d = w.step(&[exited_at(0, 0, 78, NOW), exited_at(1, 0, 70, NOW - 1)]);
    assert_eq!(d.status.phase, Some(JobPhase::Failed));
    assert_eq!(
        d.status.condition(condition::FAILED).unwrap().reason,
        reason::PERMANENT_FAILURE
    );
    assert_eq!(d.status.restarts, Some(0));
}

#[test]
fn permanent_exit_arriving_after_the_restart_was_decided_fails_the_job() {
    let mut w = World::new(2);
    w.step(&[]);
    w.step(&running_gang(2, 0));
    // The peer's 70 is old news (past the settle window): the restart goes ahead.
    w.now = NOW + PEER_EXIT_SETTLE_SECONDS + 5;
    let d = w.step(&[pod(0, 0, "Running"), exited_at(1, 0, 70, NOW)]);
    assert_eq!(d.status.phase, Some(JobPhase::Restarting));
    assert_eq!(d.status.restarts, Some(1));
    // Rank 0 had failed by itself with 78 before its deletion: the job fails.
    w.now += 1;
    let d = w.step(&[exited_at(0, 0, 78, NOW + 1), exited_at(1, 0, 70, NOW)]);
    assert_eq!(d.status.phase, Some(JobPhase::Failed));
    assert_eq!(
        d.status.condition(condition::FAILED).unwrap().reason,
        reason::PERMANENT_FAILURE
    );
    assert!(!d.ensure_gang);
}

#[test]
fn permanent_code_from_a_pod_stopped_by_the_restart_does_not_fail_the_job() {
    let mut w = World::new(2).policy(|p| p.permanent_exit_codes = vec![1]);
    w.status.run_attempt = Some(1);
    w.status.restarts = Some(1);
    // Deleted by the restart at NOW (grace 300 s), it then exited 1 while stopping.
    let stopped = deleting(exited_at(0, 0, 1, NOW + 10), NOW + 300);
    let d = w.step(&[stopped]);
    assert_eq!(d.status.phase, Some(JobPhase::Restarting));
}

#[test]
fn peer_exit_alone_is_retried_once_the_gang_has_settled() {
    let mut w = World::new(2);
    w.step(&[]);
    w.step(&running_gang(2, 0));
    // Just after the peer's exit its cause may still show up elsewhere: nothing is decided
    // yet, the job looks again when the gang has had time to settle.
    w.now = NOW + 5;
    let d = w.step(&[pod(0, 0, "Running"), exited_at(1, 0, 70, NOW)]);
    assert_eq!(
        d.status.phase,
        Some(JobPhase::Running),
        "{:?}",
        d.status.message
    );
    assert_eq!(d.status.restarts, Some(0));
    assert!(d.delete_pods.is_empty(), "{:?}", d.delete_pods);
    let left = PEER_EXIT_SETTLE_SECONDS - 5;
    assert_eq!(d.requeue_after, Some(Duration::from_secs(left as u64)));
    w.now = NOW + PEER_EXIT_SETTLE_SECONDS;
    let d = w.step(&[pod(0, 0, "Running"), exited_at(1, 0, 70, NOW)]);
    assert_eq!(d.status.phase, Some(JobPhase::Restarting));
    assert_eq!(d.status.restarts, Some(1));
    assert_eq!(reasons(&d), [reason::POD_FAILED, reason::RESTARTING]);
}

#[test]
fn disruptions_past_the_disruption_limit_fail_the_job() {
    let mut w = World::new(1).policy(|p| p.disruption_limit = 2);
    w.status.disruptions = Some(2);
    w.step(&[]);
    let mut evicted = exited(pod(0, 0, "Running"), 137);
    evicted.status.as_mut().unwrap().reason = Some("Evicted".into());
    let d = w.step(&[evicted]);
    assert_eq!(d.status.phase, Some(JobPhase::Failed));
    assert_eq!(
        d.status.condition(condition::FAILED).unwrap().reason,
        reason::DISRUPTION_LIMIT_EXCEEDED
    );
    assert_eq!(d.status.disruptions, Some(2));
}

#[test]
fn failure_after_a_new_checkpoint_does_not_use_the_backoff_limit() {
    let mut w = World::new(1);
    w.status.restarts = Some(3); // backoffLimit used up
    w.status.run_attempt = Some(3);
    w.status.attempt_checkpoint_iteration = Some(100);
    w.status.last_checkpoint = checkpoint(200);
    w.step(&[]);
    let d = w.step(&[exited(pod(0, 3, "Running"), 1)]);
    assert_eq!(d.status.phase, Some(JobPhase::Restarting));
    assert_eq!(
        (d.status.restarts, d.status.progress_restarts),
        (Some(3), Some(1))
    );
    assert_eq!(d.status.attempt_checkpoint_iteration, Some(200));
    assert!(
        d.events[1].note.contains("after progress"),
        "{}",
        d.events[1].note
    );
    // The next attempt fails before writing a newer checkpoint: no progress, budget gone.
    w.step(&[]);
    let d = w.step(&[exited(pod(0, 4, "Running"), 1)]);
    assert_eq!(d.status.phase, Some(JobPhase::Failed));
    assert_eq!(
        d.status.condition(condition::FAILED).unwrap().reason,
        reason::BACKOFF_LIMIT_EXCEEDED
    );
}

#[test]
fn first_failure_after_the_first_checkpoint_is_progress_and_hangs_count_alike() {
    let mut w = World::new(1).policy(|p| p.hang_timeout_seconds = Some(600));
    w.step(&[]);
    w.step(&running_gang(1, 0));
    w.status.last_checkpoint = checkpoint(50);
    w.now = NOW + 600;
    let d = w.step(&running_gang(1, 0));
    assert_eq!(reasons(&d), [reason::HUNG, reason::RESTARTING]);
    assert_eq!(
        (d.status.restarts, d.status.progress_restarts),
        (Some(0), Some(1))
    );
}

#[test]
fn failures_after_progress_past_their_limit_count_against_the_backoff_limit() {
    let mut w = World::new(1).policy(|p| p.progress_restart_limit = 1);
    w.status.progress_restarts = Some(1);
    w.status.run_attempt = Some(1);
    w.status.attempt_checkpoint_iteration = Some(100);
    w.status.last_checkpoint = checkpoint(200);
    w.step(&[]);
    let d = w.step(&[exited(pod(0, 1, "Running"), 1)]);
    assert_eq!(
        (d.status.restarts, d.status.progress_restarts),
        (Some(1), Some(1))
    );
}

#[test]
fn vanished_pod_restarts_the_running_gang_as_a_disruption() {
    let mut w = World::new(2);
    w.step(&[]);
    w.step(&running_gang(2, 0));
    // Rank 1's pod was force-deleted (or garbage-collected): it is simply gone.
    let d = w.step(&[pod(0, 0, "Running")]);
    assert!(!d.ensure_gang, "no replacement joins a running gang");
    assert_eq!(d.status.phase, Some(JobPhase::Restarting));
    assert_eq!(d.status.run_attempt, Some(1));
    assert_eq!(
        (d.status.restarts, d.status.disruptions),
        (Some(0), Some(1))
    );
    assert_eq!(d.delete_pods, ["j-a0-0"]);
    assert_eq!(reasons(&d), [reason::POD_VANISHED, reason::RESTARTING]);
}

#[test]
fn missing_pod_of_a_gang_that_never_ran_is_simply_created() {
    let mut w = World::new(2);
    w.now = 1010;
    w.step(&[]);
    let d = w.step(&[pod(0, 0, "Pending")]);
    assert!(d.ensure_gang);
    assert_eq!(d.status.phase, Some(JobPhase::Pending));
    assert_eq!(d.status.disruptions, None);
}

#[test]
fn pod_stuck_terminating_past_its_grace_period_is_force_deleted() {
    let mut w = World::new(1);
    w.status.run_attempt = Some(1);
    let within = deleting(pod(0, 0, "Running"), NOW - STUCK_TERMINATING_SECONDS + 1);
    let d = w.step(&[within]);
    assert!(d.force_delete_pods.is_empty());
    assert_eq!(d.status.phase, Some(JobPhase::Restarting));
    let stuck = deleting(pod(0, 0, "Running"), NOW - STUCK_TERMINATING_SECONDS);
    let d = w.step(&[stuck]);
    assert_eq!(d.force_delete_pods, ["j-a0-0"]);
    assert!(
        !d.ensure_gang,
        "the next gang waits until the pod is really gone"
    );
    assert_eq!(reasons(&d), [reason::FORCE_DELETING]);
}

#[test]
fn distill_job_whose_teacher_vanished_after_pinning_its_checkpoint_proceeds() {
    let mut w = World::new(1);
    w.teacher = Some(TeacherState::Ready {
        checkpoint: "/ckpt/big/final".into(),
    });
    w.step(&[]);
    // The teacher PretrainJob is deleted (its TTL) while the student trains.
    w.teacher = Some(TeacherState::Missing("big".into()));
    let d = w.step(&running_gang(1, 0));
    assert_eq!(d.status.phase, Some(JobPhase::Running));
    assert!(d.ensure_gang);
    assert_eq!(
        d.status.teacher_checkpoint.as_deref(),
        Some("/ckpt/big/final")
    );
    // A teacher recreated under the same name does not change the pinned checkpoint.
    w.teacher = Some(TeacherState::Waiting {
        name: "big".into(),
        phase: JobPhase::Running,
    });
    let d = w.step(&running_gang(1, 0));
    assert_eq!(d.status.phase, Some(JobPhase::Running));
    assert!(d.events.is_empty());
}

#[test]
fn job_whose_children_cannot_be_named_fails_as_invalid() {
    let mut w = World::new(1);
    w.invalid = Some("metadata.name \"7b\" must start with a letter".into());
    let d = w.step(&[]);
    assert!(!d.ensure_gang);
    assert_eq!(d.status.phase, Some(JobPhase::Failed));
    let failed = d.status.condition(condition::FAILED).unwrap();
    assert_eq!(failed.reason, reason::INVALID_JOB);
    assert!(failed.message.contains("7b"));
    assert_eq!(reasons(&d), [reason::INVALID_JOB]);
}

#[test]
fn transient_exit_codes_restart_the_gang() {
    // 75 (EX_TEMPFAIL: transient storage or I/O errors), 74 (EX_IOERR), 1, 137 (OOM kill).
    for code in [75, 74, 1, 137] {
        let mut w = World::new(1);
        w.step(&[]);
        let d = w.step(&[exited(pod(0, 0, "Running"), code)]);
        assert_eq!(d.status.phase, Some(JobPhase::Restarting), "code {code}");
        assert_eq!(d.status.restarts, Some(1));
    }
}

#[test]
fn a_non_finite_loss_rolls_back_to_the_last_checkpoint_up_to_the_limit() {
    let mut w = World::new(2).policy(|p| p.divergence_rollback_limit = 1);
    w.step(&[]);
    w.status.last_checkpoint = checkpoint(40);
    let d = w.step(&[exited(pod(0, 0, "Running"), 79), pod(1, 0, "Running")]);
    assert_eq!(d.status.phase, Some(JobPhase::Restarting));
    assert_eq!(reasons(&d), [reason::DIVERGED, reason::RESTARTING]);
    assert!(
        d.events[0].note.contains("iteration 40"),
        "{}",
        d.events[0].note
    );
    assert!(
        d.events[1].note.contains("divergence rollback 1/1"),
        "{}",
        d.events[1].note
    );
    assert_eq!(d.status.divergence_rollbacks, Some(1));
    assert_eq!(
        (d.status.restarts, d.status.progress_restarts),
        (Some(0), None)
    );
    assert_eq!(d.status.run_attempt, Some(1));
    assert_eq!(d.delete_pods, ["j-a0-0", "j-a0-1"]);
    // The peer's own 79, seen after the rollback began, is the same divergence.
    let d = w.step(&[exited(pod(1, 0, "Running"), 79)]);
    assert_eq!(d.status.phase, Some(JobPhase::Restarting));
    // The rolled-back attempt diverges again: the limit is reached.
    w.step(&[]);
    let d = w.step(&[exited(pod(0, 1, "Running"), 79), pod(1, 1, "Running")]);
    assert_eq!(d.status.phase, Some(JobPhase::Failed));
    let failed = d.status.condition(condition::FAILED).unwrap();
    assert_eq!(failed.reason, reason::DIVERGENCE_ROLLBACK_LIMIT_EXCEEDED);
    assert!(
        failed.message.contains("divergenceRollbackLimit 1"),
        "{}",
        failed.message
    );
}

#[test]
fn a_non_finite_loss_before_any_checkpoint_fails_even_with_rollback_on() {
    let mut w = World::new(1).policy(|p| p.divergence_rollback_limit = 3);
    w.step(&[]);
    let d = w.step(&[exited(pod(0, 0, "Running"), 79)]);
    assert_eq!(d.status.phase, Some(JobPhase::Failed));
    let failed = d.status.condition(condition::FAILED).unwrap();
    assert!(
        failed.message.contains("nothing to roll back to"),
        "{}",
        failed.message
    );
    assert_eq!(d.status.divergence_rollbacks, None);
}
