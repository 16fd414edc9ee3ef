//! The run policy as a pure function: from the job's spec and status and its observed pods to
//! the next status, the pods to delete, whether the gang should exist, and the events to emit.
//!
//! Crash safety rests on one ordering the controller keeps: the new status (attempt, restart
//! count) is written first, guarded by the job's resourceVersion, and only then are pods
//! deleted or created. Pods carry their attempt, so a decision replayed after a crash, or
//! made on a stale cache, finds old-attempt pods and deletes them rather than counting the
//! same failure twice.
//!
//! Budgets: a retryable failure after a new verified checkpoint (progress since the gang last
//! started) uses `progressRestartLimit`, one without progress (or past that limit) uses
//! `backoffLimit`, a disruption (eviction, preemption, node loss, a pod deleted or vanished
//! from outside) uses `disruptionLimit`; the status counts each.

use std::collections::BTreeSet;
use std::time::Duration;

use dinoflow_api::cluster::{CleanPodPolicy, ClusterSpec};
use dinoflow_api::status::{JobPhase, JobStatus, PodCounts, condition};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use crate::job::JobRef;
use crate::observe::{PodObservation, PodState};

/// State of a DistillJob's teacher PretrainJob.
#[derive(Clone, Debug, PartialEq)]
pub enum TeacherState {
    /// No such PretrainJob (yet).
    Missing(String),
    /// The teacher exists but has not finished.
    Waiting { name: String, phase: JobPhase },
    /// The teacher failed (or left no checkpoint); the distillation can never start.
    Failed(String),
    /// The teacher succeeded; its final checkpoint.
    Ready { checkpoint: String },
}

/// Everything the decision depends on besides the pods.
#[derive(Clone, Debug)]
pub struct JobFacts<'a> {
    pub job: &'a JobRef,
    pub cluster: &'a ClusterSpec,
    pub status: &'a JobStatus,
    /// None for jobs that need no teacher.
    pub teacher: Option<TeacherState>,
    /// Why the job's children cannot be created whatever the operator does (its name cannot
    /// name a Service); the job fails with `InvalidJob`.
    pub invalid: Option<String>,
    /// When this operator replica started acting (its controllers and progress endpoint). No
    /// trainer can report while no operator listens, so hang detection counts from no earlier
    /// than this: an operator outage never makes a healthy gang look hung. None: unknown.
    pub operating_since: Option<Timestamp>,
    pub now: Timestamp,
}

/// How long, after a rank exited with a peer's code (70, 143) while others still run, the
/// decision waits for the gang to settle: the rank that caused it (a permanent 78, an
/// evicted pod) usually shows up within seconds, and deciding on the symptom first would
/// retry a permanent failure or charge a disruption to the budget.
pub const PEER_EXIT_SETTLE_SECONDS: i64 = 15;

/// How long past its deletion deadline (`deletionTimestamp`, the end of its grace period) a
/// pod may stay before it is force-deleted. A live kubelet kills the container at the
/// deadline and removes the pod within seconds; one still there a minute later is on a node
/// that is gone or unreachable, and only a force deletion lets the next attempt start.
pub const STUCK_TERMINATING_SECONDS: i64 = 60;

/// An event to record on the job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobEvent {
    pub warning: bool,
    pub reason: &'static str,
    pub note: String,
}

/// What the controller should do next.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// The status to write (controller-owned fields), before anything else happens.
    pub status: JobStatus,
    /// Create (apply) the Service, ConfigMap, Secret, PodGroup and pods of `status.runAttempt`.
    pub ensure_gang: bool,
    /// Pods to delete, by name.
    pub delete_pods: Vec<String>,
    /// Pods to delete at once (grace period 0): stuck terminating on a lost node.
    pub force_delete_pods: Vec<String>,
    pub events: Vec<JobEvent>,
    /// Look again after this long even if nothing changes (deadlines, timeouts, TTL).
    pub requeue_after: Option<Duration>,
    /// The TTL after finishing has passed: delete the job itself.
    pub delete_job: bool,
}

/// Reasons used in conditions and events.
pub mod reason {
    pub const GANG_CREATED: &str = "GangCreated";
    pub const ALL_PODS_RUNNING: &str = "AllPodsRunning";
    pub const PODS_PENDING: &str = "PodsPending";
    pub const PENDING_TIMEOUT: &str = "PendingTimeout";
    pub const POD_FAILED: &str = "PodFailed";
    pub const POD_DISRUPTED: &str = "PodDisrupted";
    pub const HUNG: &str = "NoProgress";
    pub const RESTARTING: &str = "RestartingGang";
    pub const WAITING_FOR_OLD_PODS: &str = "WaitingForOldPods";
    pub const PERMANENT_FAILURE: &str = "PermanentFailure";
    pub const BACKOFF_LIMIT_EXCEEDED: &str = "BackoffLimitExceeded";
    pub const DISRUPTION_LIMIT_EXCEEDED: &str = "DisruptionLimitExceeded";
    pub const DIVERGED: &str = "DivergenceRollback";
    pub const DIVERGENCE_ROLLBACK_LIMIT_EXCEEDED: &str = "DivergenceRollbackLimitExceeded";
    pub const POD_VANISHED: &str = "PodVanished";
    pub const FORCE_DELETING: &str = "ForceDeletingStuckPods";
    pub const INVALID_JOB: &str = "InvalidJob";
    pub const DEADLINE_EXCEEDED: &str = "DeadlineExceeded";
    pub const SUCCEEDED: &str = "Completed";
    pub const SUSPENDED: &str = "Suspended";
    pub const RESUMED: &str = "Resumed";
    pub const WAITING_FOR_TEACHER: &str = "TeacherNotSucceeded";
    pub const TEACHER_READY: &str = "TeacherSucceeded";
    pub const TEACHER_FAILED: &str = "TeacherFailed";
    pub const TTL_EXPIRED: &str = "TTLExpired";
}

/// Decides the next step for a job given its pods (of any attempt).
pub fn decide(facts: &JobFacts<'_>, pods: &[PodObservation]) -> Decision {
    let mut d = Step::new(facts);
    let attempt = d.status.run_attempt.unwrap_or(0);
    let (current, stale): (Vec<_>, Vec<_>) = pods.iter().partition(|p| p.attempt == Some(attempt));
    d.status.pods = Some(count(&current, facts.cluster.nodes));
    let policy = &facts.cluster.run_policy;

    // Pods of a later attempt than the status knows mean this view of the job is older than
    // the pod cache: act on nothing, look again once the job's watch catches up.
    if pods.iter().any(|p| p.attempt.is_some_and(|a| a > attempt)) {
        d.requeue_in(1);
        return d.finish();
    }

    // A finished job only has its pods cleaned up and, after its TTL, is deleted.
    if d.status.phase().is_finished() {
        d.cleanup(pods);
        d.ttl();
        return d.finish();
    }

    if let Some(why) = &facts.invalid {
        d.fail(reason::INVALID_JOB, why.clone(), pods);
        return d.finish();
    }

    if policy.suspend {
        d.suspend(pods, !current.is_empty());
        return d.finish();
    }
    if d.status.is_true(condition::SUSPENDED) {
        d.set(
            condition::SUSPENDED,
            false,
            reason::RESUMED,
            "resumed; recreating the gang",
        );
        d.event(
            false,
            reason::RESUMED,
            "job resumed; the gang resumes from the last checkpoint",
        );
    }

    // Once pinned, the teacher's checkpoint is all the job needs: the teacher job may be gone
    // (its TTL) or replaced, and every restart must distil from the same checkpoint anyway.
    let teacher = match (facts.teacher.clone(), &d.status.teacher_checkpoint) {
        (Some(_), Some(pinned)) => Some(TeacherState::Ready {
            checkpoint: pinned.clone(),
        }),
        (teacher, _) => teacher,
    };
    match teacher {
        None => {}
        Some(TeacherState::Ready { checkpoint }) => {
            if d.status.is_true(condition::WAITING_FOR_TEACHER) {
                d.event(
                    false,
                    reason::TEACHER_READY,
                    format!("teacher succeeded; using {checkpoint}"),
                );
            }
            d.set(
                condition::WAITING_FOR_TEACHER,
                false,
                reason::TEACHER_READY,
                &checkpoint,
            );
            // Keep the checkpoint the first attempt used, so every restart distils from the same teacher.
            d.status.teacher_checkpoint.get_or_insert(checkpoint);
        }
        Some(TeacherState::Failed(message)) => {
            d.fail(reason::TEACHER_FAILED, message, pods);
            return d.finish();
        }
        Some(TeacherState::Missing(name)) => {
            d.wait_for_teacher(format!(
                "waiting for teacher PretrainJob {name}, which does not exist yet"
            ));
            return d.finish();
        }
        Some(TeacherState::Waiting { name, phase }) => {
            d.wait_for_teacher(format!(
                "waiting for teacher PretrainJob {name} to succeed (now {})",
                phase.as_str()
            ));
            return d.finish();
        }
    }

    if let (Some(limit), Some(start)) = (policy.active_deadline_seconds, &d.status.start_time) {
        let elapsed = facts.now.as_second() - start.0.as_second();
        if elapsed >= limit {
            let note =
                format!("job ran {elapsed}s, past cluster.runPolicy.activeDeadlineSeconds={limit}");
            d.fail(reason::DEADLINE_EXCEEDED, note, pods);
            return d.finish();
        }
        d.requeue_in(limit - elapsed);
    }

    // Old attempts must be gone before the next gang starts: two gangs writing the same
    // checkpoint directory, or a dying rank answering a new rendezvous, corrupts the run.
    if !stale.is_empty() {
        // A rank's own permanent failure seen only after the restart was decided (its status
        // came after a peer's 70): the job fails, whatever order the exits arrived in.
        if let Some((p, code)) = stale.iter().find_map(|p| failed_by_itself(p, facts)) {
            let note = format!(
                "{} exited with permanent failure code {code} (seen after the gang restart began); not restarting",
                describe(p)
            );
            d.fail(reason::PERMANENT_FAILURE, note, pods);
            return d.finish();
        }
        d.delete(
            stale
                .iter()
                .filter(|p| !p.terminating)
                .map(|p| p.name.clone()),
        );
        d.force_delete_stuck(&stale);
        d.status.phase = Some(JobPhase::Restarting);
        d.status.message = Some(format!(
            "waiting for {} pod(s) of earlier attempts to terminate",
            stale.len()
        ));
        d.requeue_in(2);
        return d.finish();
    }

    match first_failure(&current, facts) {
        Verdict::Healthy => {}
        Verdict::Failed(failure) => {
            d.handle_failure(failure, &current);
            return d.finish();
        }
        Verdict::Settling { pod, wait } => {
            d.status.message = Some(format!(
                "{} exited with code {} (a peer's failure); waiting up to {wait}s for the rest of the gang to show the cause",
                describe(pod),
                pod.state.exit_code().unwrap_or_default()
            ));
            d.requeue_in(wait);
            return d.finish();
        }
    }

    let succeeded = current
        .iter()
        .filter(|p| p.state == PodState::Succeeded)
        .count() as i32;
    if succeeded == facts.cluster.nodes {
        d.succeed();
        d.cleanup(pods);
        d.ttl();
        return d.finish();
    }

    d.ensure_gang(&current);
    d.finish()
}

/// Why the current gang cannot go on.
enum Failure<'a> {
    Permanent(&'a PodObservation, i32),
    Retryable(&'a PodObservation),
    Disrupted(&'a PodObservation, String),
    /// Ranks whose pods vanished from a gang that had been running.
    Vanished(Vec<i32>),
    Hung(i64),
}

/// What the current gang's pods say.
enum Verdict<'a> {
    Healthy,
    Failed(Failure<'a>),
    /// Only peers' exit codes so far, and ranks still running: look again in `wait` seconds.
    Settling {
        pod: &'a PodObservation,
        wait: i64,
    },
}

/// Classifies the current gang the same way whatever order its pods' states arrived in: a
/// permanent exit wins over everything, a rank's own retryable failure over a disruption, and
/// a disruption over the peers' exits (70, 143) it caused.
fn first_failure<'a>(current: &[&'a PodObservation], facts: &JobFacts<'_>) -> Verdict<'a> {
    let policy = &facts.cluster.run_policy;
    let mut ranked: Vec<_> = current.to_vec();
    ranked.sort_by_key(|p| p.rank);
    for p in &ranked {
        if let Some(code) = p.state.exit_code()
            && policy.is_permanent_exit_code(code)
        {
            return Verdict::Failed(Failure::Permanent(p, code));
        }
    }
    let failed: Vec<_> = ranked
        .iter()
        .copied()
        .filter(|p| matches!(p.state, PodState::Failed { .. }))
        .collect();
    if let Some(p) = failed.iter().copied().find(|p| !p.state.is_peer_exit()) {
        return Verdict::Failed(Failure::Retryable(p));
    }
    if let Some((p, reason)) = ranked.iter().find_map(|p| match &p.state {
        PodState::Disrupted { reason } => Some((*p, reason.clone())),
        _ => None,
    }) {
        return Verdict::Failed(Failure::Disrupted(p, reason));
    }
    if let Some(&first) = failed.first() {
        let active = ranked
            .iter()
            .any(|p| matches!(p.state, PodState::Running | PodState::Pending));
        let since = failed
            .iter()
            .filter_map(|p| p.finished)
            .map(|t| facts.now.as_second() - t.as_second())
            .max();
        if let (true, Some(since)) = (active, since)
            && since < PEER_EXIT_SETTLE_SECONDS
        {
            return Verdict::Settling {
                pod: first,
                wait: PEER_EXIT_SETTLE_SECONDS - since,
            };
        }
        return Verdict::Failed(Failure::Retryable(first));
    }
    let status = facts.status;
    // A pod missing from a gang that has run was force-deleted or garbage-collected: a
    // replacement would wait alone at the rendezvous the others left long ago.
    let has_run = status.attempt_running_time.is_some() || status.phase == Some(JobPhase::Running);
    if has_run {
        let present: BTreeSet<i32> = current.iter().filter_map(|p| p.rank).collect();
        let missing: Vec<i32> = (0..facts.cluster.nodes)
            .filter(|r| !present.contains(r))
            .collect();
        if !missing.is_empty() {
            return Verdict::Failed(Failure::Vanished(missing));
        }
    }
    if let (Some(limit), Some(JobPhase::Running)) = (policy.hang_timeout_seconds, status.phase)
        && let Some(since) = hang_clock(status, facts.operating_since)
    {
        let quiet = facts.now.as_second() - since;
        if quiet >= limit {
            return Verdict::Failed(Failure::Hung(quiet));
        }
    }
    Verdict::Healthy
}

/// Second from which a running gang's silence counts: the latest of when it was first seen
/// running, its last progress report, and when this operator started listening.
fn hang_clock(status: &JobStatus, operating_since: Option<Timestamp>) -> Option<i64> {
    [&status.attempt_running_time, &status.last_progress_time]
        .into_iter()
        .flatten()
        .map(|t| t.0)
        .chain(operating_since)
        .map(|t| t.as_second())
        .max()
}

/// A stale pod's permanent exit code, if the trainer failed by itself rather than while
/// being stopped (a pod deleted by the restart may exit with anything).
fn failed_by_itself<'a>(
    p: &'a PodObservation,
    facts: &JobFacts<'_>,
) -> Option<(&'a PodObservation, i32)> {
    let code = p.state.exit_code()?;
    let policy = &facts.cluster.run_policy;
    if !policy.is_permanent_exit_code(code)
        || divergence::rolled_back(code, policy.divergence_rollback_limit)
    {
        return None;
    }
    let stopped_at = p
        .deletion_deadline
        .map(|t| t.as_second() - facts.cluster.termination_grace_period_seconds);
    let by_itself = match (stopped_at, p.finished) {
        (None, _) => true,
        (Some(stopped), Some(finished)) => finished.as_second() < stopped,
        (Some(_), None) => false,
    };
    by_itself.then_some((p, code))
}

fn count(current: &[&PodObservation], expected: i32) -> PodCounts {
    let mut c = PodCounts {
        expected,
        ..Default::default()
    };
    for p in current {
        match p.state {
            PodState::Pending => c.pending += 1,
            PodState::Running => c.running += 1,
            PodState::Succeeded => c.succeeded += 1,
            PodState::Failed { .. } | PodState::Disrupted { .. } => c.failed += 1,
        }
    }
    c
}

fn describe(p: &PodObservation) -> String {
    let rank = p.rank.map_or_else(|| "?".into(), |r| r.to_string());
    let node = p.node.as_deref().unwrap_or("no node");
    format!("pod {} (rank {rank}) on {node}", p.name)
}

/// Which budget a restart uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Budget {
    /// A failure without progress: `backoffLimit`, counted in `restarts`.
    Backoff,
    /// A failure after a new checkpoint: `progressRestartLimit`, in `progressRestarts`.
    Progress,
    /// Not the trainer's fault: `disruptionLimit`, in `disruptions`.
    Disruption,
    /// A non-finite loss rolled back: `divergenceRollbackLimit`, in `divergenceRollbacks`.
    Divergence,
}

/// The decision being built.
struct Step<'f> {
    facts: &'f JobFacts<'f>,
    status: JobStatus,
    ensure_gang: bool,
    delete_pods: Vec<String>,
    force_delete_pods: Vec<String>,
    events: Vec<JobEvent>,
    requeue_secs: Option<i64>,
    delete_job: bool,
}

impl<'f> Step<'f> {
    fn new(facts: &'f JobFacts<'f>) -> Self {
        let mut status = facts.status.clone();
        status.observed_generation = facts.job.generation;
        status.run_attempt = Some(status.run_attempt.unwrap_or(0));
        status.restarts = Some(status.restarts.unwrap_or(0));
        Self {
            facts,
            status,
            ensure_gang: false,
            delete_pods: Vec::new(),
            force_delete_pods: Vec::new(),
            events: Vec::new(),
            requeue_secs: None,
            delete_job: false,
        }
    }

    fn finish(mut self) -> Decision {
        self.delete_pods.sort();
        self.delete_pods.dedup();
        self.force_delete_pods.sort();
        self.force_delete_pods.dedup();
        Decision {
            status: self.status,
            ensure_gang: self.ensure_gang,
            delete_pods: self.delete_pods,
            force_delete_pods: self.force_delete_pods,
            events: self.events,
            requeue_after: self
                .requeue_secs
                .map(|s| Duration::from_secs(s.max(1) as u64)),
            delete_job: self.delete_job,
        }
    }

    fn now(&self) -> Time {
        Time(self.facts.now)
    }

    fn set(&mut self, type_: &str, value: bool, reason: &str, message: impl Into<String>) {
        let now = self.now();
        self.status.set_condition(
            type_,
            value,
            reason,
            message,
            now,
            self.facts.job.generation,
        );
    }

    fn event(&mut self, warning: bool, reason: &'static str, note: impl Into<String>) {
        self.events.push(JobEvent {
            warning,
            reason,
            note: note.into(),
        });
    }

    fn requeue_in(&mut self, secs: i64) {
        self.requeue_secs = Some(self.requeue_secs.map_or(secs, |s| s.min(secs)));
    }

    fn delete(&mut self, names: impl IntoIterator<Item = String>) {
        self.delete_pods.extend(names);
    }

    /// Force-deletes pods stuck terminating well past their deadline (a lost node's).
    fn force_delete_stuck(&mut self, pods: &[&PodObservation]) {
        let now = self.facts.now.as_second();
        let stuck: Vec<&PodObservation> = pods
            .iter()
            .copied()
            .filter(|p| {
                p.deletion_deadline
                    .is_some_and(|t| now - t.as_second() >= STUCK_TERMINATING_SECONDS)
            })
            .collect();
        if stuck.is_empty() {
            return;
        }
        let names: Vec<String> = stuck.iter().map(|p| p.name.clone()).collect();
        let note = format!(
            "force-deleting {} still terminating {STUCK_TERMINATING_SECONDS}s after its grace period ended (its node is gone or unreachable)",
            stuck
                .iter()
                .map(|p| describe(p))
                .collect::<Vec<_>>()
                .join(", ")
        );
        self.event(true, reason::FORCE_DELETING, note);
        self.force_delete_pods.extend(names);
    }

    /// The run made progress since the gang last started: a newer verified checkpoint.
    fn made_progress(&self) -> bool {
        let newest = self.status.last_checkpoint.as_ref().map(|c| c.iteration);
        match (newest, self.status.attempt_checkpoint_iteration) {
            (Some(newest), Some(start)) => newest > start,
            (Some(_), None) => true,
            (None, _) => false,
        }
    }

    /// A new attempt starts: what it starts from.
    fn begin_attempt(&mut self, attempt: i32) {
        self.status.run_attempt = Some(attempt);
        self.status.attempt_start_time = None;
        self.status.attempt_running_time = None;
        self.status.attempt_checkpoint_iteration =
            self.status.last_checkpoint.as_ref().map(|c| c.iteration);
    }

    fn phase_changes_to(&self, phase: JobPhase) -> bool {
        self.facts.status.phase != Some(phase)
    }

    fn suspend(&mut self, pods: &[PodObservation], gang_exists: bool) {
        self.delete(
            pods.iter()
                .filter(|p| !p.terminating)
                .map(|p| p.name.clone()),
        );
        if self.phase_changes_to(JobPhase::Suspended) {
            let n = pods.len();
            self.event(
                false,
                reason::SUSPENDED,
                format!("job suspended; deleting {n} pod(s)"),
            );
            if gang_exists || self.status.attempt_start_time.is_some() {
                // The resumed gang is a new attempt, so the suspended pods count as stale.
                self.begin_attempt(self.status.run_attempt.unwrap_or(0) + 1);
            }
        }
        self.status.phase = Some(JobPhase::Suspended);
        self.status.message = Some("suspended (cluster.runPolicy.suspend: true)".into());
        // The active deadline counts from the resume, as for a suspended batch Job.
        self.status.start_time = None;
        self.status.attempt_start_time = None;
        self.status.attempt_running_time = None;
        self.set(
            condition::SUSPENDED,
            true,
            reason::SUSPENDED,
            "cluster.runPolicy.suspend is true",
        );
        self.set(
            condition::RUNNING,
            false,
            reason::SUSPENDED,
            "the job is suspended",
        );
    }

    fn wait_for_teacher(&mut self, message: String) {
        if self.phase_changes_to(JobPhase::WaitingForTeacher) {
            self.event(false, reason::WAITING_FOR_TEACHER, message.clone());
        }
        self.status.phase = Some(JobPhase::WaitingForTeacher);
        self.status.message = Some(message.clone());
        self.set(
            condition::WAITING_FOR_TEACHER,
            true,
            reason::WAITING_FOR_TEACHER,
            message,
        );
        // The teacher's own changes trigger a reconcile; this is a safety net.
        self.requeue_in(60);
    }

    fn fail(&mut self, reason: &'static str, message: String, pods: &[PodObservation]) {
        self.status.phase = Some(JobPhase::Failed);
        self.status.message = Some(message.clone());
        self.status.completion_time = Some(self.now());
        self.set(condition::FAILED, true, reason, message.clone());
        self.set(condition::RUNNING, false, reason, "the job failed");
        if self.status.is_true(condition::RESTARTING) {
            self.set(condition::RESTARTING, false, reason, "the job failed");
        }
        self.event(true, reason, message);
        self.cleanup(pods);
        self.ttl();
    }

    fn succeed(&mut self) {
        let nodes = self.facts.cluster.nodes;
        self.status.phase = Some(JobPhase::Succeeded);
        self.status.message = Some(format!("all {nodes} pod(s) exited 0"));
        self.status.completion_time = Some(self.now());
        self.set(
            condition::SUCCEEDED,
            true,
            reason::SUCCEEDED,
            format!("all {nodes} pod(s) exited 0"),
        );
        self.set(
            condition::RUNNING,
            false,
            reason::SUCCEEDED,
            "training finished",
        );
        self.event(
            false,
            reason::SUCCEEDED,
            "training finished; all pods exited 0",
        );
    }

    /// Deletes the pods the clean-pod policy selects once the job has finished.
    fn cleanup(&mut self, pods: &[PodObservation]) {
        let policy = self.facts.cluster.run_policy.clean_pod_policy;
        let doomed = pods
            .iter()
            .filter(|p| !p.terminating)
            .filter(|p| match policy {
                CleanPodPolicy::None => false,
                CleanPodPolicy::All => true,
                // Stragglers would hang on NCCL forever; finished pods keep their logs.
                CleanPodPolicy::Running => matches!(p.state, PodState::Running | PodState::Pending),
            });
        let names: Vec<_> = doomed.map(|p| p.name.clone()).collect();
        self.delete(names);
    }

    fn ttl(&mut self) {
        let (Some(ttl), Some(done)) = (
            self.facts.cluster.run_policy.ttl_seconds_after_finished,
            &self.status.completion_time,
        ) else {
            return;
        };
        let left = done.0.as_second() + i64::from(ttl) - self.facts.now.as_second();
        if left <= 0 {
            self.delete_job = true;
            self.event(
                false,
                reason::TTL_EXPIRED,
                format!("deleting the job {ttl}s after it finished"),
            );
        } else {
            self.requeue_in(left);
        }
    }

    fn handle_failure(&mut self, failure: Failure<'_>, current: &[&PodObservation]) {
        let facts = self.facts;
        let policy = &facts.cluster.run_policy;
        let all: Vec<PodObservation> = current.iter().map(|p| (*p).clone()).collect();
        match failure {
            Failure::Permanent(p, code) if self.roll_back(p, code, current, &all) => {}
            Failure::Permanent(p, code) => {
                let why = match &p.state {
                    PodState::Failed {
                        message: Some(m), ..
                    } => format!(": {m}"),
                    _ => String::new(),
                };
                let note = format!(
                    "{} exited with permanent failure code {code}{why}; not restarting",
                    describe(p)
                );
                self.fail(reason::PERMANENT_FAILURE, note, &all);
            }
            Failure::Retryable(p) => {
                let code = p
                    .state
                    .exit_code()
                    .map_or_else(|| "none".into(), |c| c.to_string());
                let note = format!("{} failed with exit code {code}", describe(p));
                self.event(true, reason::POD_FAILED, note.clone());
                self.retry(reason::POD_FAILED, note, current, &all);
            }
            Failure::Disrupted(p, why) => {
                let note = format!(
                    "{} was disrupted ({why}); this does not count against backoffLimit",
                    describe(p)
                );
                self.event(true, reason::POD_DISRUPTED, note.clone());
                self.disrupt(reason::POD_DISRUPTED, note, current, &all);
            }
            Failure::Vanished(ranks) => {
                let ranks: Vec<String> = ranks.iter().map(|r| r.to_string()).collect();
                let note = format!(
                    "the pod(s) of rank(s) {} vanished from the running gang (deleted at once or garbage-collected); restarting the whole gang, which does not count against backoffLimit",
                    ranks.join(", ")
                );
                self.event(true, reason::POD_VANISHED, note.clone());
                self.disrupt(reason::POD_VANISHED, note, current, &all);
            }
            Failure::Hung(quiet) => {
                let note = format!(
                    "no progress report for {quiet}s (cluster.runPolicy.hangTimeoutSeconds={})",
                    policy.hang_timeout_seconds.unwrap_or_default()
                );
                self.event(true, reason::HUNG, note.clone());
                self.retry(reason::HUNG, note, current, &all);
            }
        }
    }

    /// A retryable failure: restarts after progress use their own budget; the rest (and
    /// those past it) use backoffLimit.
    fn retry(
        &mut self,
        why: &'static str,
        note: String,
        current: &[&PodObservation],
        all: &[PodObservation],
    ) {
        let facts = self.facts;
        let policy = &facts.cluster.run_policy;
        let after_progress = self.status.progress_restarts.unwrap_or(0);
        if self.made_progress() && after_progress < policy.progress_restart_limit {
            return self.restart(Budget::Progress, why, note, current);
        }
        let restarts = self.status.restarts.unwrap_or(0);
        if restarts >= policy.backoff_limit {
            let msg = format!(
                "{note}; backoffLimit {} reached after {restarts} restart(s) without progress",
                policy.backoff_limit
            );
            self.fail(reason::BACKOFF_LIMIT_EXCEEDED, msg, all);
        } else {
            self.restart(Budget::Backoff, why, note, current);
        }
    }

    /// A disruption: restarts without using backoffLimit, up to disruptionLimit.
    fn disrupt(
        &mut self,
        why: &'static str,
        note: String,
        current: &[&PodObservation],
        all: &[PodObservation],
    ) {
        let limit = self.facts.cluster.run_policy.disruption_limit;
        let disruptions = self.status.disruptions.unwrap_or(0);
        if disruptions >= limit {
            let msg = format!(
                "{note}; cluster.runPolicy.disruptionLimit {limit} reached after {disruptions} disruption(s)"
            );
            self.fail(reason::DISRUPTION_LIMIT_EXCEEDED, msg, all);
        } else {
            self.restart(Budget::Disruption, why, note, current);
        }
    }

    /// Tears the gang down; the next attempt is created once every old pod is gone.
    fn restart(
        &mut self,
        budget: Budget,
        why: &'static str,
        note: String,
        current: &[&PodObservation],
    ) {
        let attempt = self.status.run_attempt.unwrap_or(0) + 1;
        let facts = self.facts;
        let policy = &facts.cluster.run_policy;
        let progress = match budget {
            Budget::Backoff => {
                let r = self.status.restarts.unwrap_or(0) + 1;
                self.status.restarts = Some(r);
                format!("restart {r}/{}", policy.backoff_limit)
            }
            Budget::Progress => {
                let r = self.status.progress_restarts.unwrap_or(0) + 1;
                self.status.progress_restarts = Some(r);
                let at = self
                    .status
                    .last_checkpoint
                    .as_ref()
                    .map_or(0, |c| c.iteration);
                format!(
                    "restart {r}/{} after progress to the checkpoint of iteration {at}, not counted against backoffLimit",
                    policy.progress_restart_limit
                )
            }
            Budget::Disruption => {
                let d = self.status.disruptions.unwrap_or(0) + 1;
                self.status.disruptions = Some(d);
                format!("disruption {d}/{}, not counted", policy.disruption_limit)
            }
            Budget::Divergence => {
                let d = self.status.divergence_rollbacks.unwrap_or(0) + 1;
                self.status.divergence_rollbacks = Some(d);
                format!(
                    "divergence rollback {d}/{}, not counted against backoffLimit",
                    policy.divergence_rollback_limit
                )
            }
        };
        self.begin_attempt(attempt);
        let msg = format!("restarting the gang as attempt {attempt} ({progress}): {note}");
        self.status.phase = Some(JobPhase::Restarting);
        self.status.message = Some(msg.clone());
        self.set(condition::RESTARTING, true, why, msg.clone());
        self.set(condition::RUNNING, false, why, "the gang is restarting");
        self.set(
            condition::CREATED,
            false,
            reason::RESTARTING,
            format!("attempt {attempt} not created yet"),
        );
        self.event(true, reason::RESTARTING, msg);
        self.delete(
            current
                .iter()
                .filter(|p| !p.terminating)
                .map(|p| p.name.clone()),
        );
        self.requeue_in(1);
    }

    fn ensure_gang(&mut self, current: &[&PodObservation]) {
        self.ensure_gang = true;
        let cluster = self.facts.cluster;
        let attempt = self.status.run_attempt.unwrap_or(0);
        if self.status.attempt_start_time.is_none() {
            self.status.attempt_start_time = Some(self.now());
            let n = cluster.nodes;
            self.event(
                false,
                reason::GANG_CREATED,
                format!("created the gang: {n} pod(s) for attempt {attempt}"),
            );
        }
        if self.status.start_time.is_none() {
            self.status.start_time = Some(self.now());
        }
        self.set(
            condition::CREATED,
            true,
            reason::GANG_CREATED,
            format!("{} pod(s) for attempt {attempt}", cluster.nodes),
        );

        let running = current
            .iter()
            .filter(|p| p.state == PodState::Running)
            .count() as i32;
        let done = current
            .iter()
            .filter(|p| p.state == PodState::Succeeded)
            .count() as i32;
        if running > 0 && running + done == cluster.nodes {
            if self.phase_changes_to(JobPhase::Running) {
                self.event(
                    false,
                    reason::ALL_PODS_RUNNING,
                    format!("all {} pod(s) of attempt {attempt} running", cluster.nodes),
                );
            }
            self.status.phase = Some(JobPhase::Running);
            self.status.message = Some(format!("{running} pod(s) running"));
            if self.status.attempt_running_time.is_none() {
                self.status.attempt_running_time = Some(self.now());
            }
            self.set(
                condition::RUNNING,
                true,
                reason::ALL_PODS_RUNNING,
                format!("{running}/{} pod(s) running", cluster.nodes),
            );
            if self.status.is_true(condition::RESTARTING) {
                self.set(
                    condition::RESTARTING,
                    false,
                    reason::ALL_PODS_RUNNING,
                    format!("attempt {attempt} running"),
                );
            }
            if let (Some(limit), Some(since)) = (
                cluster.run_policy.hang_timeout_seconds,
                hang_clock(&self.status, self.facts.operating_since),
            ) {
                self.requeue_in(since + limit - self.facts.now.as_second());
            }
            return;
        }

        self.status.phase = Some(JobPhase::Pending);
        let waiting = cluster.nodes - running - done;
        let oldest = current
            .iter()
            .filter_map(|p| p.created)
            .map(|t| t.as_second())
            .min();
        let timeout = cluster.run_policy.pending_timeout_seconds;
        let overdue = oldest
            .map(|t| self.facts.now.as_second() - t)
            .filter(|age| *age >= timeout);
        match overdue {
            Some(age) => {
                let why = current
                    .iter()
                    .find_map(|p| p.unschedulable.clone())
                    .unwrap_or_else(|| {
                        "pods not running yet (image pull or initialisation)".into()
                    });
                let msg = format!(
                    "{waiting} pod(s) pending for {age}s (cluster.runPolicy.pendingTimeoutSeconds={timeout}): {why}"
                );
                let already = self
                    .facts
                    .status
                    .condition(condition::RUNNING)
                    .is_some_and(|c| c.reason == reason::PENDING_TIMEOUT);
                if !already {
                    self.event(true, reason::PENDING_TIMEOUT, msg.clone());
                }
                self.status.message = Some(msg.clone());
                self.set(condition::RUNNING, false, reason::PENDING_TIMEOUT, msg);
            }
            None => {
                let msg = format!("waiting for {waiting} pod(s) of attempt {attempt} to run");
                self.status.message = Some(msg.clone());
                self.set(condition::RUNNING, false, reason::PODS_PENDING, msg);
                let age = oldest.map_or(0, |t| self.facts.now.as_second() - t);
                self.requeue_in(timeout - age);
            }
        }
    }
}

mod divergence;
#[cfg(test)]
mod tests;
