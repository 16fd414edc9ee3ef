//! The agent's Node: registered Ready with this host's CPUs and memory, kept alive with a
//! Lease in `kube-node-lease` (what the node lifecycle controller watches), removed on stop.

use std::collections::BTreeMap;
use std::time::Duration;

use dinoflow_api::contract::GPU_RESOURCE;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::{Client, Resource, ResourceExt};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::AgentError;
use super::plan::POD_IP;
use super::status::now;

const FIELD_MANAGER: &str = "dinoflow-node-agent";
const LEASE_NAMESPACE: &str = "kube-node-lease";
const LEASE_SECONDS: i32 = 40;
/// A kubelet renews every quarter of the lease duration.
const RENEW_EVERY: Duration = Duration::from_secs(10);
/// Label every agent's Node carries, telling it apart from a real kubelet's.
const AGENT_NODE_LABEL: &str = "dinoflow.dev/node-agent";

/// Capacity of the Node.
#[derive(Clone, Debug, PartialEq)]
pub struct Capacity {
    pub cpus: usize,
    pub memory_kib: u64,
    pub gpus: u32,
    pub pods: u32,
}

impl Capacity {
    /// This host's CPUs and memory (`/proc/meminfo`), with `gpus` GPUs.
    pub fn of_host(gpus: u32) -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        let memory_kib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            })
            .unwrap_or(1 << 20);
        Self {
            cpus,
            memory_kib,
            gpus,
            pods: 110,
        }
    }

    fn resources(&self) -> BTreeMap<String, String> {
        let mut r = BTreeMap::from([
            ("cpu".to_string(), self.cpus.to_string()),
            ("memory".to_string(), format!("{}Ki", self.memory_kib)),
            ("pods".to_string(), self.pods.to_string()),
        ]);
        if self.gpus > 0 {
            r.insert(GPU_RESOURCE.into(), self.gpus.to_string());
        }
        r
    }
}

/// The Node object (metadata and spec).
pub fn node(name: &str, labels: &BTreeMap<String, String>) -> Value {
    let mut all = BTreeMap::from([
        ("kubernetes.io/hostname".to_string(), name.to_string()),
        ("kubernetes.io/os".to_string(), "linux".to_string()),
        ("kubernetes.io/arch".to_string(), arch().to_string()),
        (AGENT_NODE_LABEL.to_string(), "true".to_string()),
    ]);
    all.extend(labels.clone());
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": { "name": name, "labels": all },
        "spec": {},
    })
}

/// Go's name for this architecture, as `kubernetes.io/arch` uses it.
fn arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// The Node's status: Ready, no pressure, capacity, address 127.0.0.1.
pub fn node_status(name: &str, capacity: &Capacity) -> Value {
    node_status_ready(name, capacity, true)
}

/// The Node's status with its Ready condition `ready`: False is what a kubelet posts when it
/// cannot run pods (runtime down, PLEG unhealthy), and the node lifecycle controller answers
/// with the `node.kubernetes.io/not-ready` taints.
pub fn node_status_ready(name: &str, capacity: &Capacity, ready: bool) -> Value {
    let time = now();
    let (ready, ready_reason) = if ready {
        ("True", "KubeletReady")
    } else {
        ("False", "KubeletNotReady")
    };
    let condition = |type_: &str, status: &str, reason: &str| {
        json!({ "type": type_, "status": status, "reason": reason,
                "lastHeartbeatTime": time, "lastTransitionTime": time })
    };
    json!({ "status": {
        "capacity": capacity.resources(),
        "allocatable": capacity.resources(),
        "conditions": [
            condition("MemoryPressure", "False", "KubeletHasSufficientMemory"),
            condition("DiskPressure", "False", "KubeletHasNoDiskPressure"),
            condition("PIDPressure", "False", "KubeletHasSufficientPID"),
            condition("Ready", ready, ready_reason),
        ],
        "addresses": [
            { "type": "InternalIP", "address": POD_IP },
            { "type": "Hostname", "address": name },
        ],
        "nodeInfo": {
            "machineID": "", "systemUUID": "", "bootID": "",
            "kernelVersion": std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|v| v.trim().to_owned())
                .unwrap_or_default(),
            "osImage": "dinoflow local node agent",
            "containerRuntimeVersion": "local://processes", "kubeletVersion": "v1.0.0-dinoflow",
            "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": arch(),
        },
    }})
}

/// Creates (or takes over) the Node and sets its status.
pub async fn register(
    client: &Client,
    name: &str,
    labels: &BTreeMap<String, String>,
    capacity: &Capacity,
) -> Result<Node, AgentError> {
    let nodes: Api<Node> = Api::all(client.clone());
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    nodes
        .patch(name, &pp, &Patch::Apply(node(name, labels)))
        .await?;
    let status = node_status(name, capacity);
    Ok(nodes
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await?)
}

/// Waits until the node lifecycle controller lifted the `not-ready` taint the API server puts
/// on every new Node, so the scheduler places pods here.
pub async fn wait_schedulable(
    client: &Client,
    name: &str,
    timeout: Duration,
) -> Result<(), AgentError> {
    let nodes: Api<Node> = Api::all(client.clone());
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let node = nodes.get(name).await?;
        let taints: Vec<String> = node
            .spec
            .and_then(|s| s.taints)
            .unwrap_or_default()
            .into_iter()
            .filter(|t| t.effect == "NoSchedule" || t.effect == "NoExecute")
            .map(|t| format!("{}:{}", t.key, t.effect))
            .collect();
        if taints.is_empty() {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(AgentError::NodeNotSchedulable {
                node: name.to_owned(),
                seconds: timeout.as_secs(),
                taints: taints.join(", "),
            });
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Renews the node's Lease every 10 s until `stop`; errors are logged and retried.
pub async fn heartbeat(client: Client, node: Node, stop: CancellationToken) {
    let leases: Api<Lease> = Api::namespaced(client, LEASE_NAMESPACE);
    let name = node.name_any();
    let owner = node.controller_owner_ref(&()).map(|mut o| {
        // Deleted with the Node, never its controller.
        o.controller = None;
        o
    });
    loop {
        let lease = json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": { "name": name, "namespace": LEASE_NAMESPACE, "ownerReferences": owner.iter().collect::<Vec<_>>() },
            "spec": {
                "holderIdentity": name,
                "leaseDurationSeconds": LEASE_SECONDS,
                "renewTime": MicroTime(k8s_openapi::jiff::Timestamp::now()),
            },
        });
        let pp = PatchParams::apply(FIELD_MANAGER).force();
        if let Err(e) = leases.patch(&name, &pp, &Patch::Apply(&lease)).await {
            eprintln!("[node-agent] renewing Lease {LEASE_NAMESPACE}/{name}: {e}");
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(RENEW_EVERY) => {}
        }
    }
}

/// Posts the Node's Ready condition (`ready`) with a fresh heartbeat, as a kubelet does.
pub async fn set_ready(
    client: &Client,
    name: &str,
    capacity: &Capacity,
    ready: bool,
) -> Result<(), AgentError> {
    let nodes: Api<Node> = Api::all(client.clone());
    let status = node_status_ready(name, capacity, ready);
    nodes
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await?;
    Ok(())
}

/// Deletes the Node (its Lease goes with it); the pod GC controller then removes pods
/// still bound to it.
pub async fn deregister(client: &Client, name: &str) -> Result<(), AgentError> {
    let nodes: Api<Node> = Api::all(client.clone());
    match nodes.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_node_offers_cpus_memory_and_only_the_gpus_asked_for() {
        let cap = Capacity {
            cpus: 2,
            memory_kib: 4096,
            gpus: 0,
            pods: 110,
        };
        let s = node_status("n", &cap);
        assert_eq!(s["status"]["capacity"]["cpu"], "2");
        assert_eq!(s["status"]["allocatable"]["memory"], "4096Ki");
        assert!(s["status"]["capacity"].get(GPU_RESOURCE).is_none());
        let ready = s["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "Ready")
            .unwrap();
        assert_eq!(ready["status"], "True");
        let not_ready = node_status_ready("n", &cap, false);
        let ready = &not_ready["status"]["conditions"][3];
        assert_eq!(
            (&ready["type"], &ready["status"], &ready["reason"]),
            (&json!("Ready"), &json!("False"), &json!("KubeletNotReady"))
        );
        let with_gpus = node_status("n", &Capacity { gpus: 2, ..cap });
        assert_eq!(with_gpus["status"]["capacity"][GPU_RESOURCE], "2");
        assert!(Capacity::of_host(0).memory_kib > 0);
    }

    #[test]
    fn the_node_carries_the_well_known_labels_and_the_callers() {
        let n = node("local-1", &[("pool".to_string(), "e2e".to_string())].into());
        let labels = &n["metadata"]["labels"];
        assert_eq!(labels["kubernetes.io/hostname"], "local-1");
        assert_eq!(labels["kubernetes.io/os"], "linux");
        assert_eq!(labels["pool"], "e2e");
    }
}
