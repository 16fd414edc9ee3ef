//! `reconcile` and `error_policy` for both job kinds.

use std::sync::Arc;
use std::time::Duration;

use dinoflow_api::status::{JobPhase, JobStatus};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DynamicObject};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};

use super::Context;
use super::apply::{Applier, controller_fields};
use crate::decide::{Decision, JobFacts, TeacherState, decide};
use crate::desired::{self, pods::PodInputs};
use crate::job::{JobKind, JobRef, TeacherSource, TrainingJob};
use crate::observe::{PodObservation, observe};
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
    let kind = K::KIND.as_str();

    // 1. Status first: restarts and the attempt number must be durable before pods change.
    // Deleting pods on a stale view of the job could tear down a newer gang, so deletions are
    // preceded by a resourceVersion-guarded write even when the status is unchanged.
    if controller_fields(&decision.status) != controller_fields(before)
        || !decision.delete_pods.is_empty()
    {
        applier
            .write_status::<K>(&decision.status, job.meta().resource_version.as_deref())
            .await?;
        let counted = decision.status.restarts.unwrap_or(0) - before.restarts.unwrap_or(0);
        let disruptions =
            decision.status.disruptions.unwrap_or(0) - before.disruptions.unwrap_or(0);
        if counted > 0 {
            ctx.metrics
                .restarts
                .with_label_values(&[kind, "counted"])
                .inc_by(counted as u64);
        }
        if disruptions > 0 {
            ctx.metrics
                .restarts
                .with_label_values(&[kind, "disruption"])
                .inc_by(disruptions as u64);
        }
    }

    // 2. Deletions.
    for name in &decision.delete_pods {
        applier.delete_pod(name).await?;
    }

    // 3. The gang of the current attempt.
    if decision.ensure_gang {
        ensure_gang(job, jr, &decision.status, pods, ctx, &applier).await?;
    }

    // 4. Events, after the facts they report are written.
    let reference = job.object_ref(&());
    for e in &decision.events {
        let event = Event {
            type_: if e.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: e.reason.to_string(),
            note: Some(e.note.clone()),
            action: e.reason.to_string(),
            secondary: None,
        };
        if let Err(err) = ctx.recorder.publish(&event, &reference).await {
            // An event lost is not worth failing (and repeating) the reconcile for.
            tracing::warn!(job = %jr.name, error = %err, "could not record event");
        }
    }

    if decision.delete_job {
        applier.delete_job::<K>().await?;
        return Ok(Action::await_change());
    }
    Ok(Action::requeue(
        decision.requeue_after.map_or(RESYNC, |d| d.min(RESYNC)),
    ))
}

/// Applies the Service, ConfigMap, Secret, PodGroup and missing pods of the current attempt.
/// When every pod already exists the gang is complete and nothing is written.
async fn ensure_gang<K: TrainingJob>(
    job: &K,
    jr: &JobRef,
    status: &JobStatus,
    pods: &[PodObservation],
    ctx: &Context,
    applier: &Applier<'_>,
) -> Result<()> {
    let cluster = job.cluster();
    let attempt = status.run_attempt.unwrap_or(0);
    let existing: Vec<i32> = pods
        .iter()
        .filter(|p| p.attempt == Some(attempt))
        .filter_map(|p| p.rank)
        .collect();
    if (0..cluster.nodes).all(|r| existing.contains(&r)) {
        return Ok(());
    }
    let teacher = status.teacher_checkpoint.as_deref();
    applier
        .apply(&desired::service::service(jr, cluster.master_port))
        .await?;
    applier
        .apply(&desired::configmap::config_map(
            jr,
            &job.spec_value()?,
            teacher,
        )?)
        .await?;
    applier
        .apply(&desired::secret::secret(jr, &ctx.settings.progress_key))
        .await?;
    let mode = cluster.gang_scheduling.mode;
    if let (Some(pg), Some(ar)) = (
        desired::podgroup::pod_group(jr, cluster),
        desired::podgroup::api_resource(mode),
    ) {
        applier.apply_dynamic(&pg, &ar).await?;
    }
    let inputs = PodInputs {
        job: jr,
        cluster,
        settings: &ctx.settings,
        attempt,
        teacher_checkpoint: teacher,
    };
    for rank in (0..cluster.nodes).filter(|r| !existing.contains(r)) {
        let pod: Pod = desired::pods::pod(&inputs, rank);
        applier.apply(&pod).await?;
    }
    Ok(())
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
