//! A local node agent: the kubelet of the end-to-end tests and the demo. It registers a Ready
//! Node (this host's CPUs and memory, GPUs only when asked), keeps its Lease renewed, watches
//! the pods the scheduler binds to it and runs each pod's container as a local process.
//!
//! What it does like a kubelet: resolves the container's env (`value`, `secretKeyRef`,
//! `configMapKeyRef`, `fieldRef`, `envFrom`), materialises volumes, writes pod status
//! (Pending -> Running with podIP 127.0.0.1 -> Succeeded/Failed with the process's real exit
//! code, 128 + signal when killed, and the log's tail as the termination message on failure),
//! sends SIGTERM on deletion and SIGKILL to the process group after the pod's grace period,
//! and confirms the deletion.
//!
//! What it does differently, because there are no containers here (no images, no mount
//! namespace, no chroot, one network namespace):
//! - **Commands**: `command[0]` is looked up in the agent's binaries first
//!   (`dinoflow-trainer` -> the locally built trainer), else taken as a path or found in PATH.
//!   The image is not used; the process gets the agent's PATH, HOME and LD_LIBRARY_PATH as
//!   its "image environment", then the pod's env.
//! - **Path mapping**: every volume is a host directory: a ConfigMap, Secret or projected
//!   volume (ConfigMaps, Secrets, downward API fields, a service-account token from the
//!   TokenRequest API) is written under `<root>/pods/<ns>/<pod>-<uid>/volumes/<volume>/`,
//!   an emptyDir is a directory
//!   there, a hostPath is itself, a PersistentVolumeClaim is the path of the hostPath/local
//!   PersistentVolume it is bound to, else `<root>/claims/<ns>/<claim>/` (shared by all pods
//!   of the claim, so checkpoints survive a gang restart). Each in-container mount path is
//!   rewritten to its host directory wherever it appears as a path in the command, args, env
//!   values and projected ConfigMap/Secret files (the operator's trainer config names its
//!   output directory there): `/etc/dinoflow/config.yaml` becomes
//!   `<pod dir>/volumes/config/config.yaml`. Paths under no mount stay the host's own.
//! - **Network**: pods share the host's network. A cluster DNS name (`*.svc`, the
//!   operator's MASTER_ADDR) in an env value becomes 127.0.0.1; ports must not collide
//!   between concurrently running pods (distinct `masterPort`s, `metricsPort: 0`).
//! - Pods have exactly one container and no init containers; restartPolicy is treated as
//!   Never (what the operator sets: it restarts whole gangs itself).
//! - It does not bind pods: kube-scheduler (started by scripts/cluster.sh) places them once
//!   the node lifecycle controller lifted the new Node's `not-ready` taint, which
//!   [`NodeAgent::start`] waits for.
//!
//! Each process's stdout and stderr go to `<pod dir>/<container>.log`.
mod error;
mod mapping;
mod node;
mod plan;
mod runner;
mod status;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event, watcher};
use kube::{Api, Client, ResourceExt};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use error::AgentError;
pub use mapping::{PathMap, is_cluster_dns_name};
pub use node::Capacity;
pub use plan::{POD_IP, pod_dir};
pub use status::{container_pid, terminated_state};

use runner::{Ctx, PodSignal};

/// Variables of the agent's own environment every container starts with.
pub const BASE_ENV: [&str; 5] = ["PATH", "HOME", "LD_LIBRARY_PATH", "TMPDIR", "LANG"];

/// How long [`NodeAgent::start`] waits for the Node to become schedulable.
const SCHEDULABLE_TIMEOUT: Duration = Duration::from_secs(60);

/// What the agent registers and how it runs pods.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub node_name: String,
    /// Per-pod directories, logs and claim directories go here.
    pub root: PathBuf,
    /// Container command name -> local executable.
    pub binaries: BTreeMap<String, PathBuf>,
    /// Extra Node labels (pods select the node with them).
    pub labels: BTreeMap<String, String>,
    pub capacity: Capacity,
    /// The "image environment": [`BASE_ENV`] from this process by default.
    pub base_env: Vec<(String, String)>,
}

impl AgentConfig {
    /// A node named `node_name` with this host's CPUs and memory and no GPUs.
    pub fn new(node_name: impl Into<String>, root: impl Into<PathBuf>) -> Self {
        Self {
            node_name: node_name.into(),
            root: root.into(),
            binaries: BTreeMap::new(),
            labels: BTreeMap::new(),
            capacity: Capacity::of_host(0),
            base_env: BASE_ENV
                .iter()
                .filter_map(|k| Some((k.to_string(), std::env::var(k).ok()?)))
                .collect(),
        }
    }

    /// Runs container command `name` as the executable `path`.
    pub fn binary(mut self, name: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        self.binaries.insert(name.into(), path.into());
        self
    }

    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }
}

/// A running agent; [`NodeAgent::stop`] ends its pods' processes and removes its Node.
pub struct NodeAgent {
    client: Client,
    node_name: String,
    capacity: Capacity,
    root: PathBuf,
    stop: CancellationToken,
    task: JoinHandle<()>,
    heartbeat: JoinHandle<()>,
}

impl NodeAgent {
    /// Registers the Node, waits until pods can be scheduled onto it, then runs its pods.
    pub async fn start(client: Client, config: AgentConfig) -> Result<Self, AgentError> {
        std::fs::create_dir_all(&config.root).map_err(AgentError::io(&config.root))?;
        let node =
            node::register(&client, &config.node_name, &config.labels, &config.capacity).await?;
        let stop = CancellationToken::new();
        let heartbeat = tokio::spawn(node::heartbeat(client.clone(), node, stop.clone()));
        if let Err(e) =
            node::wait_schedulable(&client, &config.node_name, SCHEDULABLE_TIMEOUT).await
        {
            stop.cancel();
            let _ = node::deregister(&client, &config.node_name).await;
            return Err(e);
        }
        let ctx = Arc::new(Ctx {
            client: client.clone(),
            host: plan::Host {
                root: config.root.clone(),
                binaries: config.binaries.clone(),
                base_env: config.base_env.clone(),
                node_name: config.node_name.clone(),
            },
        });
        let task = tokio::spawn(watch_pods(ctx, stop.clone()));
        eprintln!(
            "[node-agent] node {} ready; pod logs under {}",
            config.node_name,
            config.root.join("pods").display()
        );
        Ok(Self {
            client,
            node_name: config.node_name,
            capacity: config.capacity,
            root: config.root,
            stop,
            task,
            heartbeat,
        })
    }

    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Posts the Node's Ready condition: `false` reports the node NotReady as a kubelet whose
    /// runtime stopped working does (the node lifecycle controller then taints it
    /// `node.kubernetes.io/not-ready`), `true` reports it Ready again. The agent goes on
    /// running (and stopping) its pods either way, as such a kubelet does.
    pub async fn set_ready(&self, ready: bool) -> Result<(), AgentError> {
        node::set_ready(&self.client, &self.node_name, &self.capacity, ready).await
    }

    /// Every pod log written so far (for failure messages), sorted.
    pub fn logs(&self) -> Vec<PathBuf> {
        let mut logs = Vec::new();
        let Ok(namespaces) = std::fs::read_dir(self.root.join("pods")) else {
            return logs;
        };
        for ns in namespaces.flatten() {
            for pod in std::fs::read_dir(ns.path()).into_iter().flatten().flatten() {
                for file in std::fs::read_dir(pod.path())
                    .into_iter()
                    .flatten()
                    .flatten()
                {
                    if file.path().extension().is_some_and(|e| e == "log") {
                        logs.push(file.path());
                    }
                }
            }
        }
        logs.sort();
        logs
    }

    /// Ends every pod process (SIGTERM, SIGKILL after 10 s), then deletes the Node. Pods
    /// still bound to it are left to the pod garbage collector.
    pub async fn stop(self) -> Result<(), AgentError> {
        self.stop.cancel();
        let _ = self.task.await;
        let _ = self.heartbeat.await;
        node::deregister(&self.client, &self.node_name).await
    }
}

struct Running {
    signal: watch::Sender<PodSignal>,
    task: JoinHandle<()>,
}

/// Watches the pods bound to this node and keeps one task per pod.
async fn watch_pods(ctx: Arc<Ctx>, stop: CancellationToken) {
    let pods: Api<Pod> = Api::all(ctx.client.clone());
    let config =
        watcher::Config::default().fields(&format!("spec.nodeName={}", ctx.host.node_name));
    let mut events = std::pin::pin!(watcher(pods, config).default_backoff());
    let mut running: HashMap<String, Running> = HashMap::new();
    // Pods listed during a relist: those not seen again were deleted meanwhile.
    let mut relisted: Option<HashSet<String>> = None;
    loop {
        let event = tokio::select! {
            () = stop.cancelled() => break,
            event = events.try_next() => event,
        };
        running.retain(|_, r| !r.task.is_finished());
        match event {
            Ok(Some(Event::Init)) => relisted = Some(HashSet::new()),
            Ok(Some(Event::InitApply(pod))) => {
                if let Some(seen) = relisted.as_mut() {
                    seen.insert(pod.uid().unwrap_or_default());
                }
                on_pod(&ctx, &mut running, pod);
            }
            Ok(Some(Event::InitDone)) => {
                if let Some(seen) = relisted.take() {
                    for (uid, r) in &running {
                        if !seen.contains(uid) {
                            r.signal.send_replace(PodSignal::Gone);
                        }
                    }
                }
            }
            Ok(Some(Event::Apply(pod))) => on_pod(&ctx, &mut running, pod),
            Ok(Some(Event::Delete(pod))) => {
                if let Some(r) = running.get(&pod.uid().unwrap_or_default()) {
                    r.signal.send_replace(PodSignal::Gone);
                }
            }
            Ok(None) => break,
            Err(e) => eprintln!("[node-agent] watching pods: {e} (retrying)"),
        }
    }
    for r in running.values() {
        r.signal.send_replace(PodSignal::AgentStop);
    }
    for (_, r) in running {
        let _ = r.task.await;
    }
}

fn on_pod(ctx: &Arc<Ctx>, running: &mut HashMap<String, Running>, pod: Pod) {
    let uid = pod.uid().unwrap_or_default();
    let wanted = match pod.metadata.deletion_timestamp {
        Some(_) => {
            let grace = pod
                .metadata
                .deletion_grace_period_seconds
                .or(pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.termination_grace_period_seconds))
                .unwrap_or(30);
            PodSignal::Terminate {
                grace: Duration::from_secs(u64::try_from(grace).unwrap_or(0)),
            }
        }
        None => PodSignal::Run,
    };
    if let Some(r) = running.get(&uid) {
        r.signal.send_if_modified(|current| {
            let change = *current == PodSignal::Run && wanted != PodSignal::Run;
            if change {
                *current = wanted;
            }
            change
        });
        return;
    }
    let (signal, receiver) = watch::channel(wanted);
    let task = tokio::spawn(runner::run_pod(Arc::clone(ctx), pod, receiver));
    running.insert(uid, Running { signal, task });
}
