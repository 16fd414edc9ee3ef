//! The local node agent (crate `dinoflow-node-agent`, tests/node-agent) against the real control plane with plain
//! pods (`sh`), no operator: the scheduler binds them to the agent's Node, the agent runs them
//! with their env and volumes resolved, reports real exit codes, and ends them on deletion.

use std::time::Duration;

use dinoflow_api::contract;
use dinoflow_e2e::{NODE_LABEL, TestCluster};
use dinoflow_node_agent::{AgentConfig, NodeAgent, terminated_state};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::Client;
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(60);

struct Env {
    client: Client,
    ns: String,
    config: AgentConfig,
    agent: Option<NodeAgent>,
    dir: tempfile::TempDir,
}

impl Env {
    async fn start(prefix: &str) -> Self {
        let cluster = TestCluster::shared();
        let client = cluster.client().await.expect("client for the test cluster");
        let ns = cluster.create_namespace(prefix).expect("namespace");
        let dir = tempfile::tempdir().unwrap();
        let config = AgentConfig::new(format!("local-{ns}"), dir.path().join("agent"))
            .label(NODE_LABEL, &ns);
        let agent = NodeAgent::start(client.clone(), config.clone())
            .await
            .expect("node agent registers a schedulable Node");
        Self {
            client,
            ns,
            config,
            agent: Some(agent),
            dir,
        }
    }

    fn agent(&self) -> &NodeAgent {
        self.agent.as_ref().expect("the agent runs")
    }

    /// Stops the agent (its processes end, its Node goes) and starts a new one for the same
    /// Node name, as after a kubelet restart.
    async fn restart_agent(&mut self) {
        self.agent
            .take()
            .unwrap()
            .stop()
            .await
            .expect("agent stops");
        let agent = NodeAgent::start(self.client.clone(), self.config.clone())
            .await
            .expect("the new agent registers the Node again");
        self.agent = Some(agent);
    }

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    /// Creates a `sh -c script` pod on the agent's node (retrying while the namespace's
    /// default ServiceAccount does not exist yet).
    async fn create_pod(
        &self,
        name: &str,
        script: &str,
        grace: i64,
        extra: serde_json::Value,
    ) -> Pod {
        let mut pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": { "name": name },
            "spec": {
                "nodeSelector": { NODE_LABEL: self.ns },
                "restartPolicy": "Never",
                "terminationGracePeriodSeconds": grace,
                "containers": [{
                    "name": "main", "image": "busybox", "command": ["sh", "-c"], "args": [script],
                    "terminationMessagePolicy": "FallbackToLogsOnError",
                }],
            },
        });
        merge(&mut pod, extra);
        let pod: Pod = serde_json::from_value(pod).unwrap();
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            match self.pods().create(&PostParams::default(), &pod).await {
                Ok(pod) => return pod,
                Err(e)
                    if tokio::time::Instant::now() < deadline
                        && e.to_string().contains("serviceaccount") =>
                {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => panic!("create pod {name}: {e}"),
            }
        }
    }

    async fn wait_pod(
        &self,
        name: &str,
        what: &str,
        done: impl Fn(Option<&Pod>) -> bool,
    ) -> Option<Pod> {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            let pod = self.pods().get_opt(name).await.unwrap();
            if done(pod.as_ref()) {
                return pod;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for pod {name}: {what}; last seen: {:?}\nlogs: {:?}",
                pod.and_then(|p| p.status),
                self.agent().logs()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn stop(mut self) {
        self.agent
            .take()
            .unwrap()
            .stop()
            .await
            .expect("agent stops");
        let _ = TestCluster::shared().kubectl([
            "delete",
            "namespace",
            self.ns.as_str(),
            "--wait=false",
        ]);
        drop(self.dir);
    }
}

fn merge(into: &mut serde_json::Value, from: serde_json::Value) {
    match (into, from) {
        (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k).or_insert(serde_json::Value::Null), v);
            }
        }
        (a, b) => *a = b,
    }
}

fn phase(pod: Option<&Pod>) -> Option<&str> {
    pod?.status.as_ref()?.phase.as_deref()
}

fn pid_of(pod: &Pod) -> u32 {
    dinoflow_node_agent::container_pid(pod).expect("the agent reported the pod's pid")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_runs_with_its_env_and_volumes_resolved_and_reports_its_real_exit_code() {
    let env = Env::start("agent-run").await;
    let cms: Api<ConfigMap> = Api::namespaced(env.client.clone(), &env.ns);
    let cm: ConfigMap = serde_json::from_value(json!({
        "metadata": { "name": "greeting" },
        "data": { "greeting": "hello from a ConfigMap", "config.yaml": "out: /scratch/run\n" },
    }))
    .unwrap();
    cms.create(&PostParams::default(), &cm).await.unwrap();
    let secrets: Api<Secret> = Api::namespaced(env.client.clone(), &env.ns);
    let secret: Secret = serde_json::from_value(json!({
        "metadata": { "name": "token" }, "stringData": { "token": "s3cret" },
    }))
    .unwrap();
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();

    let script = "cat /cfg/greeting; echo; cat /cfg/config.yaml; \
                  echo \"token=$TOKEN pod=$POD master=$MASTER_ADDR out=$OUT\"; \
                  echo \"sa-namespace=$(cat /var/run/secrets/kubernetes.io/serviceaccount/namespace)\"; \
                  test -s /var/run/secrets/kubernetes.io/serviceaccount/token && echo sa-token; \
                  touch /scratch/written; echo boom >&2; exit 3";
    env.create_pod("p1", script, 30, json!({ "spec": {
        "containers": [{
            "name": "main", "image": "busybox", "command": ["sh", "-c"], "args": [script],
            "terminationMessagePolicy": "FallbackToLogsOnError",
            "env": [
                { "name": "TOKEN", "valueFrom": { "secretKeyRef": { "name": "token", "key": "token" } } },
                { "name": "POD", "valueFrom": { "fieldRef": { "fieldPath": "metadata.name" } } },
                { "name": contract::MASTER_ADDR, "value": format!("p1.svc-name.{}.svc", env.ns) },
                { "name": "OUT", "value": "/scratch/run" },
            ],
            "volumeMounts": [
                { "name": "cfg", "mountPath": "/cfg", "readOnly": true },
                { "name": "scratch", "mountPath": "/scratch" },
            ],
        }],
        "volumes": [
            { "name": "cfg", "configMap": { "name": "greeting" } },
            { "name": "scratch", "emptyDir": {} },
        ],
    }}))
    .await;
    let pod = env
        .wait_pod("p1", "phase Failed", |p| phase(p) == Some("Failed"))
        .await
        .unwrap();
    assert_eq!(
        pod.spec.as_ref().unwrap().node_name.as_deref(),
        Some(env.agent().node_name())
    );
    let status = pod.status.as_ref().unwrap();
    assert_eq!(status.pod_ip.as_deref(), Some("127.0.0.1"));
    let terminated = terminated_state(&pod).expect("a terminated container");
    assert_eq!(
        (terminated.exit_code, terminated.reason.as_deref()),
        (3, Some("Error"))
    );
    // FallbackToLogsOnError: the log's tail is the termination message.
    let message = terminated.message.unwrap_or_default();
    assert!(message.contains("hello from a ConfigMap"), "{message}");
    assert!(
        message.contains("token=s3cret pod=p1 master=127.0.0.1 out="),
        "{message}"
    );
    assert!(message.ends_with("boom"), "{message}");
    // The service-account volume the API server added (projected: token, CA, namespace).
    assert!(
        message.contains(&format!("sa-namespace={}\nsa-token\n", env.ns)),
        "{message}"
    );
    // /scratch (the emptyDir) is a directory of the pod on the host, in the env and in the
    // ConfigMap's file alike.
    let scratch = message
        .split("out=")
        .nth(1)
        .and_then(|s| s.lines().next())
        .unwrap()
        .trim_end_matches("/run")
        .to_string();
    assert!(
        scratch.starts_with(env.agent().root().to_str().unwrap()),
        "{scratch}"
    );
    assert!(
        message.contains(&format!("out: {scratch}/run")),
        "{message}"
    );
    assert!(std::path::Path::new(&scratch).join("written").is_file());
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_pod_sends_sigterm_then_sigkill_after_the_grace_period_and_the_pod_goes() {
    let env = Env::start("agent-delete").await;
    // One pod exits on SIGTERM, the other ignores it and must be killed after 2 s.
    let polite = "trap 'echo got TERM; exit 0' TERM; echo started; while true; do sleep 0.1; done";
    let stubborn = "trap '' TERM; echo started; while true; do sleep 0.1; done";
    env.create_pod("polite", polite, 30, json!({})).await;
    env.create_pod("stubborn", stubborn, 2, json!({})).await;
    let mut pids = Vec::new();
    for name in ["polite", "stubborn"] {
        let pod = env
            .wait_pod(name, "phase Running", |p| phase(p) == Some("Running"))
            .await
            .unwrap();
        pids.push(pid_of(&pod));
    }
    let started = std::time::Instant::now();
    for name in ["polite", "stubborn"] {
        env.pods()
            .delete(name, &DeleteParams::default())
            .await
            .unwrap();
    }
    env.wait_pod("polite", "deleted", |p| p.is_none()).await;
    let polite_gone = started.elapsed();
    env.wait_pod("stubborn", "deleted", |p| p.is_none()).await;
    let stubborn_gone = started.elapsed();
    assert!(polite_gone < Duration::from_secs(10), "{polite_gone:?}");
    assert!(
        stubborn_gone >= Duration::from_secs(2) && stubborn_gone < Duration::from_secs(15),
        "{stubborn_gone:?}"
    );
    for pid in pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "pid {pid} still runs"
        );
    }
    let logs = env.agent().logs();
    let polite_log = logs
        .iter()
        .find(|l| l.to_string_lossy().contains("/polite-"))
        .unwrap();
    let text = std::fs::read_to_string(polite_log).unwrap();
    assert!(text.contains("got TERM"), "{text}");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_left_running_by_a_stopped_agent_is_reported_lost_not_run_again() {
    let mut env = Env::start("agent-lost").await;
    env.create_pod("sleeper", "echo started; sleep 300", 30, json!({}))
        .await;
    let pod = env
        .wait_pod("sleeper", "phase Running", |p| phase(p) == Some("Running"))
        .await
        .unwrap();
    let pid = pid_of(&pod);
    env.restart_agent().await;
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "the stopped agent ended pid {pid}"
    );
    let pod = env
        .wait_pod("sleeper", "phase Failed", |p| phase(p) == Some("Failed"))
        .await
        .unwrap();
    let terminated = terminated_state(&pod).expect("a terminated container");
    assert_eq!(
        (terminated.exit_code, terminated.reason.as_deref()),
        (137, Some("ContainerStatusUnknown"))
    );
    // Not started again: still one log, written by the first agent.
    assert_eq!(env.agent().logs().len(), 1, "{:?}", env.agent().logs());
    env.stop().await;
}
