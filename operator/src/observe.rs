//! What an observed pod means for the gang: its rank, attempt, state, exit code, and whether
//! a failure was the node's fault (disruption) or the trainer's.

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;

use dinoflow_api::exit_codes;

use crate::desired::pods::TRAINER_CONTAINER;
use crate::desired::{LABEL_NODE_RANK, LABEL_RUN_ATTEMPT};

/// A pod's state, reduced to what the run policy needs.
#[derive(Clone, Debug, PartialEq)]
pub struct PodObservation {
    pub name: String,
    /// `dinoflow.dev/node-rank`; None on a pod without the label.
    pub rank: Option<i32>,
    /// `dinoflow.dev/run-attempt`; None on a pod without the label.
    pub attempt: Option<i32>,
    pub state: PodState,
    pub node: Option<String>,
    pub created: Option<Timestamp>,
    /// The pod is being deleted.
    pub terminating: bool,
    /// `metadata.deletionTimestamp`: when a graceful deletion's grace period ends (the kubelet
    /// kills the container then and removes the pod).
    pub deletion_deadline: Option<Timestamp>,
    /// When the trainer container terminated, if it has.
    pub finished: Option<Timestamp>,
    /// The scheduler's reason the pod is unscheduled (`PodScheduled=False`).
    pub unschedulable: Option<String>,
}

/// State of one pod of the gang.
#[derive(Clone, Debug, PartialEq)]
pub enum PodState {
    /// Not yet running (unscheduled, pulling, initialising).
    Pending,
    Running,
    Succeeded,
    /// The trainer container exited non-zero (or the pod failed without an exit code).
    Failed {
        exit_code: Option<i32>,
        reason: Option<String>,
        message: Option<String>,
    },
    /// The node's fault, not the trainer's: eviction, preemption, node loss or shutdown, or
    /// a running pod deleted from outside. Restarts the gang without using the backoff budget.
    Disrupted {
        reason: String,
    },
}

/// Pod `status.reason`s that mean the node, not the trainer, ended the pod.
const DISRUPTION_REASONS: [&str; 6] = [
    "Evicted",
    "NodeLost",
    "Preempting",
    "Shutdown",
    "Terminated",
    "NodeShutdown",
];

/// Reduces a pod to a [`PodObservation`].
pub fn observe(pod: &Pod) -> PodObservation {
    let labels = pod.metadata.labels.as_ref();
    let label = |key: &str| labels.and_then(|l| l.get(key)).and_then(|v| v.parse().ok());
    let status = pod.status.as_ref();
    let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("Pending");
    let reason = status.and_then(|s| s.reason.clone());
    let conditions = status
        .and_then(|s| s.conditions.as_deref())
        .unwrap_or_default();
    // Set by the API server/kubelet when a pod is about to be ended for an outside cause
    // (eviction API, taint manager, preemption, kubelet node-pressure or shutdown).
    let disruption = conditions
        .iter()
        .find(|c| c.type_ == "DisruptionTarget" && c.status == "True")
        .map(|c| {
            c.reason
                .clone()
                .unwrap_or_else(|| "DisruptionTarget".into())
        });
    let unschedulable = conditions
        .iter()
        .find(|c| c.type_ == "PodScheduled" && c.status == "False")
        .map(|c| {
            let reason = c.reason.as_deref().unwrap_or("Unschedulable");
            match c.message.as_deref() {
                Some(m) => format!("{reason}: {m}"),
                None => reason.to_string(),
            }
        });
    let terminating = pod.metadata.deletion_timestamp.is_some();
    let terminated = status
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.name == TRAINER_CONTAINER))
        .and_then(|c| c.state.as_ref())
        .and_then(|s| s.terminated.as_ref());

    let state = match phase {
        "Succeeded" => PodState::Succeeded,
        "Failed" => {
            let node_fault = reason.as_deref().filter(|r| DISRUPTION_REASONS.contains(r));
            match (node_fault, disruption) {
                (Some(r), _) => PodState::Disrupted {
                    reason: r.to_string(),
                },
                (None, Some(r)) if terminated.is_none_or(|t| t.exit_code != 0) => {
                    PodState::Disrupted { reason: r }
                }
                (None, None) if ended_by_deletion(pod, terminated) => PodState::Disrupted {
                    reason: "Deleted".into(),
                },
                _ => PodState::Failed {
                    exit_code: terminated.map(|t| t.exit_code),
                    reason: reason
                        .clone()
                        .or_else(|| terminated.and_then(|t| t.reason.clone())),
                    message: status
                        .and_then(|s| s.message.clone())
                        .or_else(|| terminated.and_then(|t| t.message.clone())),
                },
            }
        }
        // A pod that is running (or pending) but being deleted, or marked for disruption,
        // was ended from outside: the trainer did nothing wrong.
        _ if disruption.is_some() => PodState::Disrupted {
            reason: disruption.unwrap_or_default(),
        },
        _ if terminating => PodState::Disrupted {
            reason: "Deleted".into(),
        },
        "Running" => PodState::Running,
        _ => PodState::Pending,
    };
    PodObservation {
        name: pod.metadata.name.clone().unwrap_or_default(),
        rank: label(LABEL_NODE_RANK),
        attempt: label(LABEL_RUN_ATTEMPT),
        state,
        node: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
        created: pod.metadata.creation_timestamp.as_ref().map(|t| t.0),
        terminating,
        deletion_deadline: pod.metadata.deletion_timestamp.as_ref().map(|t| t.0),
        finished: terminated.and_then(|t| t.finished_at.as_ref()).map(|t| t.0),
        unschedulable,
    }
}

/// Whether a failed pod's trainer was ended by the pod's deletion: it was stopped by a signal
/// (SIGTERM, or SIGKILL at the end of the grace period) at or after the deletion began. Seen
/// only once it has failed (an operator down or slow while a pod was deleted from outside),
/// such a pod must still count as the disruption it was, not as the trainer's failure.
fn ended_by_deletion(
    pod: &Pod,
    terminated: Option<&k8s_openapi::api::core::v1::ContainerStateTerminated>,
) -> bool {
    let Some(deadline) = &pod.metadata.deletion_timestamp else {
        return false;
    };
    let grace = pod.metadata.deletion_grace_period_seconds.unwrap_or(0);
    let began = deadline.0.as_second() - grace;
    let by_signal = terminated.is_none_or(|t| {
        matches!(
            t.exit_code,
            exit_codes::STOPPED_BY_SIGNAL | exit_codes::SIGKILLED
        )
    });
    let after = terminated
        .and_then(|t| t.finished_at.as_ref())
        .is_none_or(|f| f.0.as_second() >= began);
    by_signal && after
}

impl PodState {
    /// The trainer's exit code, for a failed pod that has one.
    pub fn exit_code(&self) -> Option<i32> {
        match self {
            Self::Failed { exit_code, .. } => *exit_code,
            _ => None,
        }
    }

    /// Whether the pod failed with an exit code a rank shows when *another* rank ended the
    /// gang: 70 (a collective failed: a peer is gone) or 143 (stopped by SIGTERM, as the
    /// launcher stops the rest of its gang). Such a failure is a symptom; its cause is
    /// elsewhere in the gang (a permanent failure, an eviction) or unknown.
    pub fn is_peer_exit(&self) -> bool {
        matches!(
            self.exit_code(),
            Some(exit_codes::COLLECTIVE_FAILED | exit_codes::STOPPED_BY_SIGNAL)
        )
    }
}

#[cfg(test)]
pub(crate) mod fixtures {
    //! Test-only pods in the states the run policy distinguishes.
    use k8s_openapi::api::core::v1::{
        ContainerState, ContainerStateTerminated, ContainerStatus, PodCondition, PodStatus,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

    use super::*;

    pub fn pod(rank: i32, attempt: i32, phase: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(format!("j-a{attempt}-{rank}")),
                labels: Some(
                    [
                        (LABEL_NODE_RANK.to_string(), rank.to_string()),
                        (LABEL_RUN_ATTEMPT.to_string(), attempt.to_string()),
                    ]
                    .into(),
                ),
                creation_timestamp: Some(Time(Timestamp::from_second(1000).unwrap())),
                ..Default::default()
            },
            spec: Some(k8s_openapi::api::core::v1::PodSpec {
                node_name: Some(format!("node-{rank}")),
                ..Default::default()
            }),
            status: Some(PodStatus {
                phase: Some(phase.into()),
                ..Default::default()
            }),
        }
    }

    pub fn exited(mut pod: Pod, code: i32) -> Pod {
        let status = pod.status.get_or_insert_with(Default::default);
        status.phase = Some(if code == 0 { "Succeeded" } else { "Failed" }.into());
        status.container_statuses = Some(vec![ContainerStatus {
            name: TRAINER_CONTAINER.into(),
            state: Some(ContainerState {
                terminated: Some(ContainerStateTerminated {
                    exit_code: code,
                    reason: Some(if code == 0 { "Completed" } else { "Error" }.into()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }]);
        pod
    }

    /// The trainer container terminated at `secs` (as a kubelet reports `finishedAt`).
    pub fn finished_at(mut pod: Pod, secs: i64) -> Pod {
        let at = Time(Timestamp::from_second(secs).unwrap());
        let statuses = pod
            .status
            .as_mut()
            .and_then(|s| s.container_statuses.as_mut())
            .expect("finished_at needs an exited pod");
        for c in statuses {
            if let Some(t) = c.state.as_mut().and_then(|s| s.terminated.as_mut()) {
                t.finished_at = Some(at.clone());
            }
        }
        pod
    }

    /// The pod is being deleted; its grace period ends at `deadline`.
    pub fn deleting(mut pod: Pod, deadline: i64) -> Pod {
        pod.metadata.deletion_timestamp = Some(Time(Timestamp::from_second(deadline).unwrap()));
        pod
    }

    pub fn with_condition(
        mut pod: Pod,
        type_: &str,
        status: &str,
        reason: &str,
        message: &str,
    ) -> Pod {
        let s = pod.status.get_or_insert_with(Default::default);
        s.conditions
            .get_or_insert_with(Vec::new)
            .push(PodCondition {
                type_: type_.into(),
                status: status.into(),
                reason: Some(reason.into()),
                message: Some(message.into()),
                ..Default::default()
            });
        pod
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::*;
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    #[test]
    fn running_pod_reports_rank_attempt_and_node() {
        let o = observe(&pod(1, 2, "Running"));
        assert_eq!(
            (o.rank, o.attempt, o.state),
            (Some(1), Some(2), PodState::Running)
        );
        assert_eq!(o.node.as_deref(), Some("node-1"));
    }

    #[test]
    fn failed_trainer_reports_its_exit_code() {
        let o = observe(&exited(pod(0, 0, "Running"), 78));
        assert!(matches!(
            o.state,
            PodState::Failed {
                exit_code: Some(78),
                ..
            }
        ));
        assert_eq!(
            observe(&exited(pod(0, 0, "Running"), 0)).state,
            PodState::Succeeded
        );
    }

    #[test]
    fn kubelet_eviction_is_a_disruption() {
        let mut p = exited(pod(0, 0, "Running"), 137);
        p.status.as_mut().unwrap().reason = Some("Evicted".into());
        assert_eq!(
            observe(&p).state,
            PodState::Disrupted {
                reason: "Evicted".into()
            }
        );
    }

    #[test]
    fn disruption_target_condition_marks_node_loss_and_preemption() {
        let p = with_condition(
            pod(0, 0, "Running"),
            "DisruptionTarget",
            "True",
            "DeletionByTaintManager",
            "node gone",
        );
        assert_eq!(
            observe(&p).state,
            PodState::Disrupted {
                reason: "DeletionByTaintManager".into()
            }
        );
        let failed = with_condition(
            exited(pod(0, 0, "Running"), 143),
            "DisruptionTarget",
            "True",
            "PreemptionByScheduler",
            "",
        );
        assert_eq!(
            observe(&failed).state,
            PodState::Disrupted {
                reason: "PreemptionByScheduler".into()
            }
        );
    }

    #[test]
    fn running_pod_deleted_from_outside_is_a_disruption() {
        let mut p = pod(0, 0, "Running");
        p.metadata.deletion_timestamp = Some(Time(Timestamp::from_second(2000).unwrap()));
        let o = observe(&p);
        assert!(o.terminating);
        assert_eq!(
            o.state,
            PodState::Disrupted {
                reason: "Deleted".into()
            }
        );
    }

    #[test]
    fn pod_seen_only_after_its_deletion_stopped_it_is_a_disruption() {
        // Deleted from outside at 1970 with a 30 s grace period; the trainer took SIGTERM.
        let deleted = |code: i32, finished: i64| {
            let mut p = deleting(
                finished_at(exited(pod(1, 0, "Running"), code), finished),
                2000,
            );
            p.metadata.deletion_grace_period_seconds = Some(30);
            observe(&p).state
        };
        let disrupted = PodState::Disrupted {
            reason: "Deleted".into(),
        };
        assert_eq!(deleted(143, 1975), disrupted);
        assert_eq!(deleted(137, 2000), disrupted, "killed at the grace end");
        // Failed before anyone deleted it, or with its own error: the trainer's failure.
        assert!(matches!(deleted(143, 1960), PodState::Failed { .. }));
        assert!(matches!(deleted(1, 1975), PodState::Failed { .. }));
        assert!(matches!(
            observe(&finished_at(exited(pod(1, 0, "Running"), 143), 1975)).state,
            PodState::Failed { .. }
        ));
    }

    #[test]
    fn unscheduled_pod_carries_the_schedulers_reason() {
        let p = with_condition(
            pod(0, 0, "Pending"),
            "PodScheduled",
            "False",
            "Unschedulable",
            "0/3 nodes have nvidia.com/gpu",
        );
        let o = observe(&p);
        assert_eq!(o.state, PodState::Pending);
        assert_eq!(
            o.unschedulable.as_deref(),
            Some("Unschedulable: 0/3 nodes have nvidia.com/gpu")
        );
    }
}
