//! `reconcile` and `error_policy` for both job kinds.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dinoflow_api::status::{JobPhase, JobStatus, condition};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DynamicObject};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};

use futures::FutureExt;
use futures::future::{self, BoxFuture};

use super::apply::{Applier, Expect, controller_fields};
use super::{Context, prepared};
use crate::decide::{Decision, JobEvent, JobFacts, TeacherState, decide};
use crate::desired::{self, pods::PodInputs};
use crate::job::{JobKind, JobRef, TeacherSource, TrainingJob};
use crate::metrics::Metrics;
use crate::observe::{PodObservation, PodState, observe};
use crate::progress::job_api_resource;
use crate::{Error, Result};

/// Look again at least this often, whatever happens (a safety net for missed events).
const RESYNC: Duration = Duration::from_secs(300);

/// Longest a reconcile may take. One normally takes milliseconds; one stuck on a stalled API
/// call would hold a worker (and the job) forever. Abandoning it midway is safe: it leaves
/// what a crash would, which the next reconcile completes (status first, then pods).
pub const RECONCILE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a job is looked at again while the pod cache has not synced yet.
const CACHE_SYNC_POLL: Duration = Duration::from_secs(1);
/// Event reason of a failed reconcile.
pub const RECONCILE_ERROR: &str = "ReconcileError";
/// Reason of `Synced=True` once reconciling works again.
const RECONCILE_SUCCEEDED: &str = "ReconcileSucceeded";

/// Reconciles one job within [`RECONCILE_TIMEOUT`]; a failure is recorded on the job (a
/// `Synced=False` condition and a Warning event) before it is retried with backoff.
pub async fn reconcile<K: TrainingJob>(job: Arc<K>, ctx: Arc<Context>) -> Result<Action> {
    reconcile_within(job, ctx, RECONCILE_TIMEOUT).await
}

/// [`reconcile`] with its time limit (a test's is shorter).
async fn reconcile_within<K: TrainingJob>(
    job: Arc<K>,
    ctx: Arc<Context>,
    limit: Duration,
) -> Result<Action> {
    let kind = K::KIND.as_str();
    let _timer = ctx.metrics.reconcile_started(kind);
    let result = tokio::time::timeout(limit, reconcile_job(&*job, &ctx))
        .await
        .unwrap_or(Err(Error::Timeout(limit)));
    match &result {
        Ok(_) => ctx.backoff.succeeded(&backoff_key(&*job)),
        Err(error) => report_error(&*job, error, &ctx).await,
    }
    result
}

/// Observe the job's pods, decide, then write status, delete, create, record.
async fn reconcile_job<K: TrainingJob>(job: &K, ctx: &Context) -> Result<Action> {
    ctx.leadership.ensure()?;
    if job.meta().deletion_timestamp.is_some() {
        // Children carry owner references; the garbage collector removes them.
        return Ok(Action::await_change());
    }
    // An empty pod cache (start-up, a new leader) would look like a job without pods: a
    // Restarting job would start its next gang while the old one still writes its last
    // checkpoint. Act only on a synced cache.
    if !matches!(ctx.pods.wait_until_ready().now_or_never(), Some(Ok(()))) {
        return Ok(Action::requeue(CACHE_SYNC_POLL));
    }
    let jr = job.job_ref()?;
    if ctx.own_writes.predates_own_write(
        &jr.uid,
        job.meta().resource_version.as_deref(),
        Instant::now(),
    ) {
        // The watch has yet to deliver our own status write, and that event wakes the job
        // again; the requeue is a safety net only.
        return Ok(Action::requeue(Duration::from_secs(5)));
    }
    let status = job.job_status().cloned().unwrap_or_default();
    let pods = owned_pods(ctx, &jr);
    let teacher = match job.teacher() {
        None => None,
        // A checkpoint path needs no waiting; the trainer reads it from spec.teacher as written.
        Some(TeacherSource::Checkpoint(_)) => None,
        // Once pinned, the teacher job is not needed any more (it may be gone).
        Some(TeacherSource::PretrainJob(name)) => match &status.teacher_checkpoint {
            Some(pinned) => Some(TeacherState::Ready {
                checkpoint: pinned.clone(),
            }),
            None => Some(teacher_state(ctx, &jr.namespace, &name).await?),
        },
    };
    let now = Timestamp::now();
    let facts = JobFacts {
        job: &jr,
        cluster: job.cluster(),
        status: &status,
        teacher,
        invalid: jr.child_name_problem(),
        operating_since: Some(ctx.operating_since),
        now,
    };
    let mut decision = decide(&facts, &pods);
    if decision
        .status
        .condition(condition::SYNCED)
        .is_some_and(|c| c.status == "False")
    {
        decision.status.set_condition(
            condition::SYNCED,
            true,
            RECONCILE_SUCCEEDED,
            "the operator acts on the job again",
            Time(now),
            jr.generation,
        );
    }
    tracing::debug!(job = %jr.name, namespace = %jr.namespace, kind = K::KIND.as_str(), phase = ?decision.status.phase, "decided");
    act(job, &jr, &status, &pods, decision, ctx).await
}

/// Key of a job in [`Context::backoff`].
fn backoff_key<K: TrainingJob>(job: &K) -> String {
    let meta = job.meta();
    meta.uid.clone().unwrap_or_else(|| {
        format!(
            "{}/{}",
            meta.namespace.as_deref().unwrap_or_default(),
            meta.name.as_deref().unwrap_or_default()
        )
    })
}

/// Makes a failed reconcile visible on the job: a Warning event every time, and the
/// `Synced=False` condition when it changes (first failure, or another kind of error).
/// Rewriting the condition on every failure would wake the job at once through its own
/// watch and defeat the backoff. Best effort: the API server may be what failed.
async fn report_error<K: TrainingJob>(job: &K, error: &Error, ctx: &Context) {
    if matches!(error, Error::NotLeader) || error.is_conflict() {
        return;
    }
    let name = job.meta().name.clone().unwrap_or_default();
    tracing::warn!(job = %name, error = %error, "reconcile failed");
    let Ok(jr) = job.job_ref() else { return };
    let message = error.to_string();
    publish_events::<K>(
        job,
        &jr,
        vec![JobEvent {
            warning: true,
            reason: RECONCILE_ERROR,
            note: message.clone(),
        }],
        ctx,
    );
    let status = job.job_status().cloned().unwrap_or_default();
    let unchanged = status
        .condition(condition::SYNCED)
        .is_some_and(|c| c.status == "False" && c.reason == error.reason());
    if unchanged || ctx.leadership.ensure().is_err() {
        return;
    }
    let mut status = status;
    status.set_condition(
        condition::SYNCED,
        false,
        error.reason(),
        message,
        Time(Timestamp::now()),
        jr.generation,
    );
    let applier = Applier {
        client: &ctx.client,
        leadership: &ctx.leadership,
        job: &jr,
    };
    let rv = job.meta().resource_version.as_deref();
    let write = applier.write_status::<K>(&status, rv);
    match tokio::time::timeout(Duration::from_secs(5), write).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            tracing::debug!(job = %name, error = %e, "could not record the error in status")
        }
        Err(_) => tracing::debug!(job = %name, "recording the error in status timed out"),
    }
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
    mut decision: Decision,
    ctx: &Context,
) -> Result<Action> {
    let applier = Applier {
        client: &ctx.client,
        leadership: &ctx.leadership,
        job: jr,
    };
    // The gang's plan first: the status written with the pods counts them already.
    let gang = if decision.ensure_gang {
        Some(Gang::plan(job, jr, before, &decision.status, ctx, pods)?)
    } else {
        None
    };
    if let Some(gang) = &gang {
        count_in_flight(&mut decision.status, gang.step, gang.in_flight);
    }
    let step = gang.as_ref().map(|g| g.step);
    let status_changed = controller_fields(&decision.status) != controller_fields(before);

    // 1. Status first when it carries what must be durable before pods change (the attempt,
    // the restart counts, the teacher checkpoint). Deleting pods on a stale view of the job
    // could tear down a newer gang, so deletions are preceded by a resourceVersion-guarded
    // write even when the status is unchanged. Any other status change (pod counts, phase,
    // conditions) is written alongside the gang's pods: a crash in between leaves nothing a
    // later reconcile cannot re-derive, and it saves a round trip per reconcile. A reconcile
    // that only prepares the gang's children leaves such a change (and its events) to the
    // next reconcile, which comes at once, decides again and writes it with the pods.
    let status_first = !decision.delete_pods.is_empty()
        || !decision.force_delete_pods.is_empty()
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
    let mut status_deferred = false;
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
    } else if status_changed && step == Some(GangStep::Prepare) {
        status_deferred = true;
    } else if status_changed {
        // Restarts and disruptions are unchanged here (else the status went first).
        pending_status_write = Some(write_status());
    }

    // 2. Deletions, all at once (each tolerates a pod already gone); pods stuck terminating
    // on a lost node go at once (grace period 0).
    let deletes = decision
        .delete_pods
        .iter()
        .map(|n| applier.delete_pod(n).boxed());
    let forced = (decision.force_delete_pods.iter()).map(|n| applier.force_delete_pod(n).boxed());
    future::try_join_all(deletes.chain(forced)).await?;

    // 3. The gang of the current attempt: its children, or its pods with the pending status
    // write in the same wave.
    let mut requeue_after = decision.requeue_after;
    if let Some(gang) = &gang {
        let recovering = (before.condition(condition::SYNCED)).is_some_and(|c| c.status == "False");
        let ready_again = (gang.ensure(&applier, pending_status_write, recovering)).await?;
        requeue_after = [requeue_after, ready_again].into_iter().flatten().min();
    }

    // 4. Events, after the facts they report are written (a deferred status takes its events
    // with it: the next reconcile decides them again). They go out in the background: an
    // event is informational, and waiting for it would add a round trip to every decision.
    if !status_deferred {
        publish_events::<K>(job, jr, decision.events, ctx);
    }

    if decision.delete_job {
        applier.delete_job::<K>().await?;
        return Ok(Action::await_change());
    }
    // Pods on their way normally wake the job as they reach the cache; if they never do,
    // look again when they are given up on. Prepared children: at once, for the pods.
    let requeue = [Some(RESYNC), requeue_after]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(RESYNC);
    Ok(Action::requeue(requeue))
}

/// Counts the pods on their way (created by this reconcile, or earlier and not yet in the
/// cache) as pending in the status written with them: they are pending once they exist, so
/// the reconciles woken as they reach the cache find the status already right and write
/// nothing (it was a second status write per gang). A reconcile that only prepares the
/// children creates no pod and counts none.
fn count_in_flight(status: &mut JobStatus, step: GangStep, in_flight: usize) {
    if step == GangStep::Prepare {
        return;
    }
    if let Some(counts) = status.pods.as_mut() {
        counts.pending += i32::try_from(in_flight).unwrap_or(i32::MAX);
    }
}

/// Whether the new status must be durable before any pod is created or deleted: it starts a
/// new attempt, counts a restart or disruption, or pins the teacher's checkpoint. Replayed
/// after a crash, a decision made without these would count the same failure twice or start
/// a gang the status does not know.
fn status_must_precede_children(before: &JobStatus, after: &JobStatus) -> bool {
    before.run_attempt.unwrap_or(0) != after.run_attempt.unwrap_or(0)
        || before.restarts.unwrap_or(0) != after.restarts.unwrap_or(0)
        || before.progress_restarts.unwrap_or(0) != after.progress_restarts.unwrap_or(0)
        || before.disruptions.unwrap_or(0) != after.disruptions.unwrap_or(0)
        || before.teacher_checkpoint != after.teacher_checkpoint
}

fn count_restarts(kind: &str, before: &JobStatus, after: &JobStatus, metrics: &Metrics) {
    // Every restart counts once, whichever budget it was charged to.
    let new =
        |before: Option<i32>, after: Option<i32>| (after.unwrap_or(0) - before.unwrap_or(0)).max(0);
    let n = new(before.restarts, after.restarts)
        + new(before.progress_restarts, after.progress_restarts)
        + new(before.disruptions, after.disruptions);
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
                note: Some(event_note(e.note)),
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

/// The API server refuses an event whose note is over 1 kB (events.k8s.io/v1), and an API
/// error's message (a refused child's, say) can be longer: keep its start, cut on a character
/// boundary, and say so.
fn event_note(mut note: String) -> String {
    const LIMIT: usize = 1024;
    const CUT: &str = " …";
    if note.len() > LIMIT {
        let mut end = LIMIT - CUT.len();
        while !note.is_char_boundary(end) {
            end -= 1;
        }
        note.truncate(end);
        note.push_str(CUT);
    }
    note
}

/// What the gang step of a reconcile does. Children go a round trip before the pods (their
/// owner is checked before any pod uses them), and that round trip is a reconcile of its own:
/// each reconcile then waits for one wave of writes, not two in a row (see `prepared.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum GangStep {
    /// Every pod of the attempt exists or is on its way to the cache: no write for the gang.
    Complete,
    /// Pods are missing and their children are not verified: write the PodGroup, Secret,
    /// ConfigMap and Service together, check they are the job's own, and reconcile again at
    /// once.
    Prepare,
    /// The previous reconcile verified these very children: create the missing pods, with the
    /// status write, in one wave.
    CreatePods,
}

/// A gang's children exist already when an earlier attempt had a gang, or this attempt's
/// gang was created before (the status says when): read them first. A new job's are new.
fn children_expected(before: &JobStatus, attempt: i32) -> Expect {
    if attempt > 0 || before.attempt_start_time.is_some() {
        Expect::Present
    } else {
        Expect::Absent
    }
}

fn gang_step(to_create: &[i32], children_verified: bool) -> GangStep {
    match (to_create.is_empty(), children_verified) {
        (true, _) => GangStep::Complete,
        (false, false) => GangStep::Prepare,
        (false, true) => GangStep::CreatePods,
    }
}

/// The desired children of a gang (what its pods refer to).
struct Children {
    secret: k8s_openapi::api::core::v1::Secret,
    config_map: k8s_openapi::api::core::v1::ConfigMap,
    service: k8s_openapi::api::core::v1::Service,
    pod_group: Option<(DynamicObject, kube::api::ApiResource)>,
    digest: u64,
}

/// What creating a job's gang needs, and what this reconcile does about it.
struct Gang<'a, K> {
    job: &'a K,
    jr: &'a JobRef,
    ctx: &'a Context,
    attempt: i32,
    teacher: Option<String>,
    step: GangStep,
    /// Ranks to create now (when `step` is `CreatePods`).
    to_create: Vec<i32>,
    /// Ranks of the attempt missing from the cache: to create, or created and on their way.
    in_flight: usize,
    /// How long until the pods on their way are given up on, if any are.
    on_their_way: Option<Duration>,
    /// Only when pods are missing.
    children: Option<Children>,
    /// Whether the children most likely exist already.
    expect: Expect,
}

impl<'a, K: TrainingJob> Gang<'a, K> {
    fn plan(
        job: &'a K,
        jr: &'a JobRef,
        before: &JobStatus,
        status: &JobStatus,
        ctx: &'a Context,
        pods: &[PodObservation],
    ) -> Result<Self> {
        let cluster = job.cluster();
        let attempt = status.run_attempt.unwrap_or(0);
        let existing: Vec<i32> = pods
            .iter()
            .filter(|p| p.attempt == Some(attempt))
            .filter_map(|p| p.rank)
            .collect();
        let missing: Vec<i32> = (0..cluster.nodes)
            .filter(|r| !existing.contains(r))
            .collect();
        let now = Instant::now();
        let (to_create, on_their_way) = ctx.expectations.to_create(&jr.uid, attempt, &missing, now);
        let teacher = status.teacher_checkpoint.clone();
        let mut gang = Self {
            job,
            jr,
            ctx,
            attempt,
            teacher,
            step: GangStep::Complete,
            to_create,
            in_flight: missing.len(),
            on_their_way,
            children: None,
            expect: children_expected(before, attempt),
        };
        if !gang.to_create.is_empty() {
            let children = gang.children()?;
            let verified = ctx
                .prepared
                .is_ready(&jr.uid, attempt, children.digest, now);
            gang.step = gang_step(&gang.to_create, verified);
            gang.children = Some(children);
        }
        Ok(gang)
    }

    fn children(&self) -> Result<Children> {
        let (jr, cluster) = (self.jr, self.job.cluster());
        let spec = self.job.spec_value()?;
        let settings = &self.ctx.settings;
        let secret = desired::secret::secret(
            jr,
            &settings.progress_key,
            u32::try_from(self.attempt).unwrap_or(0),
            settings.progress_ca.as_deref(),
        );
        let config_map = desired::configmap::config_map(jr, &spec, self.teacher.as_deref())?;
        let service = desired::service::service(jr, cluster.master_port);
        let pod_group = desired::podgroup::pod_group(jr, cluster).zip(
            desired::podgroup::api_resource(cluster.gang_scheduling.mode),
        );
        let digest = prepared::digest(&(
            &secret,
            &config_map,
            &service,
            pod_group.as_ref().map(|(pg, _)| pg),
        ));
        Ok(Children {
            secret,
            config_map,
            service,
            pod_group,
            digest,
        })
    }

    /// Does this reconcile's part of the gang: nothing (but `status_write` is still awaited),
    /// its children, or its missing pods with `status_write`. Returns when to look again:
    /// at once after the children, when pods on their way are given up on, or not at all
    /// (the pods' watch events wake the job).
    async fn ensure(
        &self,
        applier: &Applier<'_>,
        status_write: Option<impl Future<Output = Result<()>> + Send + 'a>,
        recovering: bool,
    ) -> Result<Option<Duration>> {
        let jr = self.jr;
        match (self.step, &self.children) {
            (GangStep::Prepare, Some(children)) => {
                // Together: the PodGroup (a gang scheduler that sees a pod before its PodGroup
                // rejects it), the Secret (this attempt's token, read by the pods' env), the
                // ConfigMap they mount and the Service they are named under. One of these
                // names taken by an object the job does not own fails the reconcile here,
                // before any pod exists that would use someone else's object.
                let expect = self.expect;
                let mut writes: Vec<BoxFuture<'_, Result<()>>> = vec![
                    applier.apply(&children.secret, expect).boxed(),
                    applier.apply(&children.config_map, expect).boxed(),
                    applier.apply(&children.service, expect).boxed(),
                ];
                if let Some((pg, ar)) = &children.pod_group {
                    writes.push(applier.apply_dynamic(pg, ar, expect).boxed());
                }
                future::try_join_all(writes).await?;
                // The status (if any) is written by the next reconcile, with the pods.
                drop(status_write);
                (self.ctx.prepared).record(&jr.uid, self.attempt, children.digest, Instant::now());
                Ok(Some(Duration::ZERO))
            }
            (GangStep::CreatePods, _) => {
                let inputs = PodInputs {
                    job: jr,
                    cluster: self.job.cluster(),
                    settings: &self.ctx.settings,
                    attempt: self.attempt,
                    teacher_checkpoint: self.teacher.as_deref(),
                };
                let metrics_port = desired::scrape::metrics_port(&self.job.spec_value()?);
                let gang: Vec<Pod> = (self.to_create.iter())
                    .map(|rank| {
                        let mut pod = desired::pods::pod(&inputs, *rank);
                        desired::scrape::annotate(&mut pod, metrics_port);
                        pod
                    })
                    .collect();
                let mut writes: Vec<BoxFuture<'_, Result<()>>> = Vec::new();
                // A job whose reconciles failed (`Synced=False`) gets `Synced=True` back only
                // once its pods are in: written with them, a pod refused again would flip the
                // condition back and forth, each write waking the job past its backoff.
                let mut status_after = None;
                match status_write {
                    Some(write) if recovering => status_after = Some(write),
                    Some(write) => writes.push(write.boxed()),
                    None => {}
                }
                for pod in &gang {
                    writes.push(applier.apply(pod, Expect::Absent).boxed());
                }
                future::try_join_all(writes).await?;
                if let Some(write) = status_after {
                    write.await?;
                }
                self.ctx.prepared.used(&jr.uid);
                (self.ctx.expectations).created(
                    &jr.uid,
                    self.attempt,
                    &self.to_create,
                    Instant::now(),
                );
                Ok(None)
            }
            _ => {
                if let Some(write) = status_write {
                    write.await?;
                }
                Ok(self.on_their_way)
            }
        }
    }
}

/// Counts the failure and retries after the job's exponential backoff (with jitter);
/// conflicts (a stale view) start from a much shorter delay.
pub fn error_policy<K: TrainingJob>(job: Arc<K>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_failed(K::KIND.as_str(), error);
    if let Error::NotLeader = error {
        return Action::await_change();
    }
    let key = backoff_key(&*job);
    let delay = ctx
        .backoff
        .failed(&key, error.is_conflict(), Instant::now());
    let name = job.meta().name.clone().unwrap_or_default();
    tracing::debug!(job = %name, error = %error, retry_in = ?delay, "retrying the reconcile");
    Action::requeue(delay)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::{Backoff, Expectations, OwnStatusWrites, Prepared, Recorder};
    use crate::leader::Leadership;
    use crate::settings::Settings;
    use kube::runtime::events::Reporter;
    use kube::runtime::reflector;

    /// A context with a synced, empty pod cache (and its writer) whose client talks to `api`.
    fn fake_api_context(
        api: &super::super::fake_api::FakeApi,
    ) -> (Context, reflector::store::Writer<Pod>) {
        let (pods, mut writer) = reflector::store::<Pod>();
        writer.apply_watcher_event(&kube::runtime::watcher::Event::Init);
        writer.apply_watcher_event(&kube::runtime::watcher::Event::InitDone);
        let mut ctx = offline_context(pods);
        let config = kube::Config::new(api.url.parse().expect("valid URL"));
        ctx.client = kube::Client::try_from(config).expect("client");
        (ctx, writer)
    }

    /// A context whose client points at a closed port: any API call fails at once.
    fn offline_context(pods: reflector::Store<Pod>) -> Context {
        let config = kube::Config::new("http://127.0.0.1:9".parse().expect("valid URL"));
        let client = kube::Client::try_from(config).expect("client");
        Context {
            recorder: Recorder::new(client.clone(), Reporter::from("test")),
            client,
            settings: Settings::for_tests(),
            metrics: Metrics::default(),
            leadership: Leadership::always(),
            pods,
            expectations: Expectations::default(),
            own_writes: OwnStatusWrites::default(),
            prepared: Prepared::default(),
            backoff: Backoff::default(),
            operating_since: Timestamp::now(),
        }
    }

    /// A job restarting into attempt 1, whose attempt-0 pods are still terminating.
    fn restarting_job() -> dinoflow_api::PretrainJob {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "dinoflow.dev/v1alpha1", "kind": "PretrainJob",
            "metadata": {"name": "r", "namespace": "ml", "uid": "uid-r", "resourceVersion": "7"},
            "spec": {"training": {"data": {"path": "/data"}}, "cluster": {"nodes": 2, "gpusPerNode": 0}},
            "status": {"phase": "Restarting", "runAttempt": 1, "restarts": 1},
        }))
        .expect("valid PretrainJob")
    }

    #[tokio::test]
    async fn a_job_is_not_acted_on_before_the_pod_cache_has_synced() {
        // The pod cache has not listed yet: the old gang's pods are unknown, not absent.
        let (pods, _writer) = reflector::store::<Pod>();
        let ctx = Arc::new(offline_context(pods));
        let action = reconcile(Arc::new(restarting_job()), ctx.clone())
            .await
            .expect("no API call is made (creating the next gang would fail here)");
        assert_eq!(action, Action::requeue(CACHE_SYNC_POLL));
    }

    /// A reconcile whose API call is never answered (a hung API server, a stalled proxy)
    /// gives up at its time limit instead of holding the job's worker for good.
    #[tokio::test]
    async fn a_reconcile_stuck_on_the_api_server_times_out() {
        // Accepts connections and never answers.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _silent = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        let (pods, mut writer) = reflector::store::<Pod>();
        writer.apply_watcher_event(&kube::runtime::watcher::Event::Init);
        writer.apply_watcher_event(&kube::runtime::watcher::Event::InitDone);
        let mut ctx = offline_context(pods);
        let config = kube::Config::new(format!("http://{addr}").parse().expect("valid URL"));
        ctx.client = kube::Client::try_from(config).expect("client");
        let limit = Duration::from_secs(1);
        let started = Instant::now();
        let error = reconcile_within(Arc::new(restarting_job()), Arc::new(ctx), limit)
            .await
            .expect_err("the API server never answers");
        assert!(matches!(error, Error::Timeout(_)), "{error}");
        // The limit, plus the bounded attempt to record the error in the status (5 s).
        let took = started.elapsed();
        assert!(
            took >= limit && took < limit + Duration::from_secs(8),
            "{took:?}"
        );
    }

    #[tokio::test]
    async fn a_failed_reconcile_backs_off_exponentially_per_job() {
        let (pods, mut writer) = reflector::store::<Pod>();
        writer.apply_watcher_event(&kube::runtime::watcher::Event::Init);
        writer.apply_watcher_event(&kube::runtime::watcher::Event::InitDone);
        let ctx = Arc::new(offline_context(pods));
        let job = Arc::new(restarting_job());
        let mut failures = Vec::new();
        for _ in 0..4 {
            let error = reconcile(job.clone(), ctx.clone())
                .await
                .expect_err("the API server is unreachable");
            error_policy(job.clone(), &error, ctx.clone());
            failures.push(ctx.backoff.failures("uid-r", Instant::now()));
        }
        assert_eq!(failures, [1, 2, 3, 4]);
        let counted = ctx
            .metrics
            .errors
            .with_label_values(&["PretrainJob", "kube"]);
        assert_eq!(counted.get(), 4);
        // A successful reconcile (here: of the job being deleted) starts the backoff over.
        let mut deleted = restarting_job();
        deleted.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
        reconcile(Arc::new(deleted), ctx.clone()).await.unwrap();
        assert_eq!(ctx.backoff.failures("uid-r", Instant::now()), 0);
    }

    /// A new job's gang takes two reconciles of one wave each: first its Secret, ConfigMap
    /// and Service together (and nothing that uses them), then its pods together with the
    /// status, which already counts them as pending; once they reach the cache nothing more
    /// is written.
    #[tokio::test]
    async fn a_new_gang_goes_out_in_two_single_wave_reconciles_and_its_status_once() {
        let fresh = serde_json::json!({
            "apiVersion": "dinoflow.dev/v1alpha1", "kind": "PretrainJob",
            "metadata": {"name": "f", "namespace": "ml", "uid": "uid-f", "resourceVersion": "3", "generation": 1},
            "spec": {"training": {"data": {"path": "/data"}}, "cluster": {"nodes": 2, "gpusPerNode": 0}},
        });
        let mut written = fresh.clone();
        written["metadata"]["resourceVersion"] = "4".into();
        let api = super::super::fake_api::FakeApi::start(written.clone()).await;
        let (ctx, mut writer) = fake_api_context(&api);
        let ctx = Arc::new(ctx);
        let job: dinoflow_api::PretrainJob = serde_json::from_value(fresh).unwrap();
        let targets = |writes: &[super::super::fake_api::Request]| {
            let mut t: Vec<String> = writes
                .iter()
                .map(|r| {
                    let resource = r.path.split('?').next().unwrap_or_default();
                    let tail: Vec<&str> = resource.rsplit('/').take(2).collect();
                    let what = if r.verb == "POST" { tail[0] } else { tail[1] };
                    format!("{} {what}", r.verb)
                })
                .collect();
            t.sort();
            t
        };

        // 1. The children, all three in flight at once; no pod, no status yet; again at once.
        api.expect_wave(3);
        let action = reconcile(Arc::new(job.clone()), ctx.clone()).await.unwrap();
        let (writes, together) = api.requests();
        assert_eq!(
            targets(&writes),
            ["POST configmaps", "POST secrets", "POST services"]
        );
        assert_eq!(together, 3, "the children go out together");
        assert_eq!(action, Action::requeue(Duration::ZERO));

        // 2. The pods and the status, in one wave; the status counts the pods on their way.
        api.expect_wave(3);
        let action = reconcile(Arc::new(job.clone()), ctx.clone()).await.unwrap();
        let (writes, together) = api.requests();
        assert_eq!(targets(&writes), ["PATCH f", "POST pods", "POST pods"]);
        assert_eq!(together, 3, "the pods and the status go out together");
        assert_ne!(action, Action::requeue(Duration::ZERO));
        let status = &writes.iter().find(|r| r.verb == "PATCH").unwrap().body["status"];
        assert_eq!(status["pods"]["pending"], 2, "{status}");
        assert_eq!(status["phase"], "Pending");
        let created: Vec<Pod> = (writes.iter())
            .filter(|r| r.verb == "POST")
            .map(|r| serde_json::from_value(r.body.clone()).unwrap())
            .collect();

        // 3. The job as written, its pods not in the cache yet (on their way): nothing to write.
        written["status"] = status.clone();
        let job: dinoflow_api::PretrainJob = serde_json::from_value(written).unwrap();
        api.expect_wave(0);
        reconcile(Arc::new(job.clone()), ctx.clone()).await.unwrap();
        assert_eq!(targets(&api.requests().0), Vec::<String>::new());

        // 4. The pods reach the cache (pending): the status is already right.
        for mut pod in created {
            pod.metadata.namespace.get_or_insert_with(|| "ml".into());
            writer.apply_watcher_event(&kube::runtime::watcher::Event::Apply(pod));
        }
        api.expect_wave(0);
        reconcile(Arc::new(job), ctx.clone()).await.unwrap();
        assert_eq!(targets(&api.requests().0), Vec::<String>::new());
    }

    /// A later attempt's children exist already: they are read first (here they turn out
    /// to be gone, and are created), all three together.
    #[tokio::test]
    async fn a_later_attempts_children_are_read_first_together() {
        let job = restarting_job();
        let api = super::super::fake_api::FakeApi::start(serde_json::to_value(&job).unwrap()).await;
        let (ctx, _writer) = fake_api_context(&api);
        api.expect_wave(3);
        let action = reconcile(Arc::new(job), Arc::new(ctx)).await.unwrap();
        let (writes, together) = api.requests();
        let verbs: Vec<&str> = writes.iter().map(|r| r.verb.as_str()).collect();
        assert_eq!(verbs, ["GET", "GET", "GET", "POST", "POST", "POST"]);
        assert_eq!(together, 3);
        assert_eq!(action, Action::requeue(Duration::ZERO));
    }

    #[test]
    fn the_gang_step_prepares_the_children_before_the_pods_and_nothing_when_none_is_missing() {
        assert_eq!(gang_step(&[], false), GangStep::Complete);
        assert_eq!(gang_step(&[], true), GangStep::Complete);
        assert_eq!(gang_step(&[0, 1], false), GangStep::Prepare);
        assert_eq!(gang_step(&[1], true), GangStep::CreatePods);
        let mut status = JobStatus {
            pods: Some(dinoflow_api::status::PodCounts {
                expected: 4,
                pending: 1,
                ..Default::default()
            }),
            ..Default::default()
        };
        count_in_flight(&mut status, GangStep::Prepare, 3);
        assert_eq!(
            status.pods.unwrap().pending,
            1,
            "no pod is created by a prepare"
        );
        count_in_flight(&mut status, GangStep::CreatePods, 3);
        assert_eq!(status.pods.unwrap().pending, 4);
    }

    #[test]
    fn children_are_read_first_only_when_an_earlier_gang_made_them() {
        let new = JobStatus::default();
        assert_eq!(children_expected(&new, 0), Expect::Absent);
        assert_eq!(children_expected(&new, 1), Expect::Present);
        let created = JobStatus {
            attempt_start_time: Some(Time(Timestamp::now())),
            ..Default::default()
        };
        assert_eq!(children_expected(&created, 0), Expect::Present);
    }

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
    fn an_event_note_is_cut_to_the_api_servers_limit_on_a_character_boundary() {
        assert_eq!(event_note("short".into()), "short");
        let long = "é".repeat(800); // 1600 bytes
        let cut = event_note(long);
        assert!(cut.len() <= 1024 && cut.ends_with(" …"), "{}", cut.len());
        assert!(cut.starts_with("éé"));
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
