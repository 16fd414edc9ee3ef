//! The run policy as a pure function: from the job's spec and status and its observed pods to
//! the next status, the pods to delete, whether the gang should exist, and the events to emit.
//!
//! Crash safety rests on one ordering the controller keeps: the new status (attempt, restart
//! count) is written first, guarded by the job's resourceVersion, and only then are pods
//! deleted or created. Pods carry their attempt, so a decision replayed after a crash, or
//! made on a stale cache, finds old-attempt pods and deletes them rather than counting the
//! same failure twice.

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
    pub now: Timestamp,
}

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

    match facts.teacher.clone() {
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
        d.delete(
            stale
                .iter()
                .filter(|p| !p.terminating)
                .map(|p| p.name.clone()),
        );
        d.status.phase = Some(JobPhase::Restarting);
        d.status.message = Some(format!(
            "waiting for {} pod(s) of earlier attempts to terminate",
            stale.len()
        ));
        d.requeue_in(2);
        return d.finish();
    }

    if let Some(failure) = first_failure(&current, facts) {
        d.handle_failure(failure, &current);
        return d.finish();
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
    Hung(i64),
}

fn first_failure<'a>(current: &[&'a PodObservation], facts: &JobFacts<'_>) -> Option<Failure<'a>> {
    let policy = &facts.cluster.run_policy;
    let mut ranked: Vec<_> = current.to_vec();
    ranked.sort_by_key(|p| p.rank);
    for p in &ranked {
        if let PodState::Failed {
            exit_code: Some(code),
            ..
        } = p.state
            && policy.is_permanent_exit_code(code)
        {
            return Some(Failure::Permanent(p, code));
        }
    }
    if let Some(p) = ranked
        .iter()
        .find(|p| matches!(p.state, PodState::Failed { .. }))
    {
        return Some(Failure::Retryable(p));
    }
    if let Some(p) = ranked
        .iter()
        .find(|p| matches!(p.state, PodState::Disrupted { .. }))
    {
        let PodState::Disrupted { reason } = &p.state else {
            unreachable!()
        };
        return Some(Failure::Disrupted(p, reason.clone()));
    }
    let status = facts.status;
    if let (Some(limit), Some(JobPhase::Running)) = (policy.hang_timeout_seconds, status.phase) {
        let last = [&status.last_progress_time, &status.attempt_start_time]
            .into_iter()
            .flatten()
            .map(|t| t.0.as_second())
            .max();
        if let Some(last) = last {
            let quiet = facts.now.as_second() - last;
            if quiet >= limit {
                return Some(Failure::Hung(quiet));
            }
        }
    }
    None
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

/// The decision being built.
struct Step<'f> {
    facts: &'f JobFacts<'f>,
    status: JobStatus,
    ensure_gang: bool,
    delete_pods: Vec<String>,
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
            events: Vec::new(),
            requeue_secs: None,
            delete_job: false,
        }
    }

    fn finish(mut self) -> Decision {
        self.delete_pods.sort();
        self.delete_pods.dedup();
        Decision {
            status: self.status,
            ensure_gang: self.ensure_gang,
            delete_pods: self.delete_pods,
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
                self.status.run_attempt = Some(self.status.run_attempt.unwrap_or(0) + 1);
            }
        }
        self.status.phase = Some(JobPhase::Suspended);
        self.status.message = Some("suspended (cluster.runPolicy.suspend: true)".into());
        // The active deadline counts from the resume, as for a suspended batch Job.
        self.status.start_time = None;
        self.status.attempt_start_time = None;
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
        let restarts = self.status.restarts.unwrap_or(0);
        let all: Vec<PodObservation> = current.iter().map(|p| (*p).clone()).collect();
        match failure {
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
                let code = match p.state {
                    PodState::Failed {
                        exit_code: Some(c), ..
                    } => c.to_string(),
                    _ => "none".into(),
                };
                let note = format!("{} failed with exit code {code}", describe(p));
                self.event(true, reason::POD_FAILED, note.clone());
                if restarts >= policy.backoff_limit {
                    let msg = format!(
                        "{note}; backoffLimit {} reached after {restarts} restart(s)",
                        policy.backoff_limit
                    );
                    self.fail(reason::BACKOFF_LIMIT_EXCEEDED, msg, &all);
                } else {
                    self.restart(true, reason::POD_FAILED, note, current);
                }
            }
            Failure::Disrupted(p, why) => {
                let note = format!(
                    "{} was disrupted ({why}); this does not count against backoffLimit",
                    describe(p)
                );
                self.event(true, reason::POD_DISRUPTED, note.clone());
                self.restart(false, reason::POD_DISRUPTED, note, current);
            }
            Failure::Hung(quiet) => {
                let note = format!(
                    "no progress report for {quiet}s (cluster.runPolicy.hangTimeoutSeconds={})",
                    policy.hang_timeout_seconds.unwrap_or_default()
                );
                self.event(true, reason::HUNG, note.clone());
                if restarts >= policy.backoff_limit {
                    let msg = format!("{note}; backoffLimit {} reached", policy.backoff_limit);
                    self.fail(reason::BACKOFF_LIMIT_EXCEEDED, msg, &all);
                } else {
                    self.restart(true, reason::HUNG, note, current);
                }
            }
        }
    }

    /// Tears the gang down; the next attempt is created once every old pod is gone.
    fn restart(
        &mut self,
        counted: bool,
        why: &'static str,
        note: String,
        current: &[&PodObservation],
    ) {
        let attempt = self.status.run_attempt.unwrap_or(0) + 1;
        self.status.run_attempt = Some(attempt);
        let limit = self.facts.cluster.run_policy.backoff_limit;
        let progress = if counted {
            let r = self.status.restarts.unwrap_or(0) + 1;
            self.status.restarts = Some(r);
            format!("restart {r}/{limit}")
        } else {
            let d = self.status.disruptions.unwrap_or(0) + 1;
            self.status.disruptions = Some(d);
            format!("disruption {d}, not counted")
        };
        let msg = format!("restarting the gang as attempt {attempt} ({progress}): {note}");
        self.status.phase = Some(JobPhase::Restarting);
        self.status.message = Some(msg.clone());
        self.status.attempt_start_time = None;
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
            if let Some(limit) = cluster.run_policy.hang_timeout_seconds {
                self.requeue_in(limit);
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

#[cfg(test)]
mod tests;
