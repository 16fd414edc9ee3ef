//! The gRPC endpoint trainers report progress to (`crds/proto/progress.proto`).
//!
//! Each report is checked against the job's token (HMAC of its uid and run attempt under the
//! operator's key, see [`crate::desired::secret`]) and its run attempt (not an earlier one), folded into the progress half of the
//! job's status, and written with its own field manager so the controller's fields are untouched.

use std::future::Future;
use std::time::{Duration, Instant};

use dinoflow_api::progress::progress_server::{Progress, ProgressServer};
use dinoflow_api::progress::{ProgressReport, ReportAck, progress_report::Event};
use dinoflow_api::status::{
    BestCheckpointRef, CheckpointRef, EvaluationResult, JobStatus, ReshardRef,
};
use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use tonic::{Request, Response, Status, Streaming};

use crate::desired::secret::progress_token;
use crate::job::{API_VERSION, JobKind};
use crate::leader::Leadership;
use crate::metrics::Metrics;
use crate::{Error, Result};

/// Field manager of the progress half of the status.
pub const FIELD_MANAGER: &str = "dinoflow-operator-progress";

/// Iteration reports are written at most this often per stream (the last one always is, and so
/// is the first report of a new curriculum phase: a phase shorter than this interval would
/// otherwise never appear in `status.curriculumPhase`).
const ITERATION_WRITE_INTERVAL: Duration = Duration::from_secs(1);
/// Heartbeats are written at most this often per stream.
const HEARTBEAT_WRITE_INTERVAL: Duration = Duration::from_secs(10);

/// A job as the progress endpoint needs it.
#[derive(Clone, Debug, PartialEq)]
pub struct JobSnapshot {
    pub uid: String,
    pub status: JobStatus,
}

/// Where jobs are read and progress is written; the API server in production, memory in tests.
pub trait JobStore: Send + Sync + 'static {
    fn get(
        &self,
        kind: JobKind,
        namespace: &str,
        name: &str,
    ) -> impl Future<Output = Result<Option<JobSnapshot>>> + Send;
    fn write_progress(
        &self,
        kind: JobKind,
        namespace: &str,
        name: &str,
        progress: &JobStatus,
    ) -> impl Future<Output = Result<()>> + Send;
}

/// The progress fields of `status` only (what [`FIELD_MANAGER`] owns).
pub fn progress_fields(status: &JobStatus) -> JobStatus {
    JobStatus {
        iteration: status.iteration,
        total_iterations: status.total_iterations,
        curriculum_phase: status.curriculum_phase.clone(),
        losses: status.losses.clone(),
        learning_rate: status.learning_rate,
        images_per_second: status.images_per_second,
        mfu: status.mfu,
        last_checkpoint: status.last_checkpoint.clone(),
        best_checkpoint: status.best_checkpoint.clone(),
        evaluations: status.evaluations.clone(),
        world_size: status.world_size,
        last_reshard: status.last_reshard.clone(),
        last_progress_time: status.last_progress_time.clone(),
        ..Default::default()
    }
}

/// Folds one report into the progress fields.
pub fn apply_report(progress: &mut JobStatus, report: &ProgressReport, now: Timestamp) {
    let now = Time(now);
    progress.last_progress_time = Some(now.clone());
    let as_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    match &report.event {
        None | Some(Event::Heartbeat(_)) => {}
        Some(Event::Iteration(it)) => {
            progress.iteration = Some(as_i64(it.iteration));
            if it.total_iterations > 0 {
                progress.total_iterations = Some(as_i64(it.total_iterations));
            }
            progress.curriculum_phase =
                (!it.curriculum_phase.is_empty()).then(|| it.curriculum_phase.clone());
            if !it.losses.is_empty() {
                progress.losses = it
                    .losses
                    .iter()
                    .filter(|(_, v)| v.is_finite())
                    .map(|(k, v)| (k.clone(), *v))
                    .collect();
            }
            progress.learning_rate = it.learning_rate.is_finite().then_some(it.learning_rate);
            progress.images_per_second = it
                .images_per_second
                .is_finite()
                .then_some(it.images_per_second);
            progress.mfu = it.mfu.filter(|m| m.is_finite());
        }
        Some(Event::Checkpoint(c)) => {
            if let (Some(metric), Some(value)) = (&c.best_metric, c.best_value) {
                progress.best_checkpoint = Some(BestCheckpointRef {
                    iteration: as_i64(c.iteration),
                    path: c.path.clone(),
                    metric: metric.clone(),
                    value,
                    time: now.clone(),
                });
            }
            progress.last_checkpoint = Some(CheckpointRef {
                iteration: as_i64(c.iteration),
                path: c.path.clone(),
                time: now,
            });
        }
        Some(Event::Started(st)) => {
            let as_i32 = |v: u32| i32::try_from(v).unwrap_or(i32::MAX);
            progress.world_size = Some(as_i32(st.world_size));
            if st.resumed && st.checkpoint_world_size != st.world_size {
                progress.last_reshard = Some(ReshardRef {
                    iteration: as_i64(st.checkpoint_iteration),
                    path: st.checkpoint_path.clone(),
                    from_world_size: as_i32(st.checkpoint_world_size),
                    to_world_size: as_i32(st.world_size),
                    time: now,
                });
            }
        }
        Some(Event::Evaluation(e)) => {
            let result = EvaluationResult {
                name: e.name.clone(),
                iteration: as_i64(e.iteration),
                metrics: e.metrics.iter().map(|(k, v)| (k.clone(), *v)).collect(),
                time: now,
            };
            match progress.evaluations.iter_mut().find(|r| r.name == e.name) {
                Some(slot) => *slot = result,
                None => progress.evaluations.push(result),
            }
        }
    }
}

/// Checks a `Bearer <token>` header value against the token of the job's `attempt`.
pub fn authorize(header: Option<&str>, key: &[u8], uid: &str, attempt: u32) -> Result<(), Status> {
    let presented = header
        .and_then(|h| h.strip_prefix("Bearer "))
        .ok_or_else(|| {
            Status::unauthenticated("missing `authorization: Bearer <token>` metadata")
        })?;
    let expected = progress_token(key, uid, attempt);
    // Constant-time comparison: the token is a secret.
    let same = presented.len() == expected.len()
        && presented
            .bytes()
            .zip(expected.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if same {
        Ok(())
    } else {
        Err(Status::permission_denied("token does not match the job"))
    }
}

/// The gRPC service.
pub struct ProgressService<S> {
    store: S,
    key: Vec<u8>,
    leadership: Leadership,
    metrics: Metrics,
}

impl<S: JobStore> ProgressService<S> {
    pub fn new(store: S, key: Vec<u8>, leadership: Leadership, metrics: Metrics) -> Self {
        Self {
            store,
            key,
            leadership,
            metrics,
        }
    }

    /// The tonic server for this service.
    pub fn into_server(self) -> ProgressServer<Self> {
        ProgressServer::new(self)
    }

    fn count(&self, result: &str) {
        self.metrics
            .progress_reports
            .with_label_values(&[result])
            .inc();
    }
}

/// Identity of the job a stream reports for.
#[derive(Clone, Debug, PartialEq, Eq)]
struct StreamJob {
    kind: JobKind,
    namespace: String,
    name: String,
}

#[tonic::async_trait]
impl<S: JobStore> Progress for ProgressService<S> {
    async fn report(
        &self,
        request: Request<Streaming<ProgressReport>>,
    ) -> Result<Response<ReportAck>, Status> {
        let header = request
            .metadata()
            .get(dinoflow_api::progress::AUTHORIZATION_METADATA)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let mut stream = request.into_inner();
        let mut job: Option<StreamJob> = None;
        let mut progress = JobStatus::default();
        let mut attempt = 0u32;
        let mut accepted = 0u64;
        let mut dirty = false;
        let mut last_write: Option<Instant> = None;
        // The phase the status shows now; a report that changes it is written at once.
        let mut written_phase: Option<String> = None;

        while let Some(report) = stream.next().await {
            let report = report?;
            let this = StreamJob {
                kind: JobKind::from_kind(&report.kind).ok_or_else(|| {
                    Status::invalid_argument(format!(
                        "kind must be PretrainJob or DistillJob, got {:?}",
                        report.kind
                    ))
                })?,
                namespace: report.namespace.clone(),
                name: report.job.clone(),
            };
            match &job {
                Some(j) if *j != this => {
                    self.count("rejected");
                    return Err(Status::invalid_argument("one stream reports for one job"));
                }
                Some(_) => {}
                None => {
                    let snapshot = self
                        .store
                        .get(this.kind, &this.namespace, &this.name)
                        .await
                        .map_err(|e| Status::unavailable(e.to_string()))?
                        .ok_or_else(|| {
                            Status::not_found(format!(
                                "{} {}/{} not found",
                                this.kind.as_str(),
                                this.namespace,
                                this.name
                            ))
                        })?;
                    // The token names the attempt, so a pod of an earlier attempt cannot
                    // claim the current one; the attempt it claims is then checked below.
                    if let Err(status) = authorize(
                        header.as_deref(),
                        &self.key,
                        &snapshot.uid,
                        report.run_attempt,
                    ) {
                        self.count("unauthorized");
                        return Err(status);
                    }
                    let current = snapshot.status.run_attempt.unwrap_or(0);
                    if i64::from(report.run_attempt) < i64::from(current) {
                        self.count("stale");
                        return Err(Status::failed_precondition(format!(
                            "run attempt {} is over; the job is at attempt {current}",
                            report.run_attempt
                        )));
                    }
                    attempt = report.run_attempt;
                    progress = progress_fields(&snapshot.status);
                    written_phase = progress.curriculum_phase.clone();
                    job = Some(this.clone());
                }
            }
            if report.run_attempt != attempt {
                self.count("rejected");
                return Err(Status::invalid_argument(
                    "run_attempt changed within a stream",
                ));
            }
            apply_report(&mut progress, &report, Timestamp::now());
            accepted += 1;
            dirty = true;
            self.count("accepted");
            let interval = match report.event {
                Some(Event::Iteration(_)) => Some(ITERATION_WRITE_INTERVAL),
                None | Some(Event::Heartbeat(_)) => Some(HEARTBEAT_WRITE_INTERVAL),
                _ => None,
            };
            let due = match (interval, last_write) {
                (Some(i), Some(t)) => t.elapsed() >= i,
                _ => true,
            } || progress.curriculum_phase != written_phase;
            if due {
                self.write(&this, &progress).await?;
                dirty = false;
                last_write = Some(Instant::now());
                written_phase = progress.curriculum_phase.clone();
            }
        }
        if let (true, Some(j)) = (dirty, &job) {
            self.write(j, &progress).await?;
        }
        Ok(Response::new(ReportAck { accepted }))
    }
}

impl<S: JobStore> ProgressService<S> {
    async fn write(&self, job: &StreamJob, progress: &JobStatus) -> Result<(), Status> {
        self.leadership
            .ensure()
            .map_err(|e| Status::unavailable(format!("{e}; retry against the leader")))?;
        self.store
            .write_progress(job.kind, &job.namespace, &job.name, progress)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))
    }
}

/// API resource of a job kind, for untyped access.
pub fn job_api_resource(kind: JobKind) -> ApiResource {
    let gvk = GroupVersionKind::gvk("dinoflow.dev", "v1alpha1", kind.as_str());
    let plural = match kind {
        JobKind::Pretrain => "pretrainjobs",
        JobKind::Distill => "distilljobs",
    };
    ApiResource::from_gvk_with_plural(&gvk, plural)
}

/// [`JobStore`] backed by the API server.
#[derive(Clone)]
pub struct KubeJobStore {
    client: kube::Client,
}

impl KubeJobStore {
    pub fn new(client: kube::Client) -> Self {
        Self { client }
    }

    fn api(&self, kind: JobKind, namespace: &str) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), namespace, &job_api_resource(kind))
    }
}

impl JobStore for KubeJobStore {
    async fn get(&self, kind: JobKind, namespace: &str, name: &str) -> Result<Option<JobSnapshot>> {
        let Some(obj) = self.api(kind, namespace).get_opt(name).await? else {
            return Ok(None);
        };
        let uid = obj
            .metadata
            .uid
            .clone()
            .ok_or(Error::MissingField("metadata.uid"))?;
        let status = match obj.data.get("status") {
            Some(s) => serde_json::from_value(s.clone()).map_err(|source| Error::Serde {
                what: "job status",
                source,
            })?,
            None => JobStatus::default(),
        };
        Ok(Some(JobSnapshot { uid, status }))
    }

    async fn write_progress(
        &self,
        kind: JobKind,
        namespace: &str,
        name: &str,
        progress: &JobStatus,
    ) -> Result<()> {
        let patch = serde_json::json!({
            "apiVersion": API_VERSION,
            "kind": kind.as_str(),
            "status": progress,
        });
        self.api(kind, namespace)
            .patch_status(
                name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
