//! From `kubectl apply` to a trained, checkpointed model on one machine: the shared local
//! control plane (kube-scheduler included), the CRDs from crds/, the real operator and the
//! local node agent (crate `dinoflow-node-agent`, tests/node-agent) running the operator's pods as trainer
//! processes. A small job derived from manifests/examples/tiny-cpu-fashion-mnist.yaml.
//!
//! The operator runs in-process (its controllers and its gRPC progress endpoint on an
//! ephemeral 127.0.0.1 port, scoped to the test's namespace), not as the `dinoflow-operator`
//! binary: nothing else to build, no port to guess, and each test stops its own operator
//! deterministically. scripts/demo.sh runs the binary. The trainer is built by
//! [`build_workspace_binary`] (cargo, into this test's target directory).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use dinoflow_api::contract::{LABEL_JOB, TRAINER_COMMAND};
use dinoflow_api::status::JobStatus;
use dinoflow_api::{DistillJob, PretrainJob};
use dinoflow_e2e::{NODE_LABEL, TestCluster, build_workspace_binary, repo_root, yaml_files};
use dinoflow_node_agent::{AgentConfig, NodeAgent, terminated_state};
use dinoflow_operator::controller::{self, Scope};
use dinoflow_operator::health::Readiness;
use dinoflow_operator::leader::Leadership;
use dinoflow_operator::metrics::Metrics;
use dinoflow_operator::progress::{KubeJobStore, ProgressService};
use dinoflow_operator::settings::Settings;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};
use serde_yaml_ng::Value;
use tokio_util::sync::CancellationToken;

const PROGRESS_KEY: &[u8] = b"e2e-training-progress-key";

/// The trainer binary, built once per test binary.
fn trainer() -> PathBuf {
    static TRAINER: OnceLock<PathBuf> = OnceLock::new();
    TRAINER
        .get_or_init(|| {
            build_workspace_binary("dinoflow-trainer", "dinoflow-trainer")
                .unwrap_or_else(|e| panic!("the e2e tests run the real trainer: {e}"))
        })
        .clone()
}

/// Control plane, CRDs, a namespace, an operator watching it and a node agent.
struct World {
    cluster: &'static TestCluster,
    client: Client,
    ns: String,
    agent: Option<NodeAgent>,
    stop_operator: CancellationToken,
    operator: tokio::task::JoinHandle<()>,
    progress: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    /// Agent root and host directories of the job's volumes; removed by [`World::stop`], so
    /// kept when a test fails.
    dir: PathBuf,
}

impl World {
    async fn start(prefix: &str) -> Self {
        let trainer = tokio::task::spawn_blocking(trainer).await.unwrap();
        let cluster = TestCluster::shared();
        install_crds(cluster);
        let client = cluster.client().await.expect("client for the test cluster");
        let ns = cluster.create_namespace(prefix).expect("namespace");

        let stop_operator = CancellationToken::new();
        let incoming = tonic::transport::server::TcpIncoming::bind("127.0.0.1:0".parse().unwrap())
            .expect("a port for the progress endpoint");
        let progress_addr = incoming.local_addr().unwrap();
        let metrics = Metrics::default();
        let service = ProgressService::new(
            KubeJobStore::new(client.clone()),
            PROGRESS_KEY.to_vec(),
            Leadership::always(),
            metrics.clone(),
        );
        let progress = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service.into_server())
                .serve_with_incoming_shutdown(incoming, stop_operator.clone().cancelled_owned()),
        );
        let settings = Settings {
            default_image: "dinoflow/trainer:e2e".into(),
            progress_endpoint: format!("http://{progress_addr}"),
            progress_key: PROGRESS_KEY.to_vec(),
        };
        let operator = tokio::spawn(controller::run::<PretrainJob, DistillJob>(
            client.clone(),
            settings,
            metrics,
            Leadership::always(),
            Readiness::default(),
            Scope {
                namespace: Some(ns.clone()),
            },
            stop_operator.clone(),
        ));

        let dir = tempfile::Builder::new()
            .prefix(&format!("{ns}-"))
            .tempdir()
            .unwrap()
            .keep();
        let config = AgentConfig::new(format!("local-{ns}"), dir.join("agent"))
            .binary(TRAINER_COMMAND, trainer)
            .label(NODE_LABEL, &ns);
        let agent = NodeAgent::start(client.clone(), config)
            .await
            .expect("node agent registers a schedulable Node");
        Self {
            cluster,
            client,
            ns,
            agent: Some(agent),
            stop_operator,
            operator,
            progress,
            dir,
        }
    }

    fn jobs(&self) -> Api<PretrainJob> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    /// `kubectl apply -f` of `manifest` (YAML) into the test's namespace.
    fn kubectl_apply(&self, manifest: &str) {
        let file = self.dir.join("job.yaml");
        std::fs::write(&file, manifest).unwrap();
        let file = file.to_string_lossy();
        self.cluster
            .kubectl(["apply", "-n", &self.ns, "-f", &file])
            .unwrap()
            .ok()
            .unwrap_or_else(|e| panic!("{e}"));
    }

    async fn status(&self, job: &str) -> JobStatus {
        self.jobs()
            .get(job)
            .await
            .expect("get job")
            .status
            .unwrap_or_default()
    }

    /// Polls the job's status until `done`; on timeout panics with the job's status and
    /// conditions, its pods, and every pod log's path and tail.
    async fn wait_status(
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

    async fn fail(&self, job: &str, what: &str) -> ! {
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

    async fn pods(&self, job: &str) -> Vec<Pod> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.ns);
        let lp = ListParams::default().labels(&format!("{LABEL_JOB}={job}"));
        let mut pods = pods.list(&lp).await.expect("list pods").items;
        pods.sort_by_key(|p| p.name_any());
        pods
    }

    async fn stop(mut self) {
        if let Some(agent) = self.agent.take() {
            agent
                .stop()
                .await
                .expect("node agent stops and removes its Node");
        }
        self.stop_operator.cancel();
        tokio::time::timeout(Duration::from_secs(20), &mut self.operator)
            .await
            .expect("the operator stops within 20 s")
            .expect("the operator does not panic");
        self.progress
            .await
            .unwrap()
            .expect("the progress endpoint shuts down cleanly");
        let _ = self
            .cluster
            .kubectl(["delete", "namespace", self.ns.as_str(), "--wait=false"]);
        std::fs::remove_dir_all(&self.dir).unwrap();
    }
}

/// The CRDs from crds/*.yaml, installed once per test binary like a user would.
fn install_crds(cluster: &TestCluster) {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let files = yaml_files(&repo_root().join("crds")).unwrap();
        cluster.install_crds(&files).expect("install CRDs");
    });
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The tiny Fashion-MNIST example made small: `nodes` pods, `epochs` × 6 iterations of 16
/// images, no evaluation, a checkpoint every `checkpoint_every` iterations and at the end,
/// written to a hostPath volume at /checkpoints (`host_dir`); the pods select the world's Node.
fn tiny_job(
    world: &World,
    name: &str,
    nodes: u32,
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
    set(&mut job, "spec.training.train.batchSizePerGpu", yaml("16"));
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
    // All local pods share the host's ports.
    set(
        &mut job,
        "spec.training.logging",
        yaml("{everyIterations: 1, metricsPort: 0}"),
    );
    let cluster = format!(
        r#"
nodes: {nodes}
gpusPerNode: 0
masterPort: {port}
terminationGracePeriodSeconds: 20
nodeSelector: {{"{NODE_LABEL}": "{ns}"}}
volumes:
  - name: checkpoints
    mountPath: /checkpoints
    hostPath: {{path: "{dir}", type: DirectoryOrCreate}}
podTemplate:
  env:
    # Two cores shared with the control plane and the other test.
    - {{name: DINOFLOW_THREADS, value: "1"}}
    - {{name: OMP_NUM_THREADS, value: "1"}}
    - {{name: RUST_LOG, value: info}}
    - {{name: NO_COLOR, value: "1"}}
"#,
        port = free_port(),
        ns = world.ns,
        nodes = nodes,
        dir = host_dir.display(),
    );
    set(&mut job, "spec.cluster", yaml(&cluster));
    serde_yaml_ng::to_string(&job).unwrap()
}

/// The log of a pod with its ANSI colour codes removed.
fn pod_log(world: &World, pod: &str) -> String {
    let agent = world.agent.as_ref().unwrap();
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
    let raw = std::fs::read_to_string(&logs[0]).unwrap();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pretrain_job_applied_with_kubectl_trains_on_the_local_node_to_a_verified_checkpoint() {
    let world = World::start("e2e-train").await;
    let out = world.dir.join("checkpoints");
    world.kubectl_apply(&tiny_job(&world, "tiny", 1, 2, 100, &out));

    let status = world
        .wait_status("tiny", "phase Succeeded", Duration::from_secs(120), |s| {
            s.phase.map(|p| p.as_str()) == Some("Succeeded")
        })
        .await;
    // Progress streamed by the trainer (its token and run attempt accepted by the operator).
    assert_eq!(status.iteration, Some(12), "{status:?}");
    assert_eq!(status.total_iterations, Some(12), "{status:?}");
    assert_eq!(status.restarts, Some(0));
    let checkpoint = status
        .last_checkpoint
        .clone()
        .expect("a checkpoint reported");
    assert_eq!(checkpoint.iteration, 12);
    // The trainer wrote to the claim's host directory through the path mapping.
    let ckpt = PathBuf::from(&checkpoint.path);
    assert!(ckpt.starts_with(out.join("tiny")), "{}", ckpt.display());
    assert!(
        ckpt.join("manifest.json").is_file(),
        "{} has no manifest.json",
        ckpt.display()
    );
    assert!(out.join("tiny/metrics.jsonl").is_file());

    // The env contract reached the process: the launcher logs what it read.
    let pods = world.pods("tiny").await;
    assert_eq!(pods.len(), 1);
    let pod = &pods[0];
    let port = pod.spec.as_ref().unwrap().containers[0]
        .ports
        .as_ref()
        .unwrap()[0]
        .container_port;
    let log = pod_log(&world, &pod.name_any());
    let launch = log
        .lines()
        .find(|l| l.contains("launching workers"))
        .unwrap_or_else(|| panic!("no launcher line in the log:\n{log}"));
    for expected in [
        "node_rank=0".to_string(),
        "nnodes=1".into(),
        "world_size=1".into(),
        format!("master=127.0.0.1:{port}"),
    ] {
        assert!(
            launch.contains(&expected),
            "{expected} missing in: {launch}"
        );
    }
    let s = pod.status.as_ref().unwrap();
    assert_eq!(s.phase.as_deref(), Some("Succeeded"));
    assert_eq!(s.pod_ip.as_deref(), Some("127.0.0.1"));
    let terminated = terminated_state(pod).expect("a terminated container");
    assert_eq!(terminated.exit_code, 0);
    world.stop().await;
}

/// A two-phase curriculum (`training.curriculum`): 6 iterations at 28px global crops, then 6
/// at 42px with 8 instead of 16 images. `status.curriculumPhase` goes from `base` to
/// `high-res` (polled faster than the operator's one write a second, so the first phase's
/// status is seen), and metrics.jsonl shows the crop size change after iteration 6.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_phase_curriculum_switches_crops_and_the_status_shows_the_phase() {
    let started = std::time::Instant::now();
    let world = World::start("e2e-curric").await;
    let out = world.dir.join("checkpoints");
    let mut job: Value =
        serde_yaml_ng::from_str(&tiny_job(&world, "curric", 1, 2, 100, &out)).unwrap();
    job["spec"]["training"]["curriculum"] = serde_yaml_ng::from_str(
        "{phases: [{name: high-res, startIteration: 6, globalCropsSize: 42, \
         localCropsSize: 21, batchSizePerGpu: 8}]}",
    )
    .unwrap();
    world.kubectl_apply(&serde_yaml_ng::to_string(&job).unwrap());

    let mut seen: Vec<String> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let status = loop {
        let status = world.status("curric").await;
        if let Some(p) = &status.curriculum_phase
            && seen.last() != Some(p)
        {
            seen.push(p.clone());
        }
        if status.phase.map(|p| p.as_str()) == Some("Succeeded") {
            break status;
        }
        if status.phase.is_some_and(|p| p.is_finished()) || tokio::time::Instant::now() > deadline {
            world.fail("curric", "phase Succeeded").await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status.iteration, Some(12), "{status:?}");
    assert_eq!(
        seen,
        ["base", "high-res"],
        "status.curriculumPhase over time"
    );
    assert_eq!(status.curriculum_phase.as_deref(), Some("high-res"));

    let text = std::fs::read_to_string(out.join("curric/metrics.jsonl")).unwrap();
    let crops: Vec<(u64, u64, u64)> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["type"] == "train")
        .map(|v| {
            let c = &v["curriculum"];
            (
                v["iteration"].as_u64().unwrap(),
                c["global_crops_size"].as_u64().unwrap(),
                c["batch_size_per_gpu"].as_u64().unwrap(),
            )
        })
        .collect();
    let expected: Vec<(u64, u64, u64)> = (1..=12)
        .map(|it| if it <= 6 { (it, 28, 16) } else { (it, 42, 8) })
        .collect();
    assert_eq!(crops, expected);
    world.stop().await;
    eprintln!("two-phase curriculum e2e: {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_trainer_restarts_the_gang_which_resumes_from_the_checkpoint_and_succeeds() {
    let world = World::start("e2e-restart").await;
    let out = world.dir.join("checkpoints");
    world.kubectl_apply(&tiny_job(&world, "resume", 1, 8, 6, &out));

    world
        .wait_status(
            "resume",
            "a checkpoint at iteration 6",
            Duration::from_secs(120),
            |s| s.last_checkpoint.as_ref().is_some_and(|c| c.iteration >= 6),
        )
        .await;
    // Kill the container's processes the hard way (no checkpoint on the way out).
    let pods = world.pods("resume").await;
    let pod = &pods[0];
    assert_eq!(pod.name_any(), "resume-a0-0");
    let container_id = pod
        .status
        .as_ref()
        .unwrap()
        .container_statuses
        .as_ref()
        .unwrap()[0]
        .container_id
        .clone()
        .unwrap();
    let pid: i32 = container_id
        .strip_prefix("local://")
        .unwrap()
        .parse()
        .unwrap();
    let killed = std::process::Command::new("kill")
        .args(["-KILL", "--", &format!("-{pid}")])
        .status()
        .unwrap();
    assert!(killed.success(), "kill the pod's process group {pid}");

    let status = world
        .wait_status(
            "resume",
            "phase Succeeded after one restart",
            Duration::from_secs(150),
            |s| s.phase.map(|p| p.as_str()) == Some("Succeeded"),
        )
        .await;
    // The trainer was killed after a verified checkpoint: the restart is charged to the
    // progress budget, not to backoffLimit (issue 15's checkpoint-aware budget).
    assert_eq!(status.progress_restarts, Some(1), "{status:?}");
    assert_eq!(status.restarts, Some(0), "{status:?}");
    assert!(
        status.attempt_checkpoint_iteration.is_some_and(|i| i >= 6),
        "{status:?}"
    );
    assert_eq!(status.run_attempt, Some(1), "{status:?}");
    assert_eq!(status.iteration, Some(48), "{status:?}");
    assert_eq!(
        status.last_checkpoint.as_ref().map(|c| c.iteration),
        Some(48)
    );

    let first = world.pods("resume").await;
    let failed = first.iter().find(|p| p.name_any() == "resume-a0-0");
    if let Some(failed) = failed {
        let t = terminated_state(failed).expect("a terminated container");
        assert_eq!(t.exit_code, 137, "SIGKILL is reported as 128 + 9");
    }
    let log = pod_log(&world, "resume-a1-0");
    let resumed = log
        .lines()
        .find(|l| l.contains("resumed from checkpoint"))
        .unwrap_or_else(|| panic!("attempt 1 did not resume:\n{log}"));
    let from: u64 = resumed
        .split("iteration=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no iteration in: {resumed}"));
    assert!(
        (6..48).contains(&from) && from.is_multiple_of(6),
        "{resumed}"
    );
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_node_job_trains_as_one_gang_over_tcp_between_two_local_pods() {
    let world = World::start("e2e-gang").await;
    let out = world.dir.join("checkpoints");
    world.kubectl_apply(&tiny_job(&world, "gang", 2, 2, 100, &out));

    let status = world
        .wait_status("gang", "phase Succeeded", Duration::from_secs(150), |s| {
            s.phase.map(|p| p.as_str()) == Some("Succeeded")
        })
        .await;
    assert_eq!(status.iteration, Some(12), "{status:?}");
    let checkpoint = status
        .last_checkpoint
        .clone()
        .expect("a checkpoint reported");
    assert!(
        PathBuf::from(&checkpoint.path)
            .join("manifest.json")
            .is_file()
    );

    // Both pods reached rank 0's port through MASTER_ADDR -> 127.0.0.1 and ended with the
    // same weights.
    let mut digests = Vec::new();
    for rank in 0..2 {
        let log = pod_log(&world, &format!("gang-a0-{rank}"));
        let launch = log
            .lines()
            .find(|l| l.contains("launching workers"))
            .unwrap_or_else(|| panic!("no launcher line in rank {rank}'s log:\n{log}"));
        for expected in [
            format!("node_rank={rank}"),
            "nnodes=2".into(),
            "world_size=2".into(),
        ] {
            assert!(
                launch.contains(&expected),
                "{expected} missing in: {launch}"
            );
        }
        assert!(launch.contains("master=127.0.0.1:"), "{launch}");
        let digest = log
            .lines()
            .find_map(|l| l.split("student_sha256=").nth(1))
            .and_then(|d| d.split_whitespace().next())
            .unwrap_or_else(|| panic!("no final digest in rank {rank}'s log:\n{log}"))
            .to_string();
        digests.push(digest);
    }
    assert_eq!(
        digests[0], digests[1],
        "the ranks ended with different weights"
    );
    world.stop().await;
}
