//! Observability end to end: a real Prometheus (Debian's `prometheus`) scrapes a real run of
//! the operator and trainer on the local cluster, every query of every dashboard panel of the
//! chart returns data, a hung rank fires the stalled-run alert, and `kubectl dinoflow`
//! shows the run.
//!
//! Finding the trainer pods: Debian builds Prometheus without `kubernetes_sd_configs` ("field
//! kubernetes_sd_configs not found"), so the test stands in for that discovery: it lists the
//! namespace's pods from the API server and writes each one as Kubernetes pod discovery
//! would (`podIP:containerPort`, `__meta_kubernetes_pod_annotation_*`, pod name and phase)
//! into a `file_sd_configs` file. The scrape job then keeps and addresses them with the
//! relabelling a plain Prometheus applies to the `prometheus.io/*` annotations the operator
//! sets: what is scraped is decided by the pods' annotations, not by the test. The node
//! agent reports each pod's IP as 127.0.0.1, so `podIP:port` reaches the trainer's endpoint.
//! The operator runs in-process (not as a pod behind the chart's Service), so its `/metrics`
//! is a static target.
//!
//! It runs on the host-process node agent, not the real node: the job runs two trainer
//! processes in one pod, which needs a Node advertising `nvidia.com/gpu` (the operator gives a
//! pod one process per GPU), and only the agent's Node advertises GPUs this machine does not
//! have (without CUDA each process trains on the CPU). Stopping the second one with
//! SIGSTOP hangs the first in its gradient all-reduce while its metrics endpoint keeps
//! answering: the failure the stalled-run alert is for (a whole stopped process would
//! instead be an unreachable target, whose series Prometheus marks stale).
//!
//! Nothing here races the run: the job has far more iterations than the test can see
//! (60,000), so it is alive and scraped until the test has asked everything, and is deleted
//! at the end. Every wait is for a condition (a status, every query having data, the alert
//! firing) with a deadline generous enough for a loaded machine, never a fixed sleep.
mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dinoflow_e2e::{Prometheus, build_workspace_binary, find_binary, parse_manifests, repo_root};
use dinoflow_operator::health::{self, Readiness};
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use serde_json::Value;
use support::{World, free_port, tiny_job};
use tokio_util::sync::CancellationToken;

const JOB: &str = "observed";
/// Iterations of the observed run: more than any machine trains during the test (the tiny
/// model does a few per second), so the run never ends under it.
const ITERATIONS: u64 = 60_000;
/// The stalled-run rule's window and delay as the test sets them through the chart's values
/// (shipped: 15m and 5m). The window is many iterations long even on a loaded machine.
const STALL_WINDOW: &str = "30s";
const STALL_FOR: &str = "5s";
/// The Grafana variable `$__rate_interval` for a 1 s scrape interval: Grafana takes at least
/// four scrape intervals.
const RATE_INTERVAL: &str = "5s";

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn plugin() -> PathBuf {
    build_workspace_binary("dinoflow-operator", "kubectl-dinoflow")
        .unwrap_or_else(|e| panic!("the kubectl plugin: {e}"))
}

/// The chart's alert rules as its PrometheusRule ships them (`helm template` with
/// `prometheusRule.enabled`), the stalled-run window and delay set by the chart's
/// `prometheusRule.stalledRun` values to [`STALL_WINDOW`] and [`STALL_FOR`], as a plain rule
/// file (the PrometheusRule's spec).
fn chart_rules() -> String {
    let helm = find_binary("helm").unwrap_or_else(|e| panic!("{e}"));
    let out = std::process::Command::new(helm)
        .args(["template", "dinoflow"])
        .arg(repo_root().join("charts/dinoflow"))
        .args([
            "--show-only",
            "templates/prometheusrule.yaml",
            "--set",
            "prometheusRule.enabled=true",
            "--set",
            &format!("prometheusRule.stalledRun.window={STALL_WINDOW}"),
            "--set",
            &format!("prometheusRule.stalledRun.for={STALL_FOR}"),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "helm template: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let objects = parse_manifests(&String::from_utf8_lossy(&out.stdout)).unwrap();
    assert_eq!(objects.len(), 1, "one PrometheusRule");
    let rules = serde_yaml_ng::to_string(&objects[0].data["spec"]).unwrap();
    assert!(
        rules.contains(&format!(
            "changes(dinoflow_trainer_iteration[{STALL_WINDOW}])"
        )),
        "the chart did not apply prometheusRule.stalledRun.window:\n{rules}"
    );
    rules
}

fn prometheus_config(pods_file: &Path, operator_port: u16) -> String {
    format!(
        r#"
global: {{scrape_interval: 1s, evaluation_interval: 1s}}
rule_files: [dinoflow.rules.yaml]
scrape_configs:
  - job_name: dinoflow-trainers
    # Written by discover_pods as kubernetes_sd_configs (role: pod) would discover them.
    file_sd_configs:
      - files: ["{pods_file}"]
        refresh_interval: 1s
    relabel_configs:
      # The prometheus.io/* annotations, as Prometheus's example Kubernetes config reads them.
      - source_labels: [__meta_kubernetes_pod_annotation_prometheus_io_scrape]
        action: keep
        regex: "true"
      - source_labels: [__meta_kubernetes_pod_annotation_prometheus_io_path]
        regex: (.+)
        target_label: __metrics_path__
      - source_labels: [__address__, __meta_kubernetes_pod_annotation_prometheus_io_port]
        regex: ([^:]+)(?::\d+)?;(\d+)
        replacement: $1:$2
        target_label: __address__
      - source_labels: [__meta_kubernetes_pod_name]
        target_label: pod
  - job_name: dinoflow-operator
    static_configs: [{{targets: ["127.0.0.1:{operator_port}"]}}]
"#,
        pods_file = pods_file.display()
    )
}

/// Kubernetes pod discovery for Prometheus's file discovery: every container port of every
/// pod of `ns` with an IP as a target `podIP:port` (the IP alone without ports), with the
/// `__meta_kubernetes_*` labels the pod role gives (namespace, name, phase, annotations),
/// rewritten into `file` whenever it changes, until `stop`.
async fn discover_pods(client: kube::Client, ns: String, file: PathBuf, stop: CancellationToken) {
    let pods: Api<Pod> = Api::namespaced(client, &ns);
    let mut written = String::new();
    loop {
        if let Ok(list) = pods.list(&ListParams::default()).await {
            let groups: Vec<Value> = list.items.iter().filter_map(pod_targets).collect();
            let text = serde_json::to_string_pretty(&groups).unwrap();
            if text != written {
                // Renamed into place: Prometheus never reads half a file. (A failed write is
                // retried; it fails for good only once the world's directory is removed.)
                let tmp = file.with_extension("tmp");
                if std::fs::write(&tmp, &text)
                    .and_then(|()| std::fs::rename(&tmp, &file))
                    .is_ok()
                {
                    written = text;
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

/// One pod as a file-discovery target group (see [`discover_pods`]).
fn pod_targets(pod: &Pod) -> Option<Value> {
    let ip = pod.status.as_ref()?.pod_ip.clone()?;
    let meta = |name: &str| {
        let clean: String = name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        format!("__meta_kubernetes_pod_{clean}")
    };
    let mut labels = serde_json::Map::new();
    labels.insert(
        "__meta_kubernetes_namespace".into(),
        pod.namespace()?.into(),
    );
    labels.insert(meta("name"), pod.name_any().into());
    if let Some(phase) = pod.status.as_ref()?.phase.clone() {
        labels.insert(meta("phase"), phase.into());
    }
    for (k, v) in pod.annotations() {
        labels.insert(meta(&format!("annotation_{k}")), v.clone().into());
    }
    let mut targets: Vec<String> = pod
        .spec
        .as_ref()?
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .map(|p| format!("{ip}:{}", p.container_port))
        .collect();
    if targets.is_empty() {
        targets.push(ip);
    }
    Some(serde_json::json!({"targets": targets, "labels": labels}))
}

/// The tiny job of the e2e tests made observable: [`ITERATIONS`] iterations (it never ends
/// during the test) in one pod of two trainer processes, k-NN evaluation at the start (500
/// reference images), a checkpoint every 6 iterations, metrics on a free port, a peak FLOP/s
/// for the MFU estimate.
fn observed_job(world: &World, out: &Path) -> String {
    let mut job: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&tiny_job(world, JOB, 1, ITERATIONS / 6, 6, out)).unwrap();
    let yaml = |s: &str| -> serde_yaml_ng::Value { serde_yaml_ng::from_str(s).unwrap() };
    let training = &mut job["spec"]["training"];
    training["evaluation"] = yaml(
        "{periodIterations: 0, maxTrainImages: 500, knn: {enabled: true, k: [20]}, linearProbe: {enabled: false}}",
    );
    training["logging"] = yaml(&format!(
        "{{everyIterations: 1, metricsPort: {}}}",
        free_port()
    ));
    let cluster = &mut job["spec"]["cluster"];
    cluster["gpusPerNode"] = yaml("2");
    let env = cluster["podTemplate"]["env"].as_sequence_mut().unwrap();
    // An assumed peak of 100 GFLOP/s per process: the MFU series exists only with one.
    env.push(yaml("{name: DINOFLOW_PEAK_FLOPS, value: \"1e11\"}"));
    serde_yaml_ng::to_string(&job).unwrap()
}

/// Every PromQL query of the chart's dashboards with its variables filled in for this run,
/// named by dashboard and panel. A variable query `label_values(selector, label)` gives its
/// selector.
fn dashboard_queries(ns: &str) -> Vec<(String, String)> {
    let dir = repo_root().join("charts/dinoflow/files/dashboards");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    let fill = |q: &str| {
        q.replace("$__rate_interval", RATE_INTERVAL)
            .replace("$namespace", ns)
            .replace("$job", JOB)
    };
    let mut out = Vec::new();
    for file in files {
        let name = file.file_stem().unwrap().to_string_lossy().into_owned();
        let json: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        for panel in json["panels"].as_array().unwrap() {
            for t in panel["targets"].as_array().unwrap() {
                out.push((
                    format!(
                        "{name}: panel {:?} ({})",
                        panel["title"].as_str().unwrap(),
                        t["refId"].as_str().unwrap_or("?")
                    ),
                    fill(t["expr"].as_str().unwrap()),
                ));
            }
        }
        for var in json["templating"]["list"].as_array().unwrap() {
            if var["type"] == "query" {
                let q = var["query"].as_str().unwrap();
                let selector = q
                    .strip_prefix("label_values(")
                    .and_then(|s| s.rsplit_once(','))
                    .map(|(selector, _)| selector)
                    .unwrap_or_else(|| panic!("{name}: variable query {q}"));
                out.push((
                    format!("{name}: variable {}", var["name"].as_str().unwrap()),
                    fill(selector),
                ));
            }
        }
    }
    assert!(out.len() > 30, "only {} dashboard queries", out.len());
    out
}

/// The queries of `queries` that return no finite sample over `[start, end]` (asked as
/// Grafana asks, a range query; a NaN draws nothing), with why.
fn without_data(
    prometheus: &Prometheus,
    queries: &[(String, String)],
    start: f64,
    end: f64,
) -> Vec<String> {
    let finite = |series: &Value| {
        series["values"].as_array().is_some_and(|values| {
            values.iter().any(|v| {
                v[1].as_str()
                    .and_then(|x| x.parse::<f64>().ok())
                    .is_some_and(f64::is_finite)
            })
        })
    };
    queries
        .iter()
        .filter_map(
            |(origin, expr)| match prometheus.query_range(expr, start, end, 1.0) {
                Ok(series) if series.iter().any(finite) => None,
                Ok(series) => Some(format!(
                    "{origin}: no data for {expr} ({} series without a finite value)",
                    series.len()
                )),
                Err(e) => Some(format!("{origin}: {e}")),
            },
        )
        .collect()
}

/// Pid of the pod's trainer process of local rank `local_rank`: a child of the launcher
/// (the container's process, `local://PID`) with `LOCAL_RANK` set so.
fn worker_pid(launcher: u32, local_rank: u32) -> u32 {
    let want = format!("LOCAL_RANK={local_rank}");
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // `pid (comm) state ppid ...`; comm may hold spaces, so split after the last ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid != Some(launcher) {
            continue;
        }
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        if env.split(|b| *b == 0).any(|v| v == want.as_bytes()) {
            return pid;
        }
    }
    panic!("no child of {launcher} with {want}");
}

fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} {pid}");
}

fn stalled_alerts(prometheus: &Prometheus) -> Vec<Value> {
    prometheus
        .alerts()
        .unwrap()
        .into_iter()
        .filter(|a| {
            a["labels"]["alertname"] == "DinoflowRunStalled" && a["labels"]["job_name"] == JOB
        })
        .collect()
}

fn kubectl_dinoflow(plugin: &Path, world: &World, args: &[&str]) -> String {
    let out = std::process::Command::new(plugin)
        .arg("--kubeconfig")
        .arg(world.cluster.kubeconfig())
        .args(["-n", &world.ns])
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "kubectl dinoflow {args:?}: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// On a failed assertion, SIGKILLs the pod's trainer processes (every process whose command
/// line names the world's directory, where their config lives): the run has hours to go and
/// the in-process node agent does not outlive the test to end it.
struct EndTheRunOnPanic(String);

impl Drop for EndTheRunOnPanic {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&self.0) {
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
        }
    }
}

/// Every query of `queries` has data over `[from, now]`, or the deadline passes: the queries
/// still without data then.
async fn wait_for_data(
    prometheus: &Prometheus,
    queries: &[(String, String)],
    from: f64,
    deadline: Duration,
) -> Vec<String> {
    let until = std::time::Instant::now() + deadline;
    loop {
        let empty = without_data(prometheus, queries, from, unix_now());
        if empty.is_empty() || std::time::Instant::now() > until {
            return empty;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_returns_data_of_a_real_run_and_a_hung_rank_fires_the_stall_alert() {
    let started = std::time::Instant::now();
    let plugin = tokio::task::spawn_blocking(plugin).await.unwrap();
    let world = World::start_on_agent("e2e-observe", 2).await;
    let _end_the_run = EndTheRunOnPanic(world.dir.display().to_string());
    // The operator binary sets it once it leads; Leadership::always() leads from the start.
    world.metrics.leader.set(1);
    let operator_port = free_port();
    let operator_metrics = tokio::spawn(health::serve(
        ([127, 0, 0, 1], operator_port).into(),
        world.metrics.clone(),
        Readiness::default(),
        world.stop_operator.clone(),
    ));
    let pods_file = world.dir.join("pods.json");
    std::fs::write(&pods_file, "[]").unwrap();
    let discovery = tokio::spawn(discover_pods(
        world.client.clone(),
        world.ns.clone(),
        pods_file.clone(),
        world.stop_operator.clone(),
    ));
    let prometheus = Prometheus::start(
        &prometheus_config(&pods_file, operator_port),
        &[("dinoflow.rules.yaml", chart_rules())],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let from = unix_now();
    world.kubectl_apply(&observed_job(&world, &world.dir.join("checkpoints")));

    // ---- kubectl dinoflow on the running job, once it has been evaluated, trains and has
    // written a checkpoint.
    let status = world
        .wait_status(
            JOB,
            "an evaluation, iteration 7 and a checkpoint",
            Duration::from_secs(600),
            |s| {
                !s.evaluations.is_empty()
                    && s.iteration.is_some_and(|i| i >= 7)
                    && s.last_checkpoint.is_some()
            },
        )
        .await;
    let text = kubectl_dinoflow(&plugin, &world, &["status", JOB]);
    eprintln!("kubectl dinoflow status {JOB}:\n{text}");
    assert!(
        text.starts_with(&format!("PretrainJob {}/{JOB}\n", world.ns)),
        "{text}"
    );
    assert!(text.contains("Phase:       Running"), "{text}");
    let progress = text
        .lines()
        .find(|l| l.starts_with("Progress:"))
        .unwrap_or_else(|| panic!("no progress line:\n{text}"));
    // `[----------] 7/60000 iterations (0.0%)  ETA 3h02m`
    let bar = progress
        .split_once('[')
        .and_then(|(_, r)| r.split_once(']'))
        .map(|(bar, _)| bar)
        .unwrap_or_else(|| panic!("no bar in {progress}"));
    assert!(
        bar.len() == 30 && bar.chars().all(|c| c == '#' || c == '-'),
        "{progress}"
    );
    assert!(
        progress.contains(&format!("/{ITERATIONS} iterations (")),
        "{progress}"
    );
    assert!(
        progress.contains("ETA ") && !progress.contains("ETA -"),
        "{progress}"
    );
    assert!(text.contains(" images/s   MFU: "), "{text}");
    // DINOFLOW_PEAK_FLOPS is set: the estimate travels with the progress reports.
    assert!(!text.contains("MFU: -"), "{text}");
    let table = text
        .split_once("Evaluations:\n")
        .map(|(_, t)| t)
        .unwrap_or_else(|| panic!("no evaluation table:\n{text}"));
    let mut rows = table.lines();
    let header: Vec<&str> = rows.next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAME", "ITERATION", "METRIC", "VALUE"], "{text}");
    let evaluation = &status.evaluations[0];
    let row = rows
        .map(|r| r.split_whitespace().collect::<Vec<_>>())
        .find(|r| r[0] == evaluation.name)
        .unwrap_or_else(|| panic!("no row of {} in\n{table}", evaluation.name));
    assert_eq!(row[1], evaluation.iteration.to_string(), "{table}");
    assert!(evaluation.metrics.contains_key(row[2]), "{table}");
    let json: Value = serde_json::from_str(&kubectl_dinoflow(
        &plugin,
        &world,
        &["status", JOB, "-o", "json"],
    ))
    .unwrap();
    assert_eq!(json["totalIterations"], ITERATIONS, "{json}");
    assert!(json["mfu"].as_f64().is_some_and(|m| m > 0.0), "{json}");
    assert!(
        json["progress"]
            .as_f64()
            .is_some_and(|p| p > 0.0 && p < 1.0),
        "{json}"
    );
    assert_eq!(
        json["evaluations"][0]["name"],
        evaluation.name.as_str(),
        "{json}"
    );
    let checkpoints = kubectl_dinoflow(&plugin, &world, &["checkpoints", JOB]);
    eprintln!("kubectl dinoflow checkpoints {JOB}:\n{checkpoints}");
    assert!(
        checkpoints.contains("Last:        iteration "),
        "{checkpoints}"
    );

    // ---- every panel of every dashboard has data of the running job (the run cannot end
    // first: it has ITERATIONS to go).
    let queries = dashboard_queries(&world.ns);
    let empty = wait_for_data(&prometheus, &queries, from, Duration::from_secs(300)).await;
    if !empty.is_empty() {
        let targets: Vec<String> = prometheus
            .targets()
            .unwrap()
            .iter()
            .map(|t| format!("{} {} {}", t["scrapeUrl"], t["health"], t["lastError"]))
            .collect();
        panic!(
            "dashboard queries without data after 300 s of the run:\n{}\ntargets:\n{}\nprometheus log:\n{}",
            empty.join("\n"),
            targets.join("\n"),
            prometheus.log()
        );
    }
    // And every target is scraped whole now (a sample Prometheus refuses fails the whole
    // scrape, and panels would then hold only what came before it).
    let targets = prometheus.targets().unwrap();
    assert_eq!(
        targets.len(),
        2,
        "the trainer and the operator: {targets:?}"
    );
    for t in &targets {
        assert_eq!(t["health"], "up", "{t}");
    }
    let to = unix_now();
    // The check can fail: a panel of a metric nobody exports, or of another job, has no data.
    let broken = [
        (
            "renamed".to_string(),
            "dinoflow_trainer_no_such_metric".to_string(),
        ),
        (
            "other job".to_string(),
            format!("dinoflow_trainer_iteration{{job_name=\"not-{JOB}\"}}"),
        ),
    ];
    assert_eq!(without_data(&prometheus, &broken, from, to).len(), 2);
    // The variables' values include this run.
    let names: BTreeSet<String> = prometheus
        .query_range(
            &format!("dinoflow_trainer_iteration{{namespace=\"{}\"}}", world.ns),
            from,
            to,
            1.0,
        )
        .unwrap()
        .iter()
        .map(|s| s["metric"]["job_name"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(names, BTreeSet::from([JOB.to_string()]));
    eprintln!(
        "{} dashboard queries returned data after {:?}",
        queries.len(),
        started.elapsed()
    );

    // ---- a hung rank: stop local rank 1; rank 0 waits in its all-reduce and still serves
    // metrics, so its iteration stays put and the stalled-run alert fires.
    let pods = world.pods(JOB).await;
    let launcher = dinoflow_node_agent::container_pid(&pods[0]).expect("rank 0 is running");
    let rank1 = worker_pid(launcher, 1);
    // Quiet first: no stalled-run alert, pending or firing, while the run trains (a slow
    // start-up evaluation may have made one pending).
    let quiet_by = std::time::Instant::now() + Duration::from_secs(180);
    let quiet_at = loop {
        let now = unix_now();
        let alerts = stalled_alerts(&prometheus);
        if alerts.is_empty() {
            break now;
        }
        assert!(
            std::time::Instant::now() < quiet_by,
            "DinoflowRunStalled for 180 s of a training run: {alerts:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let before = world.status(JOB).await;
    assert_eq!(
        before.phase.map(|p| p.as_str()),
        Some("Running"),
        "{before:?}"
    );
    signal(rank1, "-STOP");
    let hang = std::time::Instant::now();
    let fired = loop {
        let alerts = stalled_alerts(&prometheus);
        if let Some(a) = alerts.iter().find(|a| a["state"] == "firing") {
            break a.clone();
        }
        if hang.elapsed() > Duration::from_secs(300) {
            signal(rank1, "-CONT");
            panic!(
                "DinoflowRunStalled did not fire within 300 s of the hang: {alerts:?}\nstatus: {:?}",
                world.status(JOB).await
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let fired_after = hang.elapsed();
    signal(rank1, "-CONT");
    assert_eq!(fired["labels"]["rank"], "0", "{fired}");
    assert_eq!(fired["labels"]["namespace"], world.ns.as_str(), "{fired}");
    let active_at: f64 = fired["activeAt"]
        .as_str()
        .and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok())
        .map(|t| t.as_millisecond() as f64 / 1000.0)
        .unwrap_or_else(|| panic!("no activeAt in {fired}"));
    // Pending only after the quiet check (an evaluation started up to one interval before it
    // may carry a slightly earlier timestamp).
    assert!(
        active_at > quiet_at - 1.5,
        "pending before the hang: {fired}"
    );
    eprintln!("DinoflowRunStalled fired {fired_after:?} after the hang: {fired}");

    // ---- the end: the job is deleted (it would train for hours), the world stopped.
    drop(prometheus);
    let pods = world.pods(JOB).await;
    assert!(pods.iter().all(|p| p.name_any().starts_with(JOB)));
    world
        .jobs()
        .delete(JOB, &Default::default())
        .await
        .expect("delete the job");
    eprintln!("test took {:?}", started.elapsed());
    world.stop().await;
    operator_metrics.await.unwrap().unwrap();
    discovery.await.unwrap();
}
