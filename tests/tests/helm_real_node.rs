//! The production path on the local control plane with its real node (scripts/node.sh): the
//! images of `scripts/images.sh` imported into the node, `helm install` of the chart with two
//! operator replicas running as pods from the operator image under the chart's ServiceAccount
//! and RBAC (one leader holds the Lease, only it is Ready), a `kubectl apply`d tiny CPU job
//! whose trainer runs as a container on the node and reaches the leader's progress endpoint
//! through the headless Service, `helm upgrade` to a new image tag while a longer job runs
//! (leadership moves to a new-tag pod, the job's pods and attempt stay, progress keeps coming,
//! it succeeds), and `helm uninstall` (the CRDs, the jobs and their checkpoints stay).
//!
//! The node has no kube-proxy, so the operator reaches the API server through the chart's
//! `apiServer.*` values (the bridge address, where cluster.sh's API server also listens).
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use dinoflow_e2e::{
    REAL_NODE_NAME, RealNode, TestCluster, app_version, container_images, find_binary, repo_root,
    wait_for,
};
use serde_json::Value;

const NS: &str = "dinoflow-system";
const RELEASE: &str = "dinoflow";
const OPERATOR: &str = "dinoflow-operator";
const LEASE: &str = "dinoflow-operator-leader";
const OPERATOR_PODS: &str = "app.kubernetes.io/component=operator";
const DATASET: &str = "/usr/share/datasets/fashion-mnist";
/// Generous: under a load of 10+ a pod start or an election can take many seconds.
const TIMEOUT: Duration = Duration::from_secs(240);
/// Images an iteration of the tiny jobs (one CPU pod).
const BATCH: u32 = 16;

struct Env<'a> {
    cluster: &'a TestCluster,
    node: &'a RealNode,
    helm: std::path::PathBuf,
}

impl Env<'_> {
    fn kubectl(&self, args: &[&str]) -> String {
        self.cluster
            .kubectl(args)
            .expect("run kubectl")
            .ok()
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        serde_json::from_str(&self.kubectl(&all)).expect("kubectl -o json")
    }

    fn helm(&self, args: &[&str]) {
        let out = Command::new(&self.helm)
            .args(args)
            .args(["--namespace", NS, "--kubeconfig"])
            .arg(self.cluster.kubeconfig())
            .output()
            .expect("run helm");
        assert!(
            out.status.success(),
            "helm {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The operator pods: (name, image, Ready, phase, serviceAccountName).
    fn operator_pods(&self) -> Vec<(String, String, bool, String, String)> {
        let pods = self.json(&["get", "pods", "-n", NS, "-l", OPERATOR_PODS]);
        pods["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
            .map(|p| {
                let ready = p["status"]["conditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True");
                (
                    p["metadata"]["name"].as_str().unwrap().to_owned(),
                    p["spec"]["containers"][0]["image"]
                        .as_str()
                        .unwrap()
                        .to_owned(),
                    ready,
                    p["status"]["phase"].as_str().unwrap_or("").to_owned(),
                    p["spec"]["serviceAccountName"]
                        .as_str()
                        .unwrap_or("")
                        .to_owned(),
                )
            })
            .collect()
    }

    fn lease_holder(&self) -> Option<String> {
        let lease = self
            .cluster
            .kubectl(["get", "lease", LEASE, "-n", NS, "-o", "json"])
            .ok()?
            .ok()
            .ok()?;
        let lease: Value = serde_json::from_str(&lease).ok()?;
        lease["spec"]["holderIdentity"]
            .as_str()
            .filter(|h| !h.is_empty())
            .map(str::to_owned)
    }

    /// Waits until two operator pods of `image` run, the Lease names one of them and that one
    /// alone is Ready; returns the leader.
    fn wait_for_one_leader(&self, image: &str) -> String {
        let mut last = String::new();
        let leader = wait_for(TIMEOUT, || {
            let pods = self.operator_pods();
            let holder = self.lease_holder();
            last = format!("pods {pods:?}, lease holder {holder:?}");
            let holder = holder?;
            let ours = pods.len() == 2
                && pods
                    .iter()
                    .all(|(_, i, _, phase, _)| i == image && phase == "Running");
            let ready: Vec<&String> = pods.iter().filter(|p| p.2).map(|p| &p.0).collect();
            (ours && ready == [&holder]).then_some(holder)
        });
        leader.unwrap_or_else(|| {
            self.dump_operator_logs();
            panic!("no single Ready leader of image {image} within {TIMEOUT:?}: {last}")
        })
    }

    fn dump_operator_logs(&self) {
        for (pod, ..) in self.operator_pods() {
            if let Ok(out) = self.cluster.kubectl(["logs", "-n", NS, &pod, "--tail=80"]) {
                eprintln!("--- logs of {pod}:\n{}{}", out.stdout, out.stderr);
            }
        }
    }

    fn job(&self, ns: &str, name: &str) -> Value {
        self.json(&["get", "pretrainjob", name, "-n", ns])
    }

    /// Waits for the job to reach Succeeded, failing at once if it fails.
    fn wait_succeeded(&self, ns: &str, name: &str) -> Value {
        let mut last = Value::Null;
        let done = wait_for(TIMEOUT, || {
            last = self.job(ns, name);
            match last["status"]["phase"].as_str() {
                Some("Succeeded") => Some(true),
                Some("Failed") => Some(false),
                _ => None,
            }
        });
        if done != Some(true) {
            self.fail_with_logs(
                ns,
                &format!(
                    "{name} did not succeed within {TIMEOUT:?}: {:#}",
                    last["status"]
                ),
            );
        }
        last
    }

    /// Panics with `message` after the operator's and the job pods' logs (what a failure here
    /// is diagnosed from: the cluster goes with the test).
    fn fail_with_logs(&self, ns: &str, message: &str) -> ! {
        self.dump_operator_logs();
        for pod in self.pod_uids(ns).keys() {
            if let Ok(out) = self.cluster.kubectl(["logs", "-n", ns, pod]) {
                // Warnings (the progress client's among them) and the end; not every iteration.
                let lines: Vec<&str> = out.stdout.lines().collect();
                let tail = lines.len().saturating_sub(15);
                eprintln!("--- warnings and last lines of {pod}:");
                for (i, line) in lines.iter().enumerate() {
                    if i >= tail || !line.contains(" INFO ") {
                        eprintln!("{line}");
                    }
                }
                eprint!("{}", out.stderr);
            }
        }
        panic!("{message}");
    }

    /// The job's pods (its namespace holds nothing else): name -> UID; each must run as a
    /// container on the real node.
    fn pod_uids(&self, ns: &str) -> BTreeMap<String, String> {
        let pods = self.json(&["get", "pods", "-n", ns]);
        let subnet = self.node.env("SUBNET").unwrap().trim_end_matches("0/24");
        pods["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                let name = p["metadata"]["name"].as_str().unwrap().to_owned();
                let phase = &p["status"]["phase"];
                if phase == "Running" || phase == "Succeeded" {
                    assert_eq!(p["spec"]["nodeName"], REAL_NODE_NAME, "{name}");
                    let id = p["status"]["containerStatuses"][0]["containerID"]
                        .as_str()
                        .unwrap_or("");
                    assert!(id.starts_with("containerd://"), "{name}: {id}");
                }
                if phase == "Running" {
                    let ip = p["status"]["podIP"].as_str().unwrap_or("");
                    assert!(ip.starts_with(subnet), "{name} has IP {ip}");
                }
                (name, p["metadata"]["uid"].as_str().unwrap().to_owned())
            })
            .collect()
    }
}

/// A PersistentVolume on a node directory, bound in advance to the claim `ns/name`: storage an
/// admin provides (the chart's admission policy refuses hostPath volumes in jobs).
fn volume_and_claim(ns: &str, name: &str, host_dir: &Path, read_only: bool) -> String {
    let mode = if read_only {
        "ReadOnlyMany"
    } else {
        "ReadWriteOnce"
    };
    format!(
        r#"---
apiVersion: v1
kind: PersistentVolume
metadata: {{name: {ns}-{name}}}
spec:
  capacity: {{storage: 1Gi}}
  accessModes: [{mode}]
  persistentVolumeReclaimPolicy: Retain
  storageClassName: ""
  claimRef: {{namespace: {ns}, name: {name}}}
  hostPath: {{path: "{dir}", type: Directory}}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {{name: {name}, namespace: {ns}}}
spec:
  accessModes: [{mode}]
  storageClassName: ""
  volumeName: {ns}-{name}
  resources: {{requests: {{storage: 1Gi}}}}
"#,
        dir = host_dir.display()
    )
}

/// The tiny example, one CPU pod from the CPU trainer image on the node: `iterations`
/// iterations of [`BATCH`] images, no evaluation, checkpoints every 6 iterations to the
/// `checkpoints` claim, the dataset from the `dataset` claim.
fn tiny_job(ns: &str, name: &str, image: &str, iterations: u64) -> String {
    let example = repo_root().join("manifests/examples/tiny-cpu-fashion-mnist.yaml");
    let mut job: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(example).unwrap()).unwrap();
    let yaml = |s: &str| -> serde_yaml_ng::Value { serde_yaml_ng::from_str(s).unwrap() };
    job["metadata"]["name"] = yaml(name);
    job["metadata"]["namespace"] = yaml(ns);
    let training = &mut job["spec"]["training"];
    training["optim"] = yaml(&format!(
        "{{epochs: {}, warmupEpochs: 0, freezeLastLayerEpochs: 0, baseLr: 0.004}}",
        iterations.div_ceil(6)
    ));
    training["teacher"] = yaml("{warmupTeacherTempEpochs: 0}");
    training["train"] = yaml(&format!(
        "{{batchSizePerGpu: {BATCH}, officialEpochLength: 6}}"
    ));
    training["data"]["path"] = yaml("/data/train-images-idx3-ubyte.gz");
    training["data"]["valPath"] = yaml("/data/t10k-images-idx3-ubyte.gz");
    training["evaluation"] = yaml("{knn: {enabled: false}, linearProbe: {enabled: false}}");
    training["checkpoint"] = yaml("{periodIterations: 6, keepLast: 2}");
    training["output"]["dir"] = yaml(&format!("/checkpoints/{name}"));
    training["logging"] = yaml("{everyIterations: 1}");
    job["spec"]["cluster"] = yaml(&format!(
        r#"
nodes: 1
gpusPerNode: 0
image: {image}
imagePullPolicy: Never
terminationGracePeriodSeconds: 5
volumes:
  - {{name: dataset, mountPath: /data, readOnly: true, persistentVolumeClaim: {{claimName: dataset, readOnly: true}}}}
  - {{name: checkpoints, mountPath: /checkpoints, persistentVolumeClaim: {{claimName: checkpoints}}}}
podTemplate:
  env:
    # Two cores shared with the control plane and other tests.
    - {{name: DINOFLOW_THREADS, value: "1"}}
    - {{name: OMP_NUM_THREADS, value: "1"}}
    - {{name: NO_COLOR, value: "1"}}
"#
    ));
    serde_yaml_ng::to_string(&job).unwrap()
}

fn apply(env: &Env, manifest: &str) {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), manifest).unwrap();
    env.kubectl(&["apply", "-f", file.path().to_str().unwrap()]);
}

/// What a gang restart changes in the status (unset counts as 0).
fn counters(status: &Value) -> Vec<(&'static str, i64)> {
    ["runAttempt", "restarts", "progressRestarts", "disruptions"]
        .into_iter()
        .map(|k| (k, status[k].as_i64().unwrap_or(0)))
        .collect()
}

#[test]
fn helm_install_upgrade_and_uninstall_with_the_operator_as_pods_on_a_real_node() {
    let test_start = Instant::now();
    let version = app_version().unwrap();
    let images = container_images().unwrap_or_else(|e| panic!("{e}"));
    let operator_ref = format!("ghcr.io/dinoflow/dinoflow-operator:{version}");
    let trainer_ref = format!("ghcr.io/dinoflow/dinoflow-trainer:{version}-cpu");
    let next_tag = format!("{version}-next");
    let next_ref = format!("ghcr.io/dinoflow/dinoflow-operator:{next_tag}");
    eprintln!("images ready after {:.1?}", test_start.elapsed());

    let cluster = TestCluster::start_fresh().expect("control plane up");
    let node = RealNode::start(&cluster, &[]).expect("node up");
    let started = Instant::now();
    std::thread::scope(|s| {
        let node = &node;
        for reference in [&operator_ref, &trainer_ref] {
            let archive = &images[reference];
            s.spawn(move || node.import(archive).unwrap_or_else(|e| panic!("{e}")));
        }
    });
    // The new release's image: the same archive under the next tag, as a registry would
    // serve a re-tagged push.
    node.tag(&operator_ref, &next_ref)
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("images imported in {:.1?}", started.elapsed());

    let env = Env {
        cluster: &cluster,
        node: &node,
        helm: find_binary("helm").unwrap_or_else(|e| panic!("{e}")),
    };
    let chart = repo_root().join("charts/dinoflow");
    let chart = chart.to_str().unwrap();
    let api_host = node.env("APISERVER_HOST").expect("node.env APISERVER_HOST");
    let api_port = node.env("APISERVER_PORT").expect("node.env APISERVER_PORT");
    let values = [
        "--set".to_owned(),
        "replicaCount=2".to_owned(),
        "--set".to_owned(),
        "image.pullPolicy=Never".to_owned(),
        "--set".to_owned(),
        "operator.logFormat=text".to_owned(),
        // No kube-proxy: the API server at the bridge address, under a name its certificate
        // has (values.yaml, scripts/NODE.md).
        "--set".to_owned(),
        "apiServer.host=kubernetes.default.svc".to_owned(),
        "--set".to_owned(),
        format!("apiServer.port={api_port}"),
        "--set".to_owned(),
        format!("apiServer.address={api_host}"),
    ];
    let values: Vec<&str> = values.iter().map(String::as_str).collect();

    // --- install: two replicas, one leader, only it Ready, under the chart's identity.
    let started = Instant::now();
    let mut install = vec!["install", RELEASE, chart, "--create-namespace"];
    install.extend(&values);
    env.helm(&install);
    let leader = env.wait_for_one_leader(&operator_ref);
    eprintln!(
        "helm install: leader {leader} after {:.1?}",
        started.elapsed()
    );
    for (pod, _, _, _, account) in env.operator_pods() {
        assert_eq!(
            account, OPERATOR,
            "{pod} runs as the chart's ServiceAccount"
        );
    }

    // --- storage an admin provides: the dataset (read-only) and a checkpoint directory.
    let ns = cluster.create_namespace("train").unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let checkpoints = scratch.path().join("checkpoints");
    std::fs::create_dir(&checkpoints).unwrap();
    // The trainer runs as uid 1000.
    Command::new("chmod")
        .arg("0777")
        .arg(&checkpoints)
        .status()
        .unwrap();
    Command::new("chmod")
        .arg("0755")
        .arg(scratch.path())
        .status()
        .unwrap();
    apply(
        &env,
        &format!(
            "{}{}",
            volume_and_claim(&ns, "dataset", Path::new(DATASET), true),
            volume_and_claim(&ns, "checkpoints", &checkpoints, false)
        ),
    );

    // --- a tiny job to Succeeded, its trainer a container on the node.
    let started = Instant::now();
    apply(&env, &tiny_job(&ns, "tiny", &trainer_ref, 6));
    // Its trainer runs as a container on the node (pod_uids checks node, IP and container).
    let started_pod = wait_for(TIMEOUT, || {
        let pods = env.json(&["get", "pods", "-n", &ns]);
        pods["items"].as_array()?.iter().find_map(|p| {
            let phase = p["status"]["phase"].as_str()?;
            (phase == "Running" || phase == "Succeeded").then_some(())
        })?;
        Some(env.pod_uids(&ns))
    });
    assert!(started_pod.is_some(), "no running pod for the tiny job");
    let tiny = env.wait_succeeded(&ns, "tiny");
    // The trainer's own throughput (BATCH images an iteration), with half again for the
    // checkpoint every 6 iterations; timing the status from outside mostly measures the
    // pod's start.
    let per_iteration = tiny["status"]["imagesPerSecond"]
        .as_f64()
        .filter(|ips| *ips > 0.0)
        .map_or(Duration::from_secs(1), |ips| {
            Duration::from_secs_f64(1.5 * f64::from(BATCH) / ips)
        });
    eprintln!(
        "tiny job Succeeded {:.1?} after kubectl apply (~{per_iteration:.1?} per iteration)",
        started.elapsed()
    );
    assert_eq!(tiny["status"]["iteration"], 6, "{:#}", tiny["status"]);
    assert_eq!(
        tiny["status"]["lastCheckpoint"]["iteration"], 6,
        "{:#}",
        tiny["status"]
    );

    // --- helm upgrade to the next tag while a longer job runs. Its length comes from the
    // speed just measured: long enough to outlast the hand-over, short enough to keep the test
    // fast.
    // The hand-over (old pods stopped, new ones started, elected, probed Ready) takes 4-13 s
    // here idle, ~40 s by hand on the loaded 2-core VM.
    let iterations = ((Duration::from_secs(60).as_secs_f64() / per_iteration.as_secs_f64()) as u64)
        .clamp(40, 3000);
    apply(&env, &tiny_job(&ns, "long", &trainer_ref, iterations));
    let before = wait_for(TIMEOUT, || {
        let job = env.job(&ns, "long");
        (job["status"]["iteration"].as_i64().unwrap_or(0) >= 2).then_some(job)
    })
    .expect("the long job reports progress");
    let pods_before = env.pod_uids(&ns);
    let long_pods: BTreeMap<_, _> = pods_before
        .into_iter()
        .filter(|(p, _)| p.starts_with("long-"))
        .collect();
    assert_eq!(long_pods.len(), 1, "{long_pods:?}");
    let started = Instant::now();
    let tag_value = format!("image.tag={next_tag}");
    let mut upgrade = vec!["upgrade", RELEASE, chart, "--set", &tag_value];
    upgrade.extend(&values);
    env.helm(&upgrade);
    let new_leader = env.wait_for_one_leader(&next_ref);
    let handed_over = env.job(&ns, "long");
    eprintln!(
        "helm upgrade: leader {leader} -> {new_leader} after {:.1?}, job at iteration {} of {iterations}",
        started.elapsed(),
        handed_over["status"]["iteration"]
    );
    assert_ne!(new_leader, leader);
    assert_eq!(
        handed_over["status"]["phase"], "Running",
        "the job must still run when the new leader takes over (make it longer): {:#}",
        handed_over["status"]
    );
    // Progress reaches the new leader through the headless Service.
    let reported = handed_over["status"]["iteration"].as_i64().unwrap_or(0);
    let moved = wait_for(TIMEOUT, || {
        let job = env.job(&ns, "long");
        (job["status"]["iteration"].as_i64().unwrap_or(0) > reported
            || job["status"]["phase"] == "Succeeded")
            .then_some(())
    });
    assert!(moved.is_some(), "no progress reported to the new leader");
    let long_pods_now = |env: &Env| -> BTreeMap<String, String> {
        env.pod_uids(&ns)
            .into_iter()
            .filter(|(p, _)| p.starts_with("long-"))
            .collect()
    };
    let pods_after = long_pods_now(&env);
    // Gone only if the operator already cleaned up a Succeeded job's pods.
    if !pods_after.is_empty() {
        assert_eq!(pods_after, long_pods, "the upgrade replaced the job's pods");
    }
    let long = env.wait_succeeded(&ns, "long");
    assert_eq!(
        counters(&long["status"]),
        counters(&before["status"]),
        "the upgrade restarted the job: {:#}",
        long["status"]
    );
    if long["status"]["iteration"] != iterations.div_ceil(6) * 6 {
        env.fail_with_logs(
            &ns,
            &format!(
                "the long job's last progress report did not reach the new leader: expected \
                 iteration {}: {:#}",
                iterations.div_ceil(6) * 6,
                long["status"]
            ),
        );
    }
    let pods_after = long_pods_now(&env);
    if !pods_after.is_empty() {
        assert_eq!(pods_after, long_pods, "the upgrade replaced the job's pods");
    }
    eprintln!("long job Succeeded without a restart");

    // --- helm uninstall: the operator goes, the CRDs, the jobs and their checkpoints stay.
    env.helm(&["uninstall", RELEASE, "--wait"]);
    let gone = wait_for(TIMEOUT, || env.operator_pods().is_empty().then_some(()));
    assert!(gone.is_some(), "operator pods left after uninstall");
    env.kubectl(&[
        "get",
        "crd",
        "pretrainjobs.dinoflow.dev",
        "distilljobs.dinoflow.dev",
    ]);
    let jobs = env.kubectl(&["get", "pretrainjobs", "-n", &ns, "-o", "name"]);
    assert!(
        jobs.contains("tiny") && jobs.contains("long"),
        "jobs after uninstall: {jobs}"
    );
    for (job, status) in [("tiny", &tiny), ("long", &long)] {
        let path = status["status"]["lastCheckpoint"]["path"]
            .as_str()
            .unwrap_or_else(|| panic!("{job} has no lastCheckpoint: {:#}", status["status"]));
        let on_host = checkpoints.join(
            path.strip_prefix("/checkpoints/")
                .unwrap_or_else(|| panic!("{path} is not under /checkpoints")),
        );
        assert!(on_host.exists(), "{} is gone", on_host.display());
    }
    eprintln!("whole test: {:.1?}", test_start.elapsed());
}
