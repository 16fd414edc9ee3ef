//! `dinoflow-trainer launch` end to end through the binary, with the env contract the
//! operator's pods carry (operator/src/desired/pods.rs) and a tiny Fashion-MNIST config.
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{TinyJob, have_data};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The tiny job, `epochs` × 3 iterations, checkpoints every `checkpoint_every`.
fn config(dir: &Path, epochs: u32, checkpoint_every: u32) -> PathBuf {
    TinyJob {
        epochs,
        checkpoint_every,
        freeze_last_layer_epochs: 0,
        num_workers: 1,
        ..TinyJob::default()
    }
    .write(dir, "job.yaml")
}

/// The env of a one-node pod with `nproc` processes, as the operator writes it.
fn launch(mode: &str, config: &Path, out: &Path, nproc: u32, extra: &[&str]) -> Command {
    let port = free_port();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dinoflow-trainer"));
    cmd.args(["launch", mode, "--config"])
        .arg(config)
        .arg("--output-dir")
        .arg(out)
        .args(extra)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env(
            "LD_LIBRARY_PATH",
            std::env::var_os("LD_LIBRARY_PATH").unwrap_or_default(),
        )
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .env("NNODES", "1")
        .env("NODE_RANK", "0")
        .env(
            "NPROC_PER_NODE",
            if nproc == 1 { 0 } else { nproc }.to_string(),
        )
        .env("WORLD_SIZE", nproc.to_string())
        // A job name per run: ranks of concurrent tests can never join each other's gang.
        .env("DINOFLOW_JOB", format!("tiny-{port}"))
        .env("DINOFLOW_NAMESPACE", "ml")
        .env("DINOFLOW_RUN_ATTEMPT", "0")
        .env("DINOFLOW_CONFIG", config)
        // Reproducible reductions and a 2-core machine shared with other tests.
        .env("DINOFLOW_THREADS", "1")
        .env("OMP_NUM_THREADS", "1")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}

fn ok(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    stderr
}

fn train_lines(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["type"] == "train")
        .collect()
}

fn ckpt(out: &Path, it: u64) -> PathBuf {
    out.join("checkpoints").join(format!("ckpt-{it:09}"))
}

#[test]
fn a_cpu_pod_launches_one_worker_that_trains_and_exits_zero() {
    if !have_data() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 1, 2);
    let out = dir.path().join("out");
    let res = launch("train", &cfg, &out, 1, &["--max-iterations", "2"])
        .output()
        .unwrap();
    ok(&res);
    let lines = train_lines(&out);
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(ckpt(&out, 2).join("manifest.json").exists());
}

#[test]
fn a_pod_missing_a_contract_variable_exits_78_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 1, 2);
    for var in ["WORLD_SIZE", "MASTER_PORT", "NODE_RANK"] {
        let res = launch("train", &cfg, &dir.path().join("out"), 1, &[])
            .env_remove(var)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&res.stderr);
        assert_eq!(res.status.code(), Some(78), "{var}: {stderr}");
        assert!(stderr.contains(var), "{var}: {stderr}");
    }
    let res = launch("train", &cfg, &dir.path().join("out"), 2, &[])
        .env("WORLD_SIZE", "3")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert_eq!(res.status.code(), Some(78), "{stderr}");
    assert!(stderr.contains("WORLD_SIZE"), "{stderr}");
}

#[test]
fn two_distill_ranks_take_the_teacher_the_operator_resolved_and_end_identical() {
    if !have_data() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let teacher_out = dir.path().join("teacher");
    ok(
        &launch("train", &config(dir.path(), 1, 3), &teacher_out, 1, &[])
            .output()
            .unwrap(),
    );
    // The operator keeps `teacher.pretrainJob` resolvable through this variable.
    let cfg =
        TinyJob::default().write_distill(dir.path(), "distill.yaml", "{pretrainJob: tiny}", 64);
    let out = dir.path().join("out");
    let res = launch("distill", &cfg, &out, 2, &["--max-iterations", "2"])
        .env("DINOFLOW_TEACHER_CHECKPOINT", ckpt(&teacher_out, 3))
        .output()
        .unwrap();
    let stderr = ok(&res);
    let digests = final_digests(&stderr);
    assert_eq!(digests.len(), 2, "{stderr}");
    assert_eq!(digests[&0], digests[&1], "replicas diverged");
    assert_eq!(train_lines(&out).len(), 2);
    assert!(ckpt(&out, 2).join("student_ema.safetensors").exists());
    // Without it, `pretrainJob` cannot be resolved: a permanent failure naming the field.
    let res = launch("distill", &cfg, &dir.path().join("out2"), 1, &[])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert_eq!(res.status.code(), Some(78), "{stderr}");
    assert!(stderr.contains("spec.teacher.pretrainJob"), "{stderr}");
}

#[test]
fn a_bad_config_in_the_worker_reaches_the_operator_as_78() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.yaml");
    std::fs::write(&cfg, "training:\n  optim: {baseLr: -1}\n").unwrap();
    let res = launch("train", &cfg, &dir.path().join("out"), 1, &[])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert_eq!(res.status.code(), Some(78), "{stderr}");
    assert!(stderr.contains("baseLr"), "{stderr}");
}

#[test]
fn sigterm_to_the_launcher_checkpoints_the_worker_and_exits_143() {
    if !have_data() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // 300 iterations: far more than the test waits for.
    let cfg = config(dir.path(), 100, 1000);
    let out = dir.path().join("out");
    let mut child = launch("train", &cfg, &out, 1, &[]).spawn().unwrap();
    let started = Instant::now();
    while train_lines_if_any(&out) < 2 {
        assert!(started.elapsed() < Duration::from_secs(300), "no progress");
        if let Some(status) = child.try_wait().unwrap() {
            panic!("launcher exited early: {status}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let res = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert_eq!(res.status.code(), Some(143), "{stderr}");
    let done = train_lines(&out).len() as u64;
    assert!(
        ckpt(&out, done).join("manifest.json").exists(),
        "no checkpoint at the stop iteration {done}: {stderr}"
    );
}

fn train_lines_if_any(out: &Path) -> usize {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .map(|t| t.lines().filter(|l| l.contains("\"train\"")).count())
        .unwrap_or(0)
}

/// Removes ANSI colour sequences (the log formatter colours field names).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut in_escape = false;
    for c in s.chars() {
        match (in_escape, c) {
            (false, '\x1b') => in_escape = true,
            (true, 'm') => in_escape = false,
            (true, _) => {}
            (false, c) => out.push(c),
        }
    }
    out
}

/// `rank -> student_sha256` from the ranks' "final student weights" log lines.
fn final_digests(stderr: &str) -> std::collections::BTreeMap<u64, String> {
    let field = |line: &str, key: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .map(str::to_string)
    };
    strip_ansi(stderr)
        .lines()
        .filter(|l| l.contains("final student weights"))
        .filter_map(|l| {
            Some((
                field(l, "rank=")?.parse().ok()?,
                field(l, "student_sha256=")?,
            ))
        })
        .collect()
}

#[test]
fn two_ranks_on_one_node_end_bitwise_identical_and_resume_together() {
    if !have_data() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 2, 3);
    let out = dir.path().join("out");

    let first = ok(&launch("train", &cfg, &out, 2, &["--max-iterations", "3"])
        .output()
        .unwrap());
    let digests = final_digests(&first);
    assert_eq!(digests.len(), 2, "{first}");
    assert_eq!(digests[&0], digests[&1], "replicas diverged");
    // One writer: rank 0's lines only, and one checkpoint that records the world size.
    assert_eq!(train_lines(&out).len(), 3);
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(ckpt(&out, 3).join("manifest.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(manifest["worldSize"], 2, "{manifest}");

    // Both ranks resume from rank 0's checkpoint and stay together to the end.
    let second = ok(&launch("train", &cfg, &out, 2, &[]).output().unwrap());
    let resumed = final_digests(&second);
    assert_eq!(resumed.len(), 2, "{second}");
    assert_eq!(resumed[&0], resumed[&1], "replicas diverged after resume");
    assert_ne!(resumed[&0], digests[&0], "the resumed run did not train");
    let lines = train_lines(&out);
    let iterations: Vec<u64> = lines
        .iter()
        .map(|l| l["iteration"].as_u64().unwrap())
        .collect();
    assert_eq!(iterations, [1, 2, 3, 4, 5, 6]);
    assert!(
        lines
            .iter()
            .all(|l| l["losses"]["total_loss"].as_f64().unwrap().is_finite())
    );
    assert!(ckpt(&out, 6).join("manifest.json").exists());
}

mod operator_stand_in {
    use std::sync::{Arc, Mutex};

    use dinoflow_api::progress::progress_server::{Progress, ProgressServer};
    use dinoflow_api::progress::{ProgressReport, ReportAck};
    use tokio_stream::StreamExt;
    use tonic::{Request, Response, Status, Streaming};

    /// One stream: its authorization header and its reports.
    pub type Stream = (String, Vec<ProgressReport>);

    /// Records every stream.
    #[derive(Clone, Default)]
    pub struct Recorder {
        pub streams: Arc<Mutex<Vec<Stream>>>,
    }

    #[tonic::async_trait]
    impl Progress for Recorder {
        async fn report(
            &self,
            request: Request<Streaming<ProgressReport>>,
        ) -> Result<Response<ReportAck>, Status> {
            let auth = request
                .metadata()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            let index = {
                let mut s = self.streams.lock().unwrap();
                s.push((auth, Vec::new()));
                s.len() - 1
            };
            let mut stream = request.into_inner();
            let mut accepted = 0;
            while let Some(r) = stream.next().await {
                self.streams.lock().unwrap()[index].1.push(r?);
                accepted += 1;
            }
            Ok(Response::new(ReportAck { accepted }))
        }
    }

    pub fn serve(recorder: Recorder) -> (u16, tokio::runtime::Runtime) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        rt.spawn(
            tonic::transport::Server::builder()
                .add_service(ProgressServer::new(recorder))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        (port, rt)
    }
}

#[test]
fn rank_zero_alone_streams_progress_to_the_operator_with_the_jobs_token() {
    use dinoflow_api::progress::progress_report::Event;
    if !have_data() {
        return;
    }
    let recorder = operator_stand_in::Recorder::default();
    let (port, _server) = operator_stand_in::serve(recorder.clone());
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 1, 3);
    let out = dir.path().join("out");
    ok(&launch("train", &cfg, &out, 2, &[])
        .env(
            "DINOFLOW_PROGRESS_ENDPOINT",
            format!("http://127.0.0.1:{port}"),
        )
        .env("DINOFLOW_PROGRESS_TOKEN", "job-token")
        .env("DINOFLOW_JOB_KIND", "PretrainJob")
        .env("DINOFLOW_RUN_ATTEMPT", "4")
        .output()
        .unwrap());
    let streams = recorder.streams.lock().unwrap().clone();
    assert_eq!(streams.len(), 1, "only rank 0 reports");
    let (auth, reports) = &streams[0];
    assert_eq!(auth, "Bearer job-token");
    assert!(reports.iter().all(|r| r.namespace == "ml"
        && r.job.starts_with("tiny-")
        && r.kind == "PretrainJob"
        && r.run_attempt == 4));
    let last_iteration = reports
        .iter()
        .rev()
        .filter_map(|r| match &r.event {
            Some(Event::Iteration(it)) => Some(it.clone()),
            _ => None,
        })
        .next()
        .expect("iteration reports");
    assert_eq!(
        (last_iteration.iteration, last_iteration.total_iterations),
        (3, 3)
    );
    assert!(last_iteration.losses["total"].is_finite());
    assert!(last_iteration.learning_rate > 0.0);
    assert!(reports.iter().any(|r| matches!(&r.event,
        Some(Event::Checkpoint(c)) if c.iteration == 3 && c.path.ends_with("ckpt-000000003"))));
}

/// One pod of a `nodes`-node CPU gang (one process per pod) on `port`, in its own process
/// group so the test can kill the whole "pod" like a node loss would.
fn pod(config: &Path, out: &Path, port: u16, nodes: u32, node_rank: u32) -> Command {
    use std::os::unix::process::CommandExt;
    let mut cmd = launch("train", config, out, 1, &[]);
    cmd.env("MASTER_PORT", port.to_string())
        .env("DINOFLOW_JOB", format!("tiny-{port}"))
        .env("NNODES", nodes.to_string())
        .env("NODE_RANK", node_rank.to_string())
        .env("WORLD_SIZE", nodes.to_string())
        // Fail fast if the test is wrong, rather than after torchrun's 15 minutes.
        .env("DINOFLOW_RENDEZVOUS_TIMEOUT_SECONDS", "120")
        .process_group(0);
    cmd
}

#[test]
fn two_single_process_pods_train_as_one_gang_through_rank_zeros_port() {
    if !have_data() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 1, 3);
    // The checkpoint directory is shared storage, as a job's volume would be.
    let out = dir.path().join("out");
    let port = free_port();
    // Rank 1's pod starts first: it must wait for rank 0 instead of failing.
    let second = pod(&cfg, &out, port, 2, 1).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let first = pod(&cfg, &out, port, 2, 0).output().unwrap();
    let second = second.wait_with_output().unwrap();
    let (a, b) = (ok(&first), ok(&second));
    let (da, db) = (final_digests(&a), final_digests(&b));
    assert_eq!(da.keys().collect::<Vec<_>>(), [&0], "{a}");
    assert_eq!(db.keys().collect::<Vec<_>>(), [&1], "{b}");
    assert_eq!(da[&0], db[&1], "replicas on two pods diverged");
    assert!(ckpt(&out, 3).join("manifest.json").exists());
}

#[test]
fn when_one_pod_dies_the_other_exits_retryably_instead_of_hanging() {
    if !have_data() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 100, 1000);
    let out = dir.path().join("out");
    let port = free_port();
    let mut survivor = pod(&cfg, &out, port, 2, 0).spawn().unwrap();
    let mut victim = pod(&cfg, &out, port, 2, 1).spawn().unwrap();
    let started = Instant::now();
    while train_lines_if_any(&out) < 2 {
        assert!(started.elapsed() < Duration::from_secs(300), "no progress");
        assert!(
            survivor.try_wait().unwrap().is_none(),
            "rank 0 exited early"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Node loss: the launcher and its worker die at once.
    let group = rustix::process::Pid::from_raw(victim.id() as i32).unwrap();
    rustix::process::kill_process_group(group, rustix::process::Signal::KILL).unwrap();
    victim.wait().unwrap();
    let died = Instant::now();
    let res = survivor.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(
        died.elapsed() < Duration::from_secs(60),
        "took {:?}",
        died.elapsed()
    );
    let code = res.status.code().unwrap();
    assert!(
        ![0, 78, 79].contains(&code),
        "a lost peer must be retryable, got {code}: {stderr}"
    );
    assert!(stderr.contains("rank 1"), "{stderr}");
}

/// What a caching filesystem shows a lagging pod: rank 1 does not see the newest checkpoint
/// rank 0 resumes from yet (here: its view of the output directory lacks it). The ranks
/// disagree on where to start; that is retryable (the operator restarts the gang, charged to
/// backoffLimit, and the caches catch up), never 78, which would fail the job for good.
#[test]
fn ranks_that_see_different_newest_checkpoints_exit_retryably() {
    if !have_data() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 100, 3);
    let out = dir.path().join("out");
    // A one-pod run killed (like a node loss) once its first checkpoint exists.
    let mut first = pod(&cfg, &out, free_port(), 1, 0).spawn().unwrap();
    let started = Instant::now();
    while !ckpt(&out, 3).join("manifest.json").exists() {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "no checkpoint"
        );
        assert!(first.try_wait().unwrap().is_none(), "the first run exited");
        std::thread::sleep(Duration::from_millis(20));
    }
    let group = rustix::process::Pid::from_raw(first.id() as i32).unwrap();
    rustix::process::kill_process_group(group, rustix::process::Signal::KILL).unwrap();
    first.wait().unwrap();
    // Rank 1's stale view: the same directory without its newest checkpoint.
    let lagging = dir.path().join("lagging");
    let copied = Command::new("cp")
        .arg("-a")
        .arg(&out)
        .arg(&lagging)
        .status()
        .unwrap();
    assert!(copied.success());
    let mut listed: Vec<PathBuf> = std::fs::read_dir(lagging.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("ckpt-")
        })
        .collect();
    listed.sort();
    std::fs::remove_dir_all(listed.last().unwrap()).unwrap();

    let port = free_port();
    let zero = pod(&cfg, &out, port, 2, 0).spawn().unwrap();
    let one = pod(&cfg, &lagging, port, 2, 1).output().unwrap();
    let zero = zero.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&one.stderr);
    assert!(stderr.contains("rank 1 has start iteration"), "{stderr}");
    assert_eq!(one.status.code(), Some(1), "rank 1: {stderr}");
    let code = zero.status.code().unwrap();
    assert!(
        ![0, 78, 79].contains(&code),
        "rank 0 must exit retryably, got {code}: {}",
        String::from_utf8_lossy(&zero.stderr)
    );
}
