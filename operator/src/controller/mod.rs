//! The two controllers (PretrainJob, DistillJob) over one shared Pod watch.

pub mod apply;
pub mod backoff;
mod events;
mod expectations;
#[cfg(test)]
mod fake_api;
mod job_records;
mod own_writes;
pub mod pod_stream;
mod prepared;
mod reconcile;

use std::sync::Arc;
use std::time::Duration;

use dinoflow_api::status::JobPhase;
use futures::{StreamExt, future};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use kube::runtime::controller::Config as ControllerConfig;
use kube::runtime::events::Reporter;
use kube::runtime::reflector::{self, ObjectRef, Store, reflector};
use kube::runtime::{Controller, WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use tokio_util::sync::CancellationToken;

pub use backoff::Backoff;
pub use events::Recorder;
pub use expectations::Expectations;
pub use own_writes::OwnStatusWrites;
pub use prepared::Prepared;
pub use reconcile::{error_policy, reconcile};

use crate::desired::LABEL_JOB;
use crate::health::Readiness;
use crate::job::{TeacherSource, TrainingJob};
use crate::leader::Leadership;
use crate::metrics::Metrics;
use crate::settings::Settings;

/// Shared state of both controllers.
pub struct Context {
    pub client: Client,
    pub settings: Settings,
    pub metrics: Metrics,
    pub leadership: Leadership,
    pub recorder: Recorder,
    /// Every pod labelled `dinoflow.dev/job`, from the one shared watch.
    pub pods: Store<Pod>,
    /// Pods created but not yet in `pods`.
    pub expectations: Expectations,
    /// Job versions this replica's status writes replaced.
    pub own_writes: OwnStatusWrites,
    /// Children verified for the pods of a job's next reconcile.
    pub prepared: Prepared,
    /// Consecutive failed reconciles by job.
    pub backoff: Backoff,
    /// When these controllers (and, in the operator, its progress endpoint) started: the
    /// earliest time a trainer's report could have been received.
    pub operating_since: Timestamp,
}

/// How many reconciles run at once per controller, unless [`Tuning`] says otherwise. A
/// reconcile makes at most one wave of concurrent writes (a gang's pods and the status), so 2
/// keep some 10 writes in flight. More only queues them inside the API server: in
/// bench/operator_scale.sh (200 jobs × 4 nodes, 2 loaded cores) 4 doubled the API server's
/// pod create time and the p99 reconcile (~0.47–0.81 s against ~0.24–0.33 s at 2) for no
/// faster burst (24–32 s to all pods against 23–30 s); 16 was 5× slower per pod apply than 4;
/// 1 had the lowest p99 (~0.22 s) but took 38 s. See bench/README.md.
pub const DEFAULT_CONCURRENCY: u16 = 2;
/// How long a shutdown waits for in-flight reconciles (the chart's grace period is 30 s).
const GRACEFUL_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(15);
/// Buffer of the shared pod stream per controller.
const SHARED_BUFFER: usize = 1024;

/// What the controllers watch.
#[derive(Clone, Debug, Default)]
pub struct Scope {
    /// Only this namespace (a namespaced install, or a test); None: the whole cluster.
    pub namespace: Option<String>,
}

impl Scope {
    fn api<K>(&self, client: &Client) -> Api<K>
    where
        K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
    {
        match &self.namespace {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
}

/// How hard the controllers drive the API server.
#[derive(Clone, Copy, Debug)]
pub struct Tuning {
    /// Reconciles running at once per controller (each makes up to a gang's worth of
    /// concurrent writes).
    pub concurrency: u16,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            concurrency: DEFAULT_CONCURRENCY,
        }
    }
}

/// Runs both controllers until `shutdown` is cancelled: `P` is the teacher-capable
/// pretraining kind, `D` the distillation kind whose teachers are `P`s
/// (`run::<PretrainJob, DistillJob>`).
pub async fn run<PretrainJob: TrainingJob, DistillJob: TrainingJob>(
    client: Client,
    settings: Settings,
    metrics: Metrics,
    leadership: Leadership,
    readiness: Readiness,
    scope: Scope,
    shutdown: CancellationToken,
) {
    let parts = Parts {
        client,
        settings,
        metrics,
        leadership,
        readiness,
        scope,
    };
    run_tuned::<PretrainJob, DistillJob>(parts, Tuning::default(), shutdown).await;
}

/// What the controllers are built from.
pub struct Parts {
    pub client: Client,
    pub settings: Settings,
    pub metrics: Metrics,
    pub leadership: Leadership,
    pub readiness: Readiness,
    pub scope: Scope,
}

/// [`run`] with explicit [`Tuning`].
pub async fn run_tuned<PretrainJob: TrainingJob, DistillJob: TrainingJob>(
    parts: Parts,
    tuning: Tuning,
    shutdown: CancellationToken,
) {
    let Parts {
        client,
        settings,
        metrics,
        leadership,
        readiness,
        scope,
    } = parts;
    let (pods, writer) = reflector::store::<Pod>();
    let (senders, mut receivers) = pod_stream::subscribers(2, SHARED_BUFFER);
    let (pretrain_pods, distill_pods) = (receivers.remove(0), receivers.remove(0));
    let pod_events = reflector(
        writer,
        watcher(
            scope.api::<Pod>(&client),
            watcher::Config::default().labels(LABEL_JOB),
        )
        .default_backoff()
        // The cache holds hundreds of pods; managed fields are the bulk of each and unused.
        .modify(|pod: &mut Pod| {
            pod.metadata.managed_fields = None;
        }),
    );
    let pod_watch = pod_stream::fan_out(pod_events, senders);

    let ctx = Arc::new(Context {
        recorder: Recorder::new(client.clone(), Reporter::from("dinoflow-operator")),
        client: client.clone(),
        settings,
        metrics: metrics.clone(),
        leadership,
        pods: pods.clone(),
        expectations: Expectations::default(),
        own_writes: OwnStatusWrites::default(),
        prepared: Prepared::default(),
        backoff: Backoff::default(),
        operating_since: Timestamp::now(),
    });
    let config = ControllerConfig::default().concurrency(tuning.concurrency);

    let pretrain = Controller::new(
        scope.api::<PretrainJob>(&client),
        watcher::Config::default().any_semantic(),
    )
    .owns_shared_stream(pretrain_pods)
    .with_config(config.clone())
    .graceful_shutdown_on(shutdown.clone().cancelled_owned());
    let pretrain_store = pretrain.store();

    let distill = Controller::new(
        scope.api::<DistillJob>(&client),
        watcher::Config::default().any_semantic(),
    )
    .owns_shared_stream(distill_pods)
    .with_config(config)
    .graceful_shutdown_on(shutdown.clone().cancelled_owned());
    let distill_store = distill.store();
    let students = distill_store.clone();
    // A teacher's change (e.g. it succeeded) wakes the DistillJobs that wait on it.
    let distill = distill.watches(
        scope.api::<PretrainJob>(&client),
        watcher::Config::default().any_semantic(),
        move |teacher: PretrainJob| {
            let ns = teacher.namespace();
            let name = teacher.name_any();
            students
                .state()
                .into_iter()
                .filter(|d| d.namespace() == ns)
                .filter(|d| d.teacher() == Some(TeacherSource::PretrainJob(name.clone())))
                .map(|d| ObjectRef::from_obj(&*d))
                .collect::<Vec<_>>()
        },
    );

    let pretrain = pretrain
        .run(
            reconcile::<PretrainJob>,
            error_policy::<PretrainJob>,
            ctx.clone(),
        )
        .for_each(|r| {
            if let Err(e) = r {
                tracing::debug!(error = %e, "PretrainJob controller");
            }
            future::ready(())
        });
    let distill = distill
        .run(
            reconcile::<DistillJob>,
            error_policy::<DistillJob>,
            ctx.clone(),
        )
        .for_each(|r| {
            if let Err(e) = r {
                tracing::debug!(error = %e, "DistillJob controller");
            }
            future::ready(())
        });

    let ready = {
        let (pods, pretrain_store, distill_store) =
            (pods.clone(), pretrain_store.clone(), distill_store.clone());
        async move {
            let synced = futures::future::join3(
                pods.wait_until_ready(),
                pretrain_store.wait_until_ready(),
                distill_store.wait_until_ready(),
            )
            .await;
            if let (Ok(()), Ok(()), Ok(())) = synced {
                readiness.set_ready(true);
                tracing::info!("caches synced; ready");
            }
        }
    };
    let gauges = phase_gauges(metrics, pretrain_store, distill_store, shutdown.clone());

    // A graceful shutdown waits for in-flight reconciles; bound it (controller-runtime's
    // GracefulShutdownTimeout) so the Lease is released before the pod's grace period ends and
    // a stuck API call cannot hold a stopping operator (or a test) forever. Dropping the
    // controllers aborts their reconciles.
    let overdue = async {
        shutdown.cancelled().await;
        tokio::time::sleep(GRACEFUL_SHUTDOWN_TIMEOUT).await;
    };
    tokio::select! {
        _ = pod_watch => tracing::warn!("pod watch ended"),
        _ = future::join4(pretrain, distill, ready, gauges) => {}
        _ = overdue => tracing::warn!(
            timeout_s = GRACEFUL_SHUTDOWN_TIMEOUT.as_secs(),
            "reconciles still running after the graceful shutdown timeout; aborting them"
        ),
    }
    tracing::info!("controllers stopped");
}

/// Refreshes the jobs-by-phase gauges from the controllers' caches.
async fn phase_gauges<PretrainJob: TrainingJob, DistillJob: TrainingJob>(
    metrics: Metrics,
    pretrain: Store<PretrainJob>,
    distill: Store<DistillJob>,
    shutdown: CancellationToken,
) {
    fn count<K: TrainingJob>(store: &Store<K>) -> Vec<(JobPhase, i64)> {
        let mut counts: Vec<(JobPhase, i64)> = JobPhase::ALL.iter().map(|p| (*p, 0)).collect();
        for job in store.state() {
            let phase = job.job_status().map(|s| s.phase()).unwrap_or_default();
            if let Some(slot) = counts.iter_mut().find(|(p, _)| *p == phase) {
                slot.1 += 1;
            }
        }
        counts
    }
    loop {
        metrics.set_jobs("PretrainJob", &count(&pretrain));
        metrics.set_jobs("DistillJob", &count(&distill));
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(10)) => {}
        }
    }
}
