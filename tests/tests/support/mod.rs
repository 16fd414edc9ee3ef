//! The world of the e2e tests that run jobs (e2e_training.rs, e2e_reshard.rs,
//! e2e_observability.rs): a local control plane, the CRDs, an in-process operator with its
//! progress endpoint, and a node running the operator's pods. The node is the real one
//! ([`World::start`], `real.rs`: containers from the trainer image, pod IPs, CoreDNS) unless a
//! test needs what only the host-process node agent gives ([`World::start_on_agent`]: GPUs
//! advertised on a machine that has none, a worker's host pid to stop and signal).
//! (A `tests/<dir>/mod.rs` module: Cargo builds no test binary of its own from it.)
#![allow(dead_code)]
pub mod real;
pub mod replicas;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use dinoflow_api::contract::{LABEL_JOB, TRAINER_COMMAND};
use dinoflow_api::status::JobStatus;
use dinoflow_api::{DistillJob, PretrainJob};
use dinoflow_e2e::{NODE_LABEL, TestCluster, build_workspace_binary, repo_root, yaml_files};
use dinoflow_node_agent::{AgentConfig, Capacity, NodeAgent};
use dinoflow_operator::controller::{self, Scope};
use dinoflow_operator::desired::pods::DEFAULT_RUN_AS_USER;
use dinoflow_operator::health::Readiness;
use dinoflow_operator::leader::Leadership;
use dinoflow_operator::metrics::Metrics;
use dinoflow_operator::progress::{KubeJobStore, ProgressService};
use dinoflow_operator::settings::Settings;
use dinoflow_operator::tls::{self, ServerTls, TlsFiles};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};
use real::{DATASET_DIR, NODE_LABEL_VALUE, OPERATOR_HOST, RealWorld};
use serde_yaml_ng::Value;
use tokio_util::sync::CancellationToken;

pub const PROGRESS_KEY: &[u8] = b"e2e-training-progress-key";

/// The trainer binary, built once per test binary.
pub fn trainer() -> PathBuf {
    static TRAINER: OnceLock<PathBuf> = OnceLock::new();
    TRAINER
        .get_or_init(|| {
            build_workspace_binary("dinoflow-trainer", "dinoflow-trainer")
                .unwrap_or_else(|e| panic!("the e2e tests run the real trainer: {e}"))
        })
        .clone()
}

/// The progress endpoint's TLS files of the tests (`scripts/gen-test-certs.sh`).
pub fn test_tls_files() -> TlsFiles {
    let dir = repo_root().join("tests/data/tls");
    TlsFiles {
        cert: dir.join("server.crt"),
        key: dir.join("server.key"),
        ca: dir.join("ca.crt"),
    }
}

/// Control plane, CRDs, a namespace, an operator watching it and a node: the real node
/// (`real`) or a node agent (`agent`).
pub struct World {
    pub cluster: &'static TestCluster,
    pub client: Client,
    pub ns: String,
    pub agent: Option<NodeAgent>,
    pub real: Option<&'static RealWorld>,
    pub stop_operator: CancellationToken,
    /// The in-process operator; None in a world whose operator runs elsewhere
    /// ([`World::without_operator`]).
    pub operator: Option<tokio::task::JoinHandle<()>>,
    pub progress: Option<tokio::task::JoinHandle<Result<(), tonic::transport::Error>>>,
    /// The operator's metrics (what its `/metrics` serves).
    pub metrics: Metrics,
    /// Agent root and host directories of the job's volumes; removed by [`World::stop`], so
    /// kept when a test fails.
    pub dir: PathBuf,
}

impl World {
    /// A world on the binary's real node: the job's pods run as containers of the CPU trainer
    /// image, and reach the operator by its Service name.
    pub async fn start(prefix: &str) -> Self {
        let real = tokio::task::spawn_blocking(real::real_world).await.unwrap();
        let world = Self::with_operator(&real.cluster, prefix, Some(real), true).await;
        // The pods run as the image's user: the job's hostPath output directory must be
        // theirs, and its parents (a private temporary directory) open to them.
        std::fs::set_permissions(&world.dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let out = world.dir.join("checkpoints");
        std::fs::create_dir(&out).unwrap();
        let uid = DEFAULT_RUN_AS_USER as u32;
        std::os::unix::fs::chown(&out, Some(uid), Some(uid)).unwrap();
        world
    }

    /// A world on a node agent whose Node advertises `gpus` `nvidia.com/gpu` (there are none:
    /// a job asking for them runs that many trainer processes in its pod, on the CPU).
    pub async fn start_on_agent(prefix: &str, gpus: u32) -> Self {
        Self::on_agent(prefix, gpus, true).await
    }

    /// Control plane, CRDs, a namespace and a node agent; the test runs the operator.
    pub async fn without_operator(prefix: &str, gpus: u32) -> Self {
        Self::on_agent(prefix, gpus, false).await
    }

    async fn on_agent(prefix: &str, gpus: u32, run_operator: bool) -> Self {
        let trainer = tokio::task::spawn_blocking(trainer).await.unwrap();
        let cluster = TestCluster::shared();
        install_crds(cluster);
        let mut world = Self::with_operator(cluster, prefix, None, run_operator).await;
        let mut config = AgentConfig::new(format!("local-{}", world.ns), world.dir.join("agent"))
            .binary(TRAINER_COMMAND, trainer)
            .label(NODE_LABEL, &world.ns);
        config.capacity = Capacity::of_host(gpus);
        let agent = NodeAgent::start(world.client.clone(), config)
            .await
            .expect("node agent registers a schedulable Node");
        world.agent = Some(agent);
        world
    }

    /// The namespace and (when `run_operator`) the operator and its progress endpoint: on
    /// 127.0.0.1 for a node agent, on the bridge address as the Service `real::OPERATOR_HOST`
    /// for the real node.
    async fn with_operator(
        cluster: &'static TestCluster,
        prefix: &str,
        real: Option<&'static RealWorld>,
        run_operator: bool,
    ) -> Self {
        let client = cluster.client().await.expect("client for the test cluster");
        let ns = cluster.create_namespace(prefix).expect("namespace");
        let stop_operator = CancellationToken::new();
        let metrics = Metrics::default();
        let (operator, progress) = if run_operator {
            let (o, p) = start_operator(&client, &ns, real, &metrics, &stop_operator);
            (Some(o), Some(p))
        } else {
            (None, None)
        };
        let dir = tempfile::Builder::new()
            .prefix(&format!("{ns}-"))
            .tempdir()
            .unwrap()
            .keep();
        Self {
            cluster,
            client,
            ns,
            agent: None,
            real,
            stop_operator,
            operator,
            progress,
            metrics,
            dir,
        }
    }

    pub fn jobs(&self) -> Api<PretrainJob> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    /// `kubectl apply -f` of `manifest` (YAML) into the test's namespace.
    pub fn kubectl_apply(&self, manifest: &str) {
        let file = self.dir.join("job.yaml");
        std::fs::write(&file, manifest).unwrap();
        let file = file.to_string_lossy();
        self.cluster
            .kubectl(["apply", "-n", &self.ns, "-f", &file])
            .unwrap()
            .ok()
            .unwrap_or_else(|e| panic!("{e}"));
    }

    pub async fn status(&self, job: &str) -> JobStatus {
        self.jobs()
            .get(job)
            .await
            .expect("get job")
            .status
            .unwrap_or_default()
    }

    /// Polls the job's status until `done`; on timeout panics with the job's status and
    /// conditions, its pods, and every pod log's path and tail.
    pub async fn wait_status(
        &self,
        job: &str,
        what: &str,
        timeout: Duration,
        done: impl Fn(&JobStatus) -> bool,
    ) -> JobStatus {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let status = self.status(job).await;
            if done(&status) {
                return status;
            }
            if status.phase.is_some_and(|p| p.is_finished())
                || tokio::time::Instant::now() >= deadline
            {
                self.fail(
                    job,
                    &format!(
                        "job {job}: {what} (phase {:?})",
                        status.phase.map(|p| p.as_str())
                    ),
                )
                .await;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    pub async fn fail(&self, job: &str, what: &str) -> ! {
        let status = self.status(job).await;
        let conditions: Vec<String> = status
            .conditions
            .iter()
            .map(|c| format!("  {}={} {}: {}", c.type_, c.status, c.reason, c.message))
            .collect();
        let pods: Vec<String> = self
            .pods(job)
            .await
            .iter()
            .map(|p| {
                let s = p.status.clone().unwrap_or_default();
                format!(
                    "  {} phase={:?} node={:?}",
                    p.name_any(),
                    s.phase,
                    p.spec.as_ref().and_then(|s| s.node_name.clone())
                )
            })
            .collect();
        let mut logs = String::new();
        if self.real.is_some() {
            for pod in self.pods(job).await {
                let name = pod.name_any();
                let tail = self
                    .cluster
                    .kubectl(["logs", "-n", &self.ns, &name, "--tail", "25"])
                    .map(|o| format!("{}{}", o.stdout, o.stderr))
                    .unwrap_or_else(|e| e.to_string());
                logs += &format!("--- kubectl logs {name} (last lines) ---\n{tail}");
            }
        }
        for log in self.agent.as_ref().map(NodeAgent::logs).unwrap_or_default() {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(25).collect();
            logs += &format!("--- {} (last lines) ---\n", log.display());
            for line in tail.into_iter().rev() {
                logs += line;
                logs.push('\n');
            }
        }
        let kept = &self.dir;
        panic!(
            "timed out or failed waiting for {what}\nstatus: {status:?}\nconditions:\n{}\npods:\n{}\nlogs (kept under {}):\n{logs}",
            conditions.join("\n"),
            pods.join("\n"),
            kept.display()
        );
    }

    /// Where `path`, a path in the job's pods under the /checkpoints volume of [`tiny_job`]
    /// (host directory `host_dir`), is on the host. A node agent runs pods with host paths.
    pub fn host_path(&self, path: &str, host_dir: &Path) -> PathBuf {
        match self.real {
            Some(_) => host_dir.join(
                Path::new(path)
                    .strip_prefix("/checkpoints")
                    .unwrap_or_else(|_| panic!("{path} is not under /checkpoints")),
            ),
            None => PathBuf::from(path),
        }
    }

    pub async fn pods(&self, job: &str) -> Vec<Pod> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.ns);
        let lp = ListParams::default().labels(&format!("{LABEL_JOB}={job}"));
        let mut pods = pods.list(&lp).await.expect("list pods").items;
        pods.sort_by_key(|p| p.name_any());
        pods
    }

    pub async fn stop(mut self) {
        if let Some(agent) = self.agent.take() {
            agent
                .stop()
                .await
                .expect("node agent stops and removes its Node");
        }
        self.stop_operator.cancel();
        if let Some(mut operator) = self.operator.take() {
            tokio::time::timeout(Duration::from_secs(20), &mut operator)
                .await
                .expect("the operator stops within 20 s")
                .expect("the operator does not panic");
        }
        if let Some(progress) = self.progress.take() {
            progress
                .await
                .unwrap()
                .expect("the progress endpoint shuts down cleanly");
        }
        let _ = self
            .cluster
            .kubectl(["delete", "namespace", self.ns.as_str(), "--wait=false"]);
        std::fs::remove_dir_all(&self.dir).unwrap();
    }
}

/// The in-process operator of a world: its controllers and its gRPC progress endpoint on an
/// ephemeral port (127.0.0.1, or the real node's bridge address), scoped to `ns`, stopped by
/// `stop_operator`.
#[allow(clippy::type_complexity)]
fn start_operator(
    client: &Client,
    ns: &str,
    real: Option<&'static RealWorld>,
    metrics: &Metrics,
    stop_operator: &CancellationToken,
) -> (
    tokio::task::JoinHandle<()>,
    tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
) {
    let bind = match real {
        Some(r) => SocketAddr::new(r.host_ip, 0),
        None => "127.0.0.1:0".parse().unwrap(),
    };
    let incoming = tonic::transport::server::TcpIncoming::bind(bind)
        .expect("a port for the progress endpoint");
    let progress_addr = incoming.local_addr().unwrap();
    let service = ProgressService::new(
        KubeJobStore::new(client.clone()),
        PROGRESS_KEY.to_vec(),
        Leadership::always(),
        metrics.clone(),
    );
    // TLS as in production: the test CA's certificate covers 127.0.0.1 and the chart's
    // Service name, and the operator hands the CA to the pods, whose trainers verify the
    // endpoint against it.
    let progress_endpoint = match real {
        Some(_) => format!("https://{OPERATOR_HOST}:{}", progress_addr.port()),
        None => format!("https://{progress_addr}"),
    };
    let tls = ServerTls::load(&test_tls_files(), &progress_endpoint).expect("test TLS files");
    let progress = tokio::spawn(
        tls::server(Some(&tls))
            .expect("TLS server")
            .add_service(service.into_server())
            .serve_with_incoming_shutdown(incoming, stop_operator.clone().cancelled_owned()),
    );
    let settings = Settings {
        default_image: real.map_or("dinoflow/trainer:e2e".into(), |r| r.image.clone()),
        progress_endpoint,
        progress_key: PROGRESS_KEY.to_vec(),
        progress_ca: Some(tls.ca_pem.clone()),
    };
    let operator = tokio::spawn(controller::run::<PretrainJob, DistillJob>(
        client.clone(),
        settings,
        metrics.clone(),
        Leadership::always(),
        Readiness::default(),
        Scope {
            namespace: Some(ns.to_string()),
        },
        stop_operator.clone(),
    ));
    (operator, progress)
}

/// The CRDs from crds/*.yaml, installed once per cluster and test binary like a user would.
pub fn install_crds(cluster: &TestCluster) {
    static DONE: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());
    let mut done = DONE.lock().unwrap();
    if done.insert(cluster.kubeconfig().to_path_buf()) {
        let files = yaml_files(&repo_root().join("crds")).unwrap();
        cluster.install_crds(&files).expect("install CRDs");
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The tiny Fashion-MNIST example made small: `nodes` pods, `epochs` × 6 iterations of 16
/// images, no evaluation, a checkpoint every `checkpoint_every` iterations and at the end,
/// written to a hostPath volume at /checkpoints (`host_dir`); the pods select the world's Node.
/// On the real node the pods run the CPU trainer image (already imported: never pulled) and
/// read the dataset from a read-only hostPath volume.
pub fn tiny_job(
    world: &World,
    name: &str,
    nodes: u32,
    epochs: u64,
    checkpoint_every: u64,
    host_dir: &Path,
) -> String {
    tiny_job_on(
        world,
        name,
        (nodes, 0, 16),
        epochs,
        checkpoint_every,
        host_dir,
    )
}

/// [`tiny_job`] on `nodes` pods of `gpus_per_node` processes each (0: one CPU process), with
/// `batch` images per process and iteration.
pub fn tiny_job_on(
    world: &World,
    name: &str,
    (nodes, gpus_per_node, batch): (u32, u32, u32),
    epochs: u64,
    checkpoint_every: u64,
    host_dir: &Path,
) -> String {
    let example = repo_root().join("manifests/examples/tiny-cpu-fashion-mnist.yaml");
    let mut job: Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(&example).unwrap()).unwrap();
    let set = |v: &mut Value, path: &str, value: Value| {
        let mut at = v;
        let keys: Vec<&str> = path.split('.').collect();
        for k in &keys[..keys.len() - 1] {
            at = &mut at[*k];
        }
        at[keys[keys.len() - 1]] = value;
    };
    let yaml = |s: &str| -> Value { serde_yaml_ng::from_str(s).unwrap() };
    set(&mut job, "metadata.name", yaml(name));
    set(
        &mut job,
        "spec.training.optim.epochs",
        yaml(&epochs.to_string()),
    );
    set(
        &mut job,
        "spec.training.train.officialEpochLength",
        yaml("6"),
    );
    set(
        &mut job,
        "spec.training.train.batchSizePerGpu",
        yaml(&batch.to_string()),
    );
    set(
        &mut job,
        "spec.training.evaluation",
        yaml("{knn: {enabled: false}, linearProbe: {enabled: false}}"),
    );
    set(
        &mut job,
        "spec.training.checkpoint",
        yaml(&format!(
            "{{periodIterations: {checkpoint_every}, keepLast: 3}}"
        )),
    );
    set(
        &mut job,
        "spec.training.output.dir",
        yaml(&format!("/checkpoints/{name}")),
    );
    let real = world.real.is_some();
    // Pods of a node agent share the host's ports; on the real node each has its own network.
    set(
        &mut job,
        "spec.training.logging",
        yaml(if real {
            "{everyIterations: 1}"
        } else {
            "{everyIterations: 1, metricsPort: 0}"
        }),
    );
    let (port, node_label, image, dataset) = match world.real {
        Some(r) => (
            29500,
            NODE_LABEL_VALUE.to_string(),
            format!("image: {}\nimagePullPolicy: Never", r.image),
            format!(
                "  - {{name: dataset, mountPath: {DATASET_DIR}, readOnly: true, \
                 hostPath: {{path: {DATASET_DIR}, type: Directory}}}}"
            ),
        ),
        None => (free_port(), world.ns.clone(), String::new(), String::new()),
    };
    let cluster = format!(
        r#"
nodes: {nodes}
gpusPerNode: {gpus_per_node}
masterPort: {port}
terminationGracePeriodSeconds: 20
nodeSelector: {{"{NODE_LABEL}": "{node_label}"}}
{image}
volumes:
  - name: checkpoints
    mountPath: /checkpoints
    hostPath: {{path: "{dir}", type: DirectoryOrCreate}}
{dataset}
podTemplate:
  env:
    # Two cores shared with the control plane and the other test.
    - {{name: DINOFLOW_THREADS, value: "1"}}
    - {{name: OMP_NUM_THREADS, value: "1"}}
    - {{name: RUST_LOG, value: info}}
    - {{name: NO_COLOR, value: "1"}}
"#,
        nodes = nodes,
        gpus_per_node = gpus_per_node,
        dir = host_dir.display(),
    );
    set(&mut job, "spec.cluster", yaml(&cluster));
    serde_yaml_ng::to_string(&job).unwrap()
}

/// The log of a pod with its ANSI colour codes removed.
pub fn pod_log(world: &World, pod: &str) -> String {
    let raw = match &world.agent {
        Some(agent) => {
            let logs: Vec<PathBuf> = agent
                .logs()
                .into_iter()
                .filter(|l| {
                    l.parent()
                        .and_then(Path::file_name)
                        .is_some_and(|d| d.to_string_lossy().starts_with(&format!("{pod}-")))
                })
                .collect();
            assert_eq!(logs.len(), 1, "one log for pod {pod}: {logs:?}");
            std::fs::read_to_string(&logs[0]).unwrap()
        }
        // Through the kubelet's API, as a user would read it.
        None => world
            .cluster
            .kubectl(["logs", "-n", &world.ns, pod])
            .unwrap()
            .ok()
            .unwrap_or_else(|e| panic!("{e}")),
    };
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// SIGKILLs every process of `pod`'s trainer container (no checkpoint on the way out): through
/// containerd on the real node, the process group on a node agent.
pub async fn kill_pod_processes(world: &World, pod: &str) {
    let pods = world.pods(pod.rsplit_once("-a").unwrap().0).await;
    let p = pods
        .iter()
        .find(|p| p.name_any() == pod)
        .unwrap_or_else(|| panic!("no pod {pod}"));
    let container_id = p
        .status
        .as_ref()
        .unwrap()
        .container_statuses
        .as_ref()
        .unwrap()[0]
        .container_id
        .clone()
        .unwrap();
    if let Some(real) = world.real {
        real.node
            .kill_container(&container_id)
            .unwrap_or_else(|e| panic!("kill {pod}'s container: {e}"));
        return;
    }
    let pid = dinoflow_node_agent::container_pid(p).expect("the agent reported the pod's pid");
    let killed = std::process::Command::new("kill")
        .args(["-KILL", "--", &format!("-{pid}")])
        .status()
        .unwrap();
    assert!(killed.success(), "kill the pod's process group {pid}");
}
