//! The operator against a real control plane, as operator_controller.rs and
//! operator_faults.rs run it: a namespace per test with its own operator scoped to it, and
//! the tests playing kubelet through the pod status subresource.
//! (A `tests/<dir>/mod.rs` module: Cargo builds no test binary of its own from it.)
#![allow(dead_code)]
use std::collections::BTreeMap;
use std::time::Duration;

use dinoflow_api::contract::{LABEL_JOB, LABEL_JOB_KIND, LABEL_RUN_ATTEMPT};
use dinoflow_api::status::JobStatus;
use dinoflow_api::{DistillJob, PretrainJob};
use dinoflow_e2e::TestCluster;
use dinoflow_operator::controller::{self, Scope};
use dinoflow_operator::health::Readiness;
use dinoflow_operator::leader::Leadership;
use dinoflow_operator::metrics::Metrics;
use dinoflow_operator::settings::Settings;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, CustomResourceExt, ResourceExt};
use serde_json::json;
use tokio_util::sync::CancellationToken;

pub const TIMEOUT: Duration = Duration::from_secs(60);

/// Installs the CRDs (generated from the Rust types) once per test binary.
pub async fn install_crds(client: &Client) {
    static DONE: tokio::sync::Mutex<bool> = tokio::sync::Mutex::const_new(false);
    let mut done = DONE.lock().await;
    if *done {
        return;
    }
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in [PretrainJob::crd(), DistillJob::crd()] {
        let name = crd.name_any();
        crds.patch(
            &name,
            &PatchParams::apply("dinoflow-tests").force(),
            &Patch::Apply(&crd),
        )
        .await
        .unwrap_or_else(|e| panic!("installing CRD {name}: {e}"));
        wait(TIMEOUT, &format!("CRD {name} established"), || async {
            let c = crds.get(&name).await.ok()?;
            let established = c
                .status?
                .conditions?
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            established.then_some(())
        })
        .await;
    }
    *done = true;
}

pub use dinoflow_e2e::wait_until as wait;

/// A namespace with an operator watching it.
pub struct Env {
    pub client: Client,
    pub ns: String,
    pub operator: Option<Operator>,
    /// The metrics of the operator `start` runs (its reconcile failures, by time).
    pub metrics: Metrics,
}

pub struct Operator {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

pub fn settings() -> Settings {
    Settings {
        default_image: "dinoflow/trainer:test".into(),
        progress_endpoint: "http://127.0.0.1:9090".into(),
        progress_key: b"integration-test-key".to_vec(),
        progress_ca: None,
    }
}

pub fn start_operator(client: &Client, ns: &str, leadership: Leadership) -> Operator {
    start_operator_with(client, ns, leadership, Metrics::default())
}

/// [`start_operator`] recording into `metrics`.
pub fn start_operator_with(
    client: &Client,
    ns: &str,
    leadership: Leadership,
    metrics: Metrics,
) -> Operator {
    let stop = CancellationToken::new();
    let task = tokio::spawn(controller::run::<PretrainJob, DistillJob>(
        client.clone(),
        settings(),
        metrics,
        leadership,
        Readiness::default(),
        Scope {
            namespace: Some(ns.to_string()),
        },
        stop.clone(),
    ));
    Operator { stop, task }
}

/// Reports a stop that needed the graceful-shutdown timeout (in the test's output on failure).
struct SlowStop(std::time::Instant);

impl Drop for SlowStop {
    fn drop(&mut self) {
        if self.0.elapsed() > Duration::from_secs(5) {
            eprintln!("operator stop took {:?}", self.0.elapsed());
        }
    }
}

impl Operator {
    pub async fn stop(self) {
        self.stop.cancel();
        let started = std::time::Instant::now();
        let _slow = SlowStop(started);
        tokio::time::timeout(Duration::from_secs(60), self.task)
            .await
            .expect("the operator stops within 60 s of cancellation")
            .expect("the operator task does not panic");
    }
}

impl Env {
    pub async fn start(prefix: &str) -> Self {
        let mut env = Self::without_operator(prefix).await;
        env.operator = Some(start_operator_with(
            &env.client,
            &env.ns,
            Leadership::always(),
            env.metrics.clone(),
        ));
        env
    }

    pub async fn without_operator(prefix: &str) -> Self {
        let cluster = TestCluster::shared();
        let client = cluster.client().await.expect("client for the test cluster");
        install_crds(&client).await;
        let ns = cluster.create_namespace(prefix).expect("namespace");
        Self {
            client,
            ns,
            operator: None,
            metrics: Metrics::default(),
        }
    }

    pub fn pretrain(&self) -> Api<PretrainJob> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    pub fn distill(&self) -> Api<DistillJob> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    pub fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    pub async fn create_pretrain(&self, name: &str, cluster: serde_json::Value) -> PretrainJob {
        let job: PretrainJob = serde_json::from_value(json!({
            "apiVersion": "dinoflow.dev/v1alpha1",
            "kind": "PretrainJob",
            "metadata": { "name": name },
            "spec": { "training": { "data": { "path": "/data/train" } }, "cluster": cluster },
        }))
        .expect("valid PretrainJob");
        self.pretrain()
            .create(&PostParams::default(), &job)
            .await
            .expect("create PretrainJob")
    }

    pub async fn status(&self, name: &str) -> JobStatus {
        self.pretrain()
            .get(name)
            .await
            .expect("get job")
            .status
            .unwrap_or_default()
    }

    pub async fn wait_status(
        &self,
        name: &str,
        what: &str,
        f: impl Fn(&JobStatus) -> bool,
    ) -> JobStatus {
        wait(TIMEOUT, what, || async {
            let s = self.status(name).await;
            f(&s).then_some(s)
        })
        .await
    }

    /// Pods of `job` (any attempt), sorted by name.
    pub async fn job_pods(&self, job: &str) -> Vec<Pod> {
        let lp = ListParams::default().labels(&format!("{LABEL_JOB}={job}"));
        let mut pods = self.pods().list(&lp).await.expect("list pods").items;
        pods.sort_by_key(|p| p.name_any());
        pods
    }

    /// Pods of the `kind` job named `job` (a PretrainJob and a DistillJob may share a name).
    pub async fn kind_pods(&self, kind: &str, job: &str) -> Vec<Pod> {
        let lp =
            ListParams::default().labels(&format!("{LABEL_JOB}={job},{LABEL_JOB_KIND}={kind}"));
        let mut pods = self.pods().list(&lp).await.expect("list pods").items;
        pods.sort_by_key(|p| p.name_any());
        pods
    }

    /// Events recorded on the job named `job`, oldest first.
    pub async fn events(&self, job: &str) -> Vec<Event> {
        let api: Api<Event> = Api::namespaced(self.client.clone(), &self.ns);
        let mut events: Vec<Event> = api
            .list(&ListParams::default())
            .await
            .expect("list events")
            .items
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(job))
            .collect();
        events.sort_by_key(|e| e.metadata.creation_timestamp.clone().map(|t| t.0));
        events
    }

    /// Waits until the job's pods are exactly those of `attempt`, `n` of them.
    pub async fn wait_gang(&self, job: &str, attempt: i32, n: usize) -> Vec<Pod> {
        wait(
            TIMEOUT,
            &format!("{n} pods of attempt {attempt}"),
            || async {
                let pods = self.job_pods(job).await;
                let all_current = pods
                    .iter()
                    .all(|p| p.labels().get(LABEL_RUN_ATTEMPT) == Some(&attempt.to_string()));
                (pods.len() == n && all_current).then_some(pods)
            },
        )
        .await
    }

    /// Waits until exactly `n` objects of kind `K` carry the job's label.
    pub async fn wait_children<K>(&self, job: &str, n: usize) -> Vec<K>
    where
        K: kube::Resource<Scope = kube::core::NamespaceResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
        K::DynamicType: Default,
    {
        let api: Api<K> = Api::namespaced(self.client.clone(), &self.ns);
        let selector = format!("{LABEL_JOB}={job}");
        wait(
            TIMEOUT,
            &format!("{n} {} of job {job}", K::kind(&Default::default())),
            || async {
                let items = api
                    .list(&ListParams::default().labels(&selector))
                    .await
                    .ok()?
                    .items;
                (items.len() == n).then_some(items)
            },
        )
        .await
    }

    /// Plays kubelet: marks a pod running.
    pub async fn run_pod(&self, name: &str) {
        let status = json!({ "status": {
            "phase": "Running",
            "containerStatuses": [{
                "name": "trainer", "image": "dinoflow/trainer:test", "imageID": "", "ready": true,
                "restartCount": 0, "state": { "running": { "startedAt": "2026-01-01T00:00:00Z" } }
            }]
        }});
        self.pods()
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .expect("set pod running");
    }

    /// Plays kubelet: the trainer container exited with `code`.
    pub async fn exit_pod(&self, name: &str, code: i32) {
        let phase = if code == 0 { "Succeeded" } else { "Failed" };
        let status = json!({ "status": {
            "phase": phase,
            "containerStatuses": [{
                "name": "trainer", "image": "dinoflow/trainer:test", "imageID": "", "ready": false,
                "restartCount": 0, "state": { "terminated": {
                    "exitCode": code, "reason": if code == 0 { "Completed" } else { "Error" },
                    "startedAt": "2026-01-01T00:00:00Z", "finishedAt": "2026-01-01T00:01:00Z"
                } }
            }]
        }});
        self.pods()
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .expect("set pod exit");
    }

    pub async fn stop(mut self) {
        if let Some(op) = self.operator.take() {
            op.stop().await;
        }
        let _ = TestCluster::shared().kubectl([
            "delete",
            "namespace",
            self.ns.as_str(),
            "--wait=false",
        ]);
    }
}

pub fn env_map(pod: &Pod) -> BTreeMap<String, String> {
    pod.spec.as_ref().unwrap().containers[0]
        .env
        .as_ref()
        .unwrap()
        .iter()
        .filter_map(|e| Some((e.name.clone(), e.value.clone()?)))
        .collect()
}
