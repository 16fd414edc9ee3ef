//! The operator as production runs it, for the chaos e2e: two `dinoflow-operator` processes
//! (a Deployment's two replicas) electing a leader over a Lease in the test's namespace, each
//! reaching the API server through an [`ApiFaultProxy`], each serving its own progress
//! endpoint. Trainers reach the leader's endpoint through a [`FaultProxy`] that follows the
//! Lease holder (what the progress Service does, as only the leader is ready). A replica
//! whose process ends (`kill -9`, or a leader stepping down) is started again after a second
//! under a new identity, as a ReplicaSet replaces a pod.
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dinoflow_e2e::{ApiFaultProxy, FaultProxy, build_workspace_binary};
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{PROGRESS_KEY, World, free_port, test_tls_files};

/// The Lease the replicas compete for (in the test's namespace).
pub const LEASE: &str = "dinoflow-operator-leader";
/// Seconds: renew every 5 s, step down after 10 s without a renewal (client-go's defaults).
pub const LEASE_SECONDS: u64 = 15;

/// One replica slot ("a" or "b") and the process now in it.
struct Slot {
    name: String,
    progress: SocketAddr,
    /// Pid and identity of the running process.
    current: Mutex<Option<(u32, String)>>,
    /// Every process this slot ran: identity and how it ended.
    history: Mutex<Vec<String>>,
}

pub struct OperatorReplicas {
    pub api: Arc<ApiFaultProxy>,
    pub progress: Arc<FaultProxy>,
    slots: Vec<Arc<Slot>>,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    client: kube::Client,
    ns: String,
}

impl OperatorReplicas {
    /// Starts replicas "a" and "b" for `world`'s namespace; returns once one leads.
    pub async fn start(world: &World) -> Self {
        let operator = tokio::task::spawn_blocking(|| {
            build_workspace_binary("dinoflow-operator", "dinoflow-operator")
                .unwrap_or_else(|e| panic!("the chaos e2e runs the operator binary: {e}"))
        })
        .await
        .unwrap();
        let api = Arc::new(
            ApiFaultProxy::start(world.client.clone())
                .await
                .expect("API fault proxy"),
        );
        let kubeconfig = world.dir.join("kubeconfig-via-proxy");
        api.write_kubeconfig(&kubeconfig).unwrap();
        let slots: Vec<Arc<Slot>> = ["a", "b"]
            .iter()
            .map(|n| {
                Arc::new(Slot {
                    name: format!("replica-{n}"),
                    progress: format!("127.0.0.1:{}", free_port()).parse().unwrap(),
                    current: Mutex::new(None),
                    history: Mutex::new(Vec::new()),
                })
            })
            .collect();
        let progress = Arc::new(
            FaultProxy::start(slots[0].progress)
                .await
                .expect("progress proxy"),
        );
        let stop = CancellationToken::new();
        let mut tasks = Vec::new();
        for slot in &slots {
            let env = Env {
                binary: operator.clone(),
                kubeconfig: kubeconfig.clone(),
                ns: world.ns.clone(),
                endpoint: format!("https://{}", progress.addr()),
                logs: world.dir.clone(),
            };
            tasks.push(tokio::spawn(supervise(Arc::clone(slot), env, stop.clone())));
        }
        tasks.push(tokio::spawn(follow_leader(
            world.client.clone(),
            world.ns.clone(),
            slots.clone(),
            Arc::clone(&progress),
            stop.clone(),
        )));
        let replicas = Self {
            api,
            progress,
            slots,
            stop,
            tasks,
            client: world.client.clone(),
            ns: world.ns.clone(),
        };
        replicas
            .wait_leader(Duration::from_secs(90), |_| true)
            .await
            .expect("a replica leads within 90 s");
        replicas
    }

    /// The identity holding the Lease now, if any.
    pub async fn holder(&self) -> Option<String> {
        holder(&self.client, &self.ns).await
    }

    /// Waits until a running replica whose identity passes `accept` holds the Lease.
    pub async fn wait_leader(
        &self,
        timeout: Duration,
        accept: impl Fn(&str) -> bool,
    ) -> Option<String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(h) = self.holder().await
                && accept(&h)
                && self.pid_of(&h).is_some()
            {
                return Some(h);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// `kill -9` of the process with `identity`; false when no such process runs.
    pub fn kill_9(&self, identity: &str) -> bool {
        let Some(pid) = self.pid_of(identity) else {
            return false;
        };
        std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .is_ok_and(|s| s.success())
    }

    fn pid_of(&self, identity: &str) -> Option<u32> {
        self.slots.iter().find_map(|s| {
            let current = s.current.lock().unwrap();
            current
                .as_ref()
                .filter(|(_, id)| id == identity)
                .map(|(pid, _)| *pid)
        })
    }

    /// Every replica process so far and how it ended.
    pub fn history(&self) -> Vec<String> {
        self.slots
            .iter()
            .flat_map(|s| s.history.lock().unwrap().clone())
            .collect()
    }

    /// Stops both replicas (SIGTERM: the leader hands the Lease over) and the proxies.
    pub async fn stop(self) {
        self.stop.cancel();
        for task in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(30), task).await;
        }
    }
}

async fn holder(client: &kube::Client, ns: &str) -> Option<String> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), ns);
    let lease = leases.get_opt(LEASE).await.ok()??;
    lease.spec?.holder_identity.filter(|h| !h.is_empty())
}

struct Env {
    binary: PathBuf,
    kubeconfig: PathBuf,
    ns: String,
    endpoint: String,
    logs: PathBuf,
}

/// Runs the slot's replica, starting it again (new identity) whenever it ends.
async fn supervise(slot: Arc<Slot>, env: Env, stop: CancellationToken) {
    let mut generation = 0;
    loop {
        let identity = format!("{}-{generation}", slot.name);
        generation += 1;
        let mut child = spawn(&env, &identity, slot.progress);
        *slot.current.lock().unwrap() = child.id().map(|pid| (pid, identity.clone()));
        let ended = tokio::select! {
            status = child.wait() => status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string()),
            () = stop.cancelled() => {
                if let Some(pid) = child.id() {
                    let _ = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
                }
                let _ = tokio::time::timeout(Duration::from_secs(20), child.wait()).await;
                let _ = child.kill().await;
                *slot.current.lock().unwrap() = None;
                return;
            }
        };
        *slot.current.lock().unwrap() = None;
        eprintln!("[chaos] operator {identity} ended: {ended}");
        slot.history
            .lock()
            .unwrap()
            .push(format!("{identity} ended: {ended}"));
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

fn spawn(env: &Env, identity: &str, progress: SocketAddr) -> tokio::process::Child {
    let log = env.logs.join(format!("operator-{identity}.log"));
    let out = std::fs::File::create(&log).unwrap();
    let err = out.try_clone().unwrap();
    let tls = test_tls_files();
    let path = |p: &Path| p.display().to_string();
    tokio::process::Command::new(&env.binary)
        .args(["--lease-duration-seconds", &LEASE_SECONDS.to_string()])
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("KUBECONFIG", &env.kubeconfig)
        .env("DINOFLOW_LEADER_ELECT", "true")
        .env("POD_NAMESPACE", &env.ns)
        .env("POD_NAME", identity)
        .env("DINOFLOW_WATCH_NAMESPACE", &env.ns)
        .env("DINOFLOW_DEFAULT_IMAGE", "dinoflow/trainer:e2e")
        .env("DINOFLOW_PROGRESS_ENDPOINT", &env.endpoint)
        .env("DINOFLOW_PROGRESS_ADDR", progress.to_string())
        .env("DINOFLOW_HEALTH_ADDR", format!("127.0.0.1:{}", free_port()))
        .env("DINOFLOW_PROGRESS_TLS_CERT_FILE", path(&tls.cert))
        .env("DINOFLOW_PROGRESS_TLS_KEY_FILE", path(&tls.key))
        .env("DINOFLOW_PROGRESS_TLS_CA_FILE", path(&tls.ca))
        .env(
            "DINOFLOW_PROGRESS_KEY",
            String::from_utf8_lossy(PROGRESS_KEY).into_owned(),
        )
        .env("DINOFLOW_LOG_FORMAT", "text")
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(out)
        .stderr(err)
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", env.binary.display()))
}

/// Points the progress proxy at the Lease holder's endpoint, as the progress Service follows
/// the one ready replica.
async fn follow_leader(
    client: kube::Client,
    ns: String,
    slots: Vec<Arc<Slot>>,
    progress: Arc<FaultProxy>,
    stop: CancellationToken,
) {
    loop {
        if let Some(h) = holder(&client, &ns).await
            && let Some(slot) = slots
                .iter()
                .find(|s| h.starts_with(&format!("{}-", s.name)))
            && progress.upstream() != slot.progress
        {
            eprintln!(
                "[chaos] progress endpoint follows the leader {h} ({})",
                slot.progress
            );
            progress.retarget(slot.progress);
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
}
