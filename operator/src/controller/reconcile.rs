//! `reconcile` and `error_policy` for both job kinds.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dinoflow_api::status::{JobPhase, JobStatus, condition};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DynamicObject};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};

use futures::FutureExt;
use futures::future::{self, BoxFuture};

use super::Context;
use super::apply::{Applier, controller_fields};
use crate::decide::{Decision, JobEvent, JobFacts, TeacherState, decide};
use crate::desired::{self, pods::PodInputs};
use crate::job::{JobKind, JobRef, TeacherSource, TrainingJob};
use crate::metrics::Metrics;
use crate::observe::{PodObservation, PodState, observe};
use crate::progress::job_api_resource;
use crate::{Error, Result};

/// Look again at least this often, whatever happens (a safety net for missed events).
const RESYNC: Duration = Duration::from_secs(300);

/// Reconciles one job: observe its pods, decide, then write status, delete, create, record.
pub async fn reconcile<K: TrainingJob>(job: Arc<K>, ctx: Arc<Context>) -> Result<Action> {
    let kind = K::KIND.as_str();
    let _timer = ctx.metrics.reconcile_started(kind);
    ctx.leadership.ensure()?;
    if job.meta().deletion_timestamp.is_some() {
        // Children carry owner references; the garbage collector removes them.
        return Ok(Action::await_change());
    }
    let jr = job.job_ref()?;
    if ctx
        .own_writes
        .predates_own_write(&jr.uid, job.meta().resource_version.as_deref())
    {
        // The watch has yet to deliver our own status write, and that event wakes the job
        // again; the requeue is a safety net only.
        return Ok(Action::requeue(Duration::from_secs(5)));
    }
    let status = job.job_status().cloned().unwrap_or_default();
    let pods = owned_pods(&ctx, &jr);
    let teacher = match job.teacher() {
        None => None,
        // A checkpoint path needs no waiting; the trainer reads it from spec.teacher as written.
        Some(TeacherSource::Checkpoint(_)) => None,
        Some(TeacherSource::PretrainJob(name)) => {
            Some(teacher_state(&ctx, &jr.namespace, &name).await?)
        }
    };
    let facts = JobFacts {
        job: &jr,
        cluster: job.cluster(),
        status: &status,
        teacher,
        now: Timestamp::now(),
    };
    let decision = decide(&facts, &pods);
    tracing::debug!(job = %jr.name, namespace = %jr.namespace, kind, phase = ?decision.status.phase, "decided");
    act(&*job, &jr, &status, &pods, decision, &ctx).await
}

/// Pods of the job from the shared cache, matched by controller owner uid.
fn owned_pods(ctx: &Context, jr: &JobRef) -> Vec<PodObservation> {
    ctx.pods
        .state()
        .iter()
        .filter(|p| p.metadata.namespace.as_deref() == Some(jr.namespace.as_str()))
        .filter(|p| {
            p.metadata.owner_references.as_ref().is_some_and(|o| {
                o.iter()
                    .any(|o| o.uid == jr.uid && o.controller == Some(true))
            })
        })
        .map(|p| observe(p))
        .collect()
}

/// State of a DistillJob's teacher PretrainJob.
async fn teacher_state(ctx: &Context, namespace: &str, name: &str) -> Result<TeacherState> {
    let api: Api<DynamicObject> = Api::namespaced_with(
        ctx.client.clone(),
        namespace,
        &job_api_resource(JobKind::Pretrain),
    );
    let Some(obj) = api.get_opt(name).await? else {
        return Ok(TeacherState::Missing(name.to_string()));
    };
    let status: JobStatus = match obj.data.get("status") {
        Some(s) => serde_json::from_value(s.clone()).map_err(|source| Error::Serde {
            what: "teacher status",
            source,
        })?,
        None => JobStatus::default(),
    };
    Ok(match status.phase() {
        JobPhase::Succeeded => match status.last_checkpoint {
            Some(c) => TeacherState::Ready { checkpoint: c.path },
            None => TeacherState::Failed(format!(
                "teacher PretrainJob {name} succeeded but reported no checkpoint (status.lastCheckpoint)"
            )),
        },
        JobPhase::Failed => TeacherState::Failed(format!("teacher PretrainJob {name} failed")),
        phase => TeacherState::Waiting {
            name: name.to_string(),
            phase,
        },
    })
}

async fn act<K: TrainingJob>(
    job: &K,
    jr: &JobRef,
    before: &JobStatus,
    pods: &[PodObservation],
    decision: Decision,
    ctx: &Context,
) -> Result<Action> {
    let applier = Applier {
        client: &ctx.client,
        leadership: &ctx.leadership,
        job: jr,
    };
    let status_changed = controller_fields(&decision.status) != controller_fields(before);

    // 1. Status first when it carries what must be durable before pods change (the attempt,
    // the restart counts, the teacher checkpoint). Deleting pods on a stale view of the job
    // could tear down a newer gang, so deletions are preceded by a resourceVersion-guarded
    // write even when the status is unchanged. Any other status change (pod counts, phase,
    // conditions) is written alongside the gang's first objects: a crash in between leaves
    // nothing a later reconcile cannot re-derive, and it saves a round trip per reconcile.
    let status_first = !decision.delete_pods.is_empty()
        || (status_changed && status_must_precede_children(before, &decision.status));
    let rv = job.meta().resource_version.as_deref();
    let (applier_ref, new_status) = (&applier, &decision.status);
    let write_status = || async move {
        let after = applier_ref.write_status::<K>(new_status, rv).await?;
        // A write that changed nothing (a guard before deletions) leaves the version as it
        // was; no newer view will come, so there is nothing to wait for.
        if let (Some(rv), Some(after)) = (rv, after)
            && rv != after
        {
            ctx.own_writes.wrote_over(&jr.uid, rv, Instant::now());
        }
        Ok(())
    };
    let mut pending_status_write = None;
    let mut pods_on_their_way = None;
    if status_first || (status_changed && !decision.ensure_gang) {
        write_status().await?;
        count_restarts(K::KIND.as_str(), before, &decision.status, &ctx.metrics);
        count_failure(
            K::KIND.as_str(),
            before,
            &decision.status,
            pods,
            &ctx.metrics,
        );
    } else if status_changed {
        // Restarts and disruptions are unchanged here (else the status went first).
        pending_status_write = Some(write_status());
    }

    // 2. Deletions, all at once (each tolerates a pod already gone).
    future::try_join_all(decision.delete_pods.iter().map(|n| applier.delete_pod(n))).await?;

    // 3. The gang of the current attempt, with the pending status write in its first wave.
    if decision.ensure_gang {
        let gang = Gang {
            job,
            jr,
            status: &decision.status,
            ctx,
            applier: &applier,
        };
        pods_on_their_way = gang.ensure(pods, pending_status_write).await?;
    }

    // 4. Events, after the facts they report are written. They go out in the background: an
    // event is informational, and waiting for it would add a round trip to every decision.
    publish_events::<K>(job, jr, decision.events, ctx);

    if decision.delete_job {
        applier.delete_job::<K>().await?;
        return Ok(Action::await_change());
    }
    // Pods on their way normally wake the job as they reach the cache; if they never do,
    // look again when they are given up on.
    let requeue = [Some(RESYNC), decision.requeue_after, pods_on_their_way]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(RESYNC);
    Ok(Action::requeue(requeue))
}

/// Whether the new status must be durable before any pod is created or deleted: it starts a
/// new attempt, counts a restart or disruption, or pins the teacher's checkpoint. Replayed
/// after a crash, a decision made without these would count the same failure twice or start
/// a gang the status does not know.
fn status_must_precede_children(before: &JobStatus, after: &JobStatus) -> bool {
    before.run_attempt.unwrap_or(0) != after.run_attempt.unwrap_or(0)
        || before.restarts.unwrap_or(0) != after.restarts.unwrap_or(0)
        || before.disruptions.unwrap_or(0) != after.disruptions.unwrap_or(0)
        || before.teacher_checkpoint != after.teacher_checkpoint
}

fn count_restarts(kind: &str, before: &JobStatus, after: &JobStatus, metrics: &Metrics) {
    let counted = after.restarts.unwrap_or(0) - before.restarts.unwrap_or(0);
    let disruptions = after.disruptions.unwrap_or(0) - before.disruptions.unwrap_or(0);
    let n = counted.max(0) + disruptions.max(0);
    if n > 0 {
        let reason = after
            .condition(condition::RESTARTING)
            .map(|c| c.reason.as_str());
        metrics.restarted(kind, reason, n as u64);
    }
}

/// Counts a job that has just become Failed, naming a NaN/Inf loss (exit code 79) apart.
fn count_failure(
    kind: &str,
    before: &JobStatus,
    after: &JobStatus,
    pods: &[PodObservation],
    metrics: &Metrics,
) {
    if before.phase() == JobPhase::Failed || after.phase() != JobPhase::Failed {
        return;
    }
    let non_finite = pods.iter().find_map(|p| match p.state {
        PodState::Failed {
            exit_code: Some(code @ dinoflow_api::exit_codes::NON_FINITE_LOSS),
            ..
        } => Some(code),
        _ => None,
    });
    let reason = after
        .condition(condition::FAILED)
        .map(|c| c.reason.as_str());
    metrics.job_failed(kind, reason, non_finite);
}

/// Records the decision's events in order, in a background task.
fn publish_events<K: TrainingJob>(job: &K, jr: &JobRef, events: Vec<JobEvent>, ctx: &Context) {
    if events.is_empty() {
        return;
    }
    let reference = job.object_ref(&());
    let recorder = ctx.recorder.clone();
    let name = jr.name.clone();
    tokio::spawn(async move {
        for e in events {
            let event = Event {
                type_: if e.warning {
                    EventType::Warning
                } else {
                    EventType::Normal
                },
                reason: e.reason.to_string(),
                note: Some(e.note),
                action: e.reason.to_string(),
                secondary: None,
            };
            if let Err(err) = recorder.publish(&event, &reference).await {
                // An event lost is not worth failing (and repeating) the reconcile for.
                tracing::warn!(job = %name, error = %err, "could not record event");
            }
        }
    });
}

/// What creating a job's gang needs.
struct Gang<'a, K> {
    job: &'a K,
    jr: &'a JobRef,
    status: &'a JobStatus,
    ctx: &'a Context,
    applier: &'a Applier<'a>,
}

impl<'a, K: TrainingJob> Gang<'a, K> {
    /// Applies the Service, ConfigMap, Secret, PodGroup and missing pods of the current
    /// attempt. When every pod already exists, or the missing ones were just created and are
    /// on their way to the cache, nothing is written (but `status_write` is still awaited);
    /// returns how long until pods on their way are given up on, if any are.
    ///
    /// All of it is written at once (with `status_write`): the kubelet waits for a pod's
    /// ConfigMap and Secret, so creating them alongside the pods is safe, and it makes
    /// creating a gang one round trip. A PodGroup is the exception, written first: a gang
    /// scheduler that sees a pod before its PodGroup rejects it and backs off for seconds.
    async fn ensure(
        &self,
        pods: &[PodObservation],
        status_write: Option<impl Future<Output = Result<()>> + Send + 'a>,
    ) -> Result<Option<Duration>> {
        let (jr, applier) = (self.jr, self.applier);
        let cluster = self.job.cluster();
        let attempt = self.status.run_attempt.unwrap_or(0);
        let existing: Vec<i32> = pods
            .iter()
            .filter(|p| p.attempt == Some(attempt))
            .filter_map(|p| p.rank)
            .collect();
        let missing: Vec<i32> = (0..cluster.nodes)
            .filter(|r| !existing.contains(r))
            .collect();
        let expectations = &self.ctx.expectations;
        let (missing, on_their_way) =
            expectations.to_create(&jr.uid, attempt, &missing, Instant::now());
        let mut writes: Vec<BoxFuture<'a, Result<()>>> = Vec::new();
        if let Some(write) = status_write {
            writes.push(write.boxed());
        }
        if missing.is_empty() {
            future::try_join_all(writes).await?;
            return Ok(on_their_way);
        }
        let teacher = self.status.teacher_checkpoint.as_deref();
        let service = desired::service::service(jr, cluster.master_port);
        let spec = self.job.spec_value()?;
        let config_map = desired::configmap::config_map(jr, &spec, teacher)?;
        let metrics_port = desired::scrape::metrics_port(&spec);
        let secret = desired::secret::secret(jr, &self.ctx.settings.progress_key);
        let inputs = PodInputs {
            job: jr,
            cluster,
            settings: &self.ctx.settings,
            attempt,
            teacher_checkpoint: teacher,
        };
        let gang: Vec<Pod> = missing
            .iter()
            .map(|rank| {
                let mut pod = desired::pods::pod(&inputs, *rank);
                desired::scrape::annotate(&mut pod, metrics_port);
                pod
            })
            .collect();
        let mode = cluster.gang_scheduling.mode;
        if let (Some(pg), Some(ar)) = (
            desired::podgroup::pod_group(jr, cluster),
            desired::podgroup::api_resource(mode),
        ) {
            applier.apply_dynamic(&pg, &ar).await?;
        }
        writes.push(async move { applier.apply(&service).await }.boxed());
        writes.push(async move { applier.apply(&config_map).await }.boxed());
        writes.push(async move { applier.apply(&secret).await }.boxed());
        for pod in gang {
            writes.push(async move { applier.apply(&pod).await }.boxed());
        }
        future::try_join_all(writes).await?;
        expectations.created(&jr.uid, attempt, &missing, Instant::now());
        // The pods' watch events wake the job when they arrive; no extra look needed.
        Ok(None)
    }
}

/// Counts the failure and retries with a short backoff; conflicts (a stale view) retry at once.
pub fn error_policy<K: TrainingJob>(job: Arc<K>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_failed(K::KIND.as_str(), error);
    let name = job.meta().name.clone().unwrap_or_default();
    match error {
        Error::Kube(kube::Error::Api(s)) if s.code == 409 => {
            tracing::debug!(job = %name, "status conflict; retrying on a fresh view");
            Action::requeue(Duration::from_millis(200))
        }
        Error::NotLeader => Action::await_change(),
        _ => {
            tracing::warn!(job = %name, error = %error, "reconcile failed");
            Action::requeue(Duration::from_secs(5))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_attempt_restart_disruption_or_teacher_must_be_durable_before_the_pods() {
        let before = JobStatus {
            run_attempt: Some(1),
            restarts: Some(1),
            ..Default::default()
        };
        let changed = |f: fn(&mut JobStatus)| {
            let mut after = before.clone();
            f(&mut after);
            status_must_precede_children(&before, &after)
        };
        assert!(changed(|s| s.run_attempt = Some(2)));
        assert!(changed(|s| s.restarts = Some(2)));
        assert!(changed(|s| s.disruptions = Some(1)));
        assert!(changed(
            |s| s.teacher_checkpoint = Some("/ckpt/final".into())
        ));
    }

    #[test]
    fn pod_counts_phase_and_conditions_can_be_written_alongside_the_gang() {
        let before = JobStatus::default();
        let after = JobStatus {
            phase: Some(JobPhase::Pending),
            run_attempt: Some(0),
            restarts: Some(0),
            message: Some("waiting for 4 pod(s) of attempt 0 to run".into()),
            ..Default::default()
        };
        assert!(!status_must_precede_children(&before, &after));
    }
}
