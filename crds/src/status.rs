//! Status of PretrainJob and DistillJob.
//!
//! Two writers share it, each with its own server-side-apply field manager so neither erases
//! the other's fields: the controller (phase, conditions, restarts, pods, times) and the
//! progress endpoint (iteration, losses, checkpoints, evaluations), fed by the trainer.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use serde::{Deserialize, Serialize};

/// Condition types set on a job.
pub mod condition {
    /// The gang's objects (Service, ConfigMap, pods) were created for the current attempt.
    pub const CREATED: &str = "Created";
    /// Every pod of the gang is running.
    pub const RUNNING: &str = "Running";
    /// The gang is being torn down and recreated after a failure.
    pub const RESTARTING: &str = "Restarting";
    /// `spec.cluster.runPolicy.suspend` is set; the pods are gone, the job is kept.
    pub const SUSPENDED: &str = "Suspended";
    /// Training finished; every pod exited 0.
    pub const SUCCEEDED: &str = "Succeeded";
    /// The job failed for good (permanent exit code, backoff limit, deadline...).
    pub const FAILED: &str = "Failed";
    /// A DistillJob waits for its teacher PretrainJob to succeed.
    pub const WAITING_FOR_TEACHER: &str = "WaitingForTeacher";
    /// Whether the operator's last attempt to act on the job worked. Set to False (reason
    /// `ReconcileError`, the error as message) when acting failed; the operator retries with
    /// exponential backoff and sets it back to True once it succeeds. Absent until an error.
    pub const SYNCED: &str = "Synced";
}

/// Where the job is in its life; `kubectl get` shows it.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
pub enum JobPhase {
    /// Accepted; pods not all scheduled and running yet.
    #[default]
    Pending,
    /// A DistillJob waiting for its teacher.
    WaitingForTeacher,
    /// All pods running.
    Running,
    /// Tearing the gang down to start the next attempt.
    Restarting,
    /// Suspended by the user or a queue (Kueue).
    Suspended,
    Succeeded,
    Failed,
}

impl JobPhase {
    /// Succeeded and Failed are final: nothing is restarted any more.
    pub fn is_finished(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "Pending",
            Self::WaitingForTeacher => "WaitingForTeacher",
            Self::Running => "Running",
            Self::Restarting => "Restarting",
            Self::Suspended => "Suspended",
            Self::Succeeded => "Succeeded",
            Self::Failed => "Failed",
        }
    }

    /// Every phase, for metrics that report a gauge per phase.
    pub const ALL: [JobPhase; 7] = [
        Self::Pending,
        Self::WaitingForTeacher,
        Self::Running,
        Self::Restarting,
        Self::Suspended,
        Self::Succeeded,
        Self::Failed,
    ];
}

/// Observed status of a PretrainJob or DistillJob.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobStatus {
    // ---- written by the controller ----
    /// Latest observations of the job's state (Created, Running, Restarting, Suspended,
    /// Succeeded, Failed, WaitingForTeacher; Synced once the operator failed to act on it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,

    /// Phase of the job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<JobPhase>,

    /// Human-readable summary of the phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,

    /// `metadata.generation` the controller last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Current attempt (`DINOFLOW_RUN_ATTEMPT`), 0 for the first run; each gang restart adds 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_attempt: Option<i32>,

    /// Gang restarts counted against `runPolicy.backoffLimit`: after failures without
    /// progress (no new verified checkpoint since the gang last started; hangs included), and
    /// after failures with progress once `progressRestartLimit` is used up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restarts: Option<i32>,

    /// Gang restarts after failures that followed a new verified checkpoint (progress since
    /// the gang last started); they count against `runPolicy.progressRestartLimit`, not
    /// `backoffLimit`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress_restarts: Option<i32>,

    /// Gang restarts caused by disruptions (eviction, preemption, node loss, a pod deleted
    /// or vanished from outside); they count against `runPolicy.disruptionLimit` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disruptions: Option<i32>,

    /// Gang restarts after a non-finite loss (exit 79), each from the last verified
    /// checkpoint with the diverged data window skipped; they count against
    /// `runPolicy.divergenceRollbackLimit` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub divergence_rollbacks: Option<i32>,

    /// Iteration of the newest verified checkpoint (`lastCheckpoint`) when the current
    /// attempt started; a failure after a newer checkpoint is a failure with progress.
    /// Unset: the attempt started with no checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt_checkpoint_iteration: Option<i64>,

    /// Pods of the current attempt by state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<PodCounts>,

    /// When the job first started running (or resumed after a suspension); the
    /// active deadline counts from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,

    /// When the pods of the current attempt were created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt_start_time: Option<Time>,

    /// When every pod of the current attempt was first seen running. Hang detection counts
    /// from the latest of this, the last progress report and the operator's own start (it
    /// cannot receive reports while it is down), so scheduling and image pulls never count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt_running_time: Option<Time>,

    /// When the job succeeded or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,

    /// DistillJob: the teacher checkpoint the pods were given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teacher_checkpoint: Option<String>,

    // ---- written by the progress endpoint from the trainer's reports ----
    /// Latest training iteration reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iteration: Option<i64>,

    /// Iterations the run will take in total.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_iterations: Option<i64>,

    /// Current curriculum phase (resolution stage), if the config has a curriculum.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub curriculum_phase: Option<String>,

    /// Latest loss values by name (total, dino_local_crops, dino_global_crops, koleo, ibot).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub losses: BTreeMap<String, f64>,

    /// Latest learning rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub learning_rate: Option<f64>,

    /// Latest throughput of the whole gang.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub images_per_second: Option<f64>,

    /// Latest estimated model FLOPs utilisation (0..1); only when the trainer knows the
    /// device's peak FLOP/s (`DINOFLOW_PEAK_FLOPS`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mfu: Option<f64>,

    /// Latest checkpoint the trainer wrote and verified; a restart resumes from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_checkpoint: Option<CheckpointRef>,

    /// The checkpoint with the best value of `training.checkpoint.bestMetric` so far; the
    /// trainer keeps it on disk however old.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best_checkpoint: Option<BestCheckpointRef>,

    /// Latest result of each evaluation, by evaluation name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub evaluations: Vec<EvaluationResult>,

    /// Ranks (trainer processes, `WORLD_SIZE`) of the current run, as the trainer reported at
    /// its start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub world_size: Option<i32>,

    /// The last resume on another world size: the checkpoint's parameters and optimizer
    /// state were re-sliced for the new ranks and the data order continued at the global
    /// sample where it stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_reshard: Option<ReshardRef>,

    /// When the trainer last reported (any report, heartbeats included).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_progress_time: Option<Time>,
}

impl JobStatus {
    /// The condition of `type_`, if set.
    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.type_ == type_)
    }

    /// Whether the condition of `type_` is set to "True".
    pub fn is_true(&self, type_: &str) -> bool {
        self.condition(type_).is_some_and(|c| c.status == "True")
    }

    /// The phase, Pending when unset.
    pub fn phase(&self) -> JobPhase {
        self.phase.unwrap_or_default()
    }

    /// Sets a condition, keeping `lastTransitionTime` when its status does not change
    /// (the metav1 convention, so watchers see real transitions only).
    pub fn set_condition(
        &mut self,
        type_: &str,
        status: bool,
        reason: &str,
        message: impl Into<String>,
        now: Time,
        generation: Option<i64>,
    ) {
        let status = if status { "True" } else { "False" }.to_string();
        let message = message.into();
        match self.conditions.iter_mut().find(|c| c.type_ == type_) {
            Some(c) => {
                if c.status != status {
                    c.last_transition_time = now;
                }
                c.status = status;
                c.reason = reason.to_string();
                c.message = message;
                c.observed_generation = generation;
            }
            None => self.conditions.push(Condition {
                type_: type_.to_string(),
                status,
                reason: reason.to_string(),
                message,
                last_transition_time: now,
                observed_generation: generation,
            }),
        }
    }
}

/// Pods of the current attempt, by state.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub struct PodCounts {
    /// Pods the gang should have (cluster.nodes).
    pub expected: i32,
    /// Pods waiting to be scheduled or started.
    pub pending: i32,
    /// Pods running.
    pub running: i32,
    /// Pods that exited 0.
    pub succeeded: i32,
    /// Pods that failed.
    pub failed: i32,
}

/// A checkpoint written and verified by the trainer.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointRef {
    /// Iteration the checkpoint holds.
    pub iteration: i64,
    /// Directory of the checkpoint.
    pub path: String,
    /// When the operator received the report.
    pub time: Time,
}

/// A checkpoint resumed on another world size than the one that wrote it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReshardRef {
    /// Iteration of the checkpoint the run resumed from.
    pub iteration: i64,
    /// Directory of that checkpoint.
    pub path: String,
    /// Ranks that wrote it.
    pub from_world_size: i32,
    /// Ranks that resumed it.
    pub to_world_size: i32,
    /// When the operator received the report.
    pub time: Time,
}

/// The best checkpoint by an evaluation metric.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BestCheckpointRef {
    /// Iteration of the checkpoint (and of the evaluation that scored it).
    pub iteration: i64,
    /// Checkpoint directory.
    pub path: String,
    /// `training.checkpoint.bestMetric`.
    pub metric: String,
    /// Its value at that iteration.
    pub value: f64,
    /// When the operator received the report.
    pub time: Time,
}

/// Latest result of one evaluation.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EvaluationResult {
    /// Evaluation name, e.g. `knn`, `linear`.
    pub name: String,
    /// Iteration evaluated.
    pub iteration: i64,
    /// Metrics by name, e.g. `top1: 0.71`.
    pub metrics: BTreeMap<String, f64>,
    /// When the operator received the report.
    pub time: Time,
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn at(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).unwrap())
    }

    #[test]
    fn condition_keeps_transition_time_when_status_unchanged() {
        let mut s = JobStatus::default();
        s.set_condition(
            condition::RUNNING,
            true,
            "AllPodsRunning",
            "2/2",
            at(10),
            Some(1),
        );
        s.set_condition(
            condition::RUNNING,
            true,
            "AllPodsRunning",
            "still",
            at(20),
            Some(1),
        );
        let c = s.condition(condition::RUNNING).unwrap();
        assert_eq!(c.last_transition_time, at(10));
        assert_eq!(c.message, "still");
        s.set_condition(
            condition::RUNNING,
            false,
            "PodFailed",
            "rank 1",
            at(30),
            Some(1),
        );
        assert_eq!(
            s.condition(condition::RUNNING)
                .unwrap()
                .last_transition_time,
            at(30)
        );
        assert!(!s.is_true(condition::RUNNING));
        assert_eq!(s.conditions.len(), 1);
    }

    #[test]
    fn empty_status_serialises_to_empty_object_so_writers_own_only_their_fields() {
        assert_eq!(serde_json::to_string(&JobStatus::default()).unwrap(), "{}");
        let s = JobStatus {
            iteration: Some(5),
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_value(&s).unwrap(),
            serde_json::json!({"iteration": 5})
        );
    }

    #[test]
    fn only_succeeded_and_failed_are_finished() {
        let finished: Vec<_> = JobPhase::ALL.iter().filter(|p| p.is_finished()).collect();
        assert_eq!(finished, [&JobPhase::Succeeded, &JobPhase::Failed]);
    }
}
