//! `spec.cluster`: nodes, GPUs, placement, gang scheduling, volumes, run policy.
//!
//! The doc comments on these types are what `kubectl explain pretrainjob.spec.cluster` prints.
//! Cross-field rules are CEL rules in the CRD, so a bad manifest is refused by the API server
//! with a message that names the field and the fix.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, CSIVolumeSource, Container, EmptyDirVolumeSource, EnvFromSource, EnvVar,
    HostPathVolumeSource, LocalObjectReference, NFSVolumeSource, PersistentVolumeClaimVolumeSource,
    PodSecurityContext, ResourceRequirements, SecurityContext, Toleration,
};
use kube_derive::KubeSchema;
use serde::{Deserialize, Serialize};

/// Exit code the trainer uses for a permanent failure (bad config, missing data).
/// Mirrors `dinoflow_api::exit_codes` (CONTRACTS.md); kept here so the run policy can name it.
pub const EXIT_PERMANENT_FAILURE: i32 = 78;
/// Exit code the trainer uses when the loss became NaN/Inf; also permanent.
pub const EXIT_NON_FINITE_LOSS: i32 = 79;

/// How the job is laid out on the cluster: one pod per node, `gpusPerNode` GPUs each.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[x_kube(crates(kube_core = "::kube_core"))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(
    validation = Rule::new("self.nodes == oldSelf.nodes || (has(self.runPolicy) && has(self.runPolicy.suspend) && self.runPolicy.suspend)")
        .message("cluster.nodes is immutable while the job runs: set cluster.runPolicy.suspend: true first, then change nodes"),
    validation = Rule::new("self.gpusPerNode == oldSelf.gpusPerNode || (has(self.runPolicy) && has(self.runPolicy.suspend) && self.runPolicy.suspend)")
        .message("cluster.gpusPerNode is immutable while the job runs: set cluster.runPolicy.suspend: true first, then change gpusPerNode"),
    validation = Rule::new("!has(self.schedulerName) || !has(self.gangScheduling) || self.gangScheduling.mode != 'volcano' || self.schedulerName == 'volcano'")
        .message("cluster.schedulerName must be 'volcano' (or unset) when cluster.gangScheduling.mode is volcano"),
    validation = Rule::new("self.ncclProfile != 'custom' || (has(self.ncclEnv) && size(self.ncclEnv) > 0)")
        .message("cluster.ncclProfile 'custom' needs cluster.ncclEnv: list the NCCL_* variables to set, or pick default, infiniband or ethernet")
)]
pub struct ClusterSpec {
    /// Number of nodes (one pod each) in the gang. Immutable unless the job is suspended.
    #[serde(default = "default_nodes")]
    #[x_kube(validation = Rule::new("self >= 1").message("cluster.nodes must be at least 1: set it to the number of machines to train on"))]
    pub nodes: i32,

    /// GPUs per node; the trainer starts one process per GPU. 0 runs one CPU process per node.
    #[serde(default = "default_gpus_per_node")]
    #[x_kube(validation = Rule::new("self >= 0").message("cluster.gpusPerNode must be >= 0: use 0 for a CPU run"))]
    pub gpus_per_node: i32,

    /// Trainer container image. Unset: the operator's default trainer image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,

    /// Image pull policy of the trainer container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<ImagePullPolicy>,

    /// CPU, memory (and other) requests and limits of the trainer container.
    /// `nvidia.com/gpu` is set from `gpusPerNode`; do not set it here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// Node labels every pod must match.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,

    /// Tolerations of every pod (e.g. for tainted GPU nodes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,

    /// Affinity and anti-affinity of every pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,

    /// PriorityClass of the pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,

    /// Scheduler of the pods. Unset: the default scheduler, or the one gang scheduling needs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduler_name: Option<String>,

    /// All-or-nothing scheduling of the gang through a PodGroup.
    #[serde(default)]
    pub gang_scheduling: GangScheduling,

    /// Volumes mounted into the trainer container: datasets, checkpoint storage, caches.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    // maxItems bounds the API server's CEL cost estimate for the per-volume rules.
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]), length(max = 32))]
    pub volumes: Vec<JobVolume>,

    /// Size of the in-memory `/dev/shm` (data-loader workers share batches through it),
    /// e.g. `16Gi`. Unset: the runtime's default (often 64 MiB, too small for many workers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shm_size: Option<k8s_openapi::apimachinery::pkg::api::resource::Quantity>,

    /// NCCL tuning preset: `default` (NCCL decides), `infiniband` (RDMA, GPUDirect),
    /// `ethernet` (TCP sockets, no IB), or `custom` (only `ncclEnv`).
    #[serde(default)]
    pub nccl_profile: NcclProfile,

    /// Extra NCCL_* (or other) environment variables; they override the profile's.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub nccl_env: BTreeMap<String, String>,

    /// Port of the rank-0 rendezvous (`MASTER_PORT`).
    #[serde(default = "default_master_port")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 65535").message("cluster.masterPort must be a TCP port in 1..65535"))]
    pub master_port: i32,

    /// Overrides merged into every pod: labels, annotations, env, service account, sidecars...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_template: Option<PodTemplateOverrides>,

    /// Restarts, exit codes, deadlines, suspension and cleanup.
    #[serde(default)]
    pub run_policy: RunPolicy,

    /// Seconds a pod gets after SIGTERM; long enough for the trainer to write a checkpoint.
    #[serde(default = "default_termination_grace")]
    #[x_kube(validation = Rule::new("self >= 0").message("cluster.terminationGracePeriodSeconds must be >= 0"))]
    pub termination_grace_period_seconds: i64,
}

fn default_nodes() -> i32 {
    1
}
fn default_gpus_per_node() -> i32 {
    1
}
fn default_master_port() -> i32 {
    29500
}
fn default_termination_grace() -> i64 {
    300
}

impl Default for ClusterSpec {
    fn default() -> Self {
        Self {
            nodes: default_nodes(),
            gpus_per_node: default_gpus_per_node(),
            image: None,
            image_pull_policy: None,
            resources: None,
            node_selector: BTreeMap::new(),
            tolerations: Vec::new(),
            affinity: None,
            priority_class_name: None,
            scheduler_name: None,
            gang_scheduling: GangScheduling::default(),
            volumes: Vec::new(),
            shm_size: None,
            nccl_profile: NcclProfile::default(),
            nccl_env: BTreeMap::new(),
            master_port: default_master_port(),
            pod_template: None,
            run_policy: RunPolicy::default(),
            termination_grace_period_seconds: default_termination_grace(),
        }
    }
}

impl ClusterSpec {
    /// Processes per node: one per GPU, or one CPU process when `gpusPerNode` is 0.
    pub fn procs_per_node(&self) -> i32 {
        self.gpus_per_node.max(1)
    }

    /// Total number of trainer processes (`WORLD_SIZE`).
    pub fn world_size(&self) -> i32 {
        self.nodes * self.procs_per_node()
    }
}

/// Image pull policy of the trainer container.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum ImagePullPolicy {
    Always,
    IfNotPresent,
    Never,
}

impl ImagePullPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Always => "Always",
            Self::IfNotPresent => "IfNotPresent",
            Self::Never => "Never",
        }
    }
}

/// Gang scheduling: the scheduler places all pods of the gang at once or none.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[x_kube(crates(kube_core = "::kube_core"))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GangScheduling {
    /// `none` (default scheduler, pods placed one by one), `volcano` (Volcano PodGroup and
    /// scheduler) or `schedulerPlugins` (kubernetes-sigs/scheduler-plugins coscheduling PodGroup).
    #[serde(default)]
    pub mode: GangMode,

    /// Seconds the scheduler waits for the whole gang before giving up on a placement
    /// (scheduler-plugins `scheduleTimeoutSeconds`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1").message("cluster.gangScheduling.timeoutSeconds must be >= 1"))]
    pub timeout_seconds: Option<i32>,

    /// Volcano queue of the PodGroup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
}

/// Which gang scheduler, if any.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum GangMode {
    #[default]
    None,
    Volcano,
    SchedulerPlugins,
}

/// NCCL tuning preset.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum NcclProfile {
    #[default]
    Default,
    Infiniband,
    Ethernet,
    Custom,
}

/// A volume mounted into the trainer container. Exactly one source must be set.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[x_kube(crates(kube_core = "::kube_core"))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(
    validation = Rule::new("(has(self.persistentVolumeClaim) ? 1 : 0) + (has(self.hostPath) ? 1 : 0) + (has(self.emptyDir) ? 1 : 0) + (has(self.nfs) ? 1 : 0) + (has(self.csi) ? 1 : 0) == 1")
        .message("each cluster.volumes entry needs exactly one source: persistentVolumeClaim, hostPath, emptyDir, nfs or csi")
)]
pub struct JobVolume {
    /// Volume name, unique in the pod; `config`, `dshm` and `dinoflow-tmp` are taken by the
    /// operator.
    #[x_kube(validation = Rule::new("self != 'config' && self != 'dshm' && self != 'dinoflow-tmp'").message("cluster.volumes[].name 'config', 'dshm' and 'dinoflow-tmp' are reserved: pick another name"))]
    #[schemars(length(min = 1, max = 63))]
    pub name: String,

    /// Absolute path inside the container, e.g. `/data` or `/checkpoints`.
    #[x_kube(validation = Rule::new("self.startsWith('/')").message("cluster.volumes[].mountPath must be an absolute path such as /data"))]
    #[schemars(length(max = 1024))]
    pub mount_path: String,

    /// Mount read-only (datasets).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read_only: bool,

    /// A PersistentVolumeClaim in the job's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent_volume_claim: Option<PersistentVolumeClaimVolumeSource>,
    /// A directory on the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_path: Option<HostPathVolumeSource>,
    /// Scratch space that lives as long as the pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub empty_dir: Option<EmptyDirVolumeSource>,
    /// An NFS export.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nfs: Option<NFSVolumeSource>,
    /// A CSI volume (e.g. a parallel file system driver).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub csi: Option<CSIVolumeSource>,
}

/// The part of the pod template a user may override. Merged into the operator's pod: maps are
/// merged (the operator's `dinoflow.dev/*` labels win), env entries are appended (a user entry
/// with the same name as an operator entry replaces it, except the rendezvous contract).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PodTemplateOverrides {
    /// Extra pod labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Extra pod annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Extra environment variables of the trainer container.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    /// Environment from ConfigMaps or Secrets (e.g. object-store credentials).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env_from: Vec<EnvFromSource>,
    /// ServiceAccount the pods run as.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
    /// Secrets for pulling the image.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<LocalObjectReference>,
    /// Pod-level security context.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security_context: Option<PodSecurityContext>,
    /// Security context of the trainer container (e.g. IPC_LOCK for RDMA). Each field set here
    /// replaces the operator's default: no privilege escalation, all capabilities dropped, and
    /// a read-only root filesystem with writable scratch at /tmp (an emptyDir, unless a volume
    /// of the job is mounted there); `readOnlyRootFilesystem: false` drops that scratch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_security_context: Option<SecurityContext>,
    /// Run the pods in the host network namespace (some RDMA set-ups need it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_network: Option<bool>,
    /// RuntimeClass of the pods (e.g. `nvidia`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_class_name: Option<String>,
    /// Init containers run before the trainer (e.g. dataset staging).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub init_containers: Vec<Container>,
    /// Sidecar containers beside the trainer (e.g. a log shipper).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sidecars: Vec<Container>,
}

/// Restarts, exit codes, deadlines, suspension and cleanup of the job.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[x_kube(crates(kube_core = "::kube_core"))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RunPolicy {
    /// Gang restarts allowed after retryable failures without progress (no new verified
    /// checkpoint since the gang last started; hangs included) before the job fails.
    /// Failures after progress use `progressRestartLimit` first; evictions and node loss
    /// use `disruptionLimit`.
    #[serde(default = "default_backoff_limit")]
    #[x_kube(validation = Rule::new("self >= 0").message("cluster.runPolicy.backoffLimit must be >= 0 (0: never restart)"))]
    pub backoff_limit: i32,

    /// Gang restarts allowed after retryable failures that followed a new verified
    /// checkpoint (the run made progress since the gang last started) without using up
    /// `backoffLimit`, so a long run survives occasional crashes. Past it, such failures count
    /// against `backoffLimit` like any other; 0 makes every failure count there.
    #[serde(default = "default_progress_restart_limit")]
    #[x_kube(validation = Rule::new("self >= 0").message("cluster.runPolicy.progressRestartLimit must be >= 0 (0: failures after progress count against backoffLimit too)"))]
    pub progress_restart_limit: i32,

    /// Gang restarts allowed after disruptions (eviction, preemption, node loss or shutdown,
    /// a pod deleted from outside) before the job fails. Raise it on preemptible capacity.
    #[serde(default = "default_disruption_limit")]
    #[x_kube(validation = Rule::new("self >= 0").message("cluster.runPolicy.disruptionLimit must be >= 0"))]
    pub disruption_limit: i32,

    /// Divergence rollbacks allowed: when a rank's loss goes non-finite (exit 79), the gang
    /// restarts from the last verified checkpoint and the trainer skips the data the ranks
    /// consumed from that checkpoint through the diverged iteration. 0 (the default, as the
    /// reference trainer, which stops on a non-finite loss) fails the job on exit 79; past the
    /// limit, or with no verified checkpoint to go back to, the job fails too.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self >= 0").message("cluster.runPolicy.divergenceRollbackLimit must be >= 0 (0: a non-finite loss fails the job)"))]
    pub divergence_rollback_limit: i32,

    /// Exit codes that fail the job at once, in addition to the trainer's permanent codes
    /// 78 (bad config, missing data) and 79 (non-finite loss).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = Rule::new("self.all(c, c >= 1 && c <= 255)").message("cluster.runPolicy.permanentExitCodes must be exit codes in 1..255"))]
    pub permanent_exit_codes: Vec<i32>,

    /// Seconds the job may run (from its start, suspensions excluded) before it fails with
    /// DeadlineExceeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1").message("cluster.runPolicy.activeDeadlineSeconds must be >= 1"))]
    pub active_deadline_seconds: Option<i64>,

    /// Seconds after completion before the job (and its children) are deleted. Unset: kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 0").message("cluster.runPolicy.ttlSecondsAfterFinished must be >= 0"))]
    pub ttl_seconds_after_finished: Option<i32>,

    /// Suspend: delete the pods, keep the job and its progress. Resuming recreates the gang,
    /// which continues from the last checkpoint (Kueue sets this field).
    #[serde(default)]
    pub suspend: bool,

    /// Seconds without a progress report from a running gang before it counts as hung and
    /// is restarted (a retryable failure). Counted from the latest of: every pod running
    /// (scheduling and image pulls never count), the last report, the operator's own start
    /// (no report reaches a stopped operator). The trainer reports every completed iteration
    /// (at most once a second) and heartbeats every 10 s while it starts up (model, dataset,
    /// initial weights, checkpoint restore), evaluates or writes a checkpoint; a single
    /// iteration sends nothing until it ends, so the timeout must exceed the slowest
    /// iteration. Unset: no hang detection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 30").message("cluster.runPolicy.hangTimeoutSeconds must be >= 30 (the trainer reports at least every 10 s outside iterations, and after each iteration)"))]
    pub hang_timeout_seconds: Option<i64>,

    /// Seconds the gang may stay unscheduled before the job reports it (condition and event
    /// with the scheduler's reason). The job keeps waiting.
    #[serde(default = "default_pending_timeout")]
    #[x_kube(validation = Rule::new("self >= 1").message("cluster.runPolicy.pendingTimeoutSeconds must be >= 1"))]
    pub pending_timeout_seconds: i64,

    /// Which pods to delete when the job finishes: `Running` (default: stop stragglers, keep
    /// the logs of finished and failed pods), `All`, or `None`.
    #[serde(default)]
    pub clean_pod_policy: CleanPodPolicy,
}

fn default_backoff_limit() -> i32 {
    3
}
fn default_progress_restart_limit() -> i32 {
    20
}
fn default_disruption_limit() -> i32 {
    50
}
fn default_pending_timeout() -> i64 {
    600
}

impl Default for RunPolicy {
    fn default() -> Self {
        Self {
            backoff_limit: default_backoff_limit(),
            progress_restart_limit: default_progress_restart_limit(),
            disruption_limit: default_disruption_limit(),
            divergence_rollback_limit: 0,
            permanent_exit_codes: Vec::new(),
            active_deadline_seconds: None,
            ttl_seconds_after_finished: None,
            suspend: false,
            hang_timeout_seconds: None,
            pending_timeout_seconds: default_pending_timeout(),
            clean_pod_policy: CleanPodPolicy::default(),
        }
    }
}

impl RunPolicy {
    /// Whether `code` fails the job at once (trainer's permanent codes or user-listed).
    pub fn is_permanent_exit_code(&self, code: i32) -> bool {
        code == EXIT_PERMANENT_FAILURE
            || code == EXIT_NON_FINITE_LOSS
            || self.permanent_exit_codes.contains(&code)
    }
}

/// Pods deleted when the job finishes.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
pub enum CleanPodPolicy {
    #[default]
    Running,
    All,
    None,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_cluster_block_gets_documented_defaults() {
        let c: ClusterSpec = serde_json::from_str("{}").unwrap();
        assert_eq!(c.nodes, 1);
        assert_eq!(c.gpus_per_node, 1);
        assert_eq!(c.master_port, 29500);
        assert_eq!(c.run_policy.backoff_limit, 3);
        assert_eq!(c.run_policy.clean_pod_policy, CleanPodPolicy::Running);
        assert_eq!(c, ClusterSpec::default());
    }

    #[test]
    fn camel_case_keys_parse_and_unknown_keys_are_rejected() {
        let c: ClusterSpec = serde_json::from_value(serde_json::json!({
            "nodes": 2, "gpusPerNode": 8, "ncclProfile": "infiniband",
            "gangScheduling": {"mode": "schedulerPlugins", "timeoutSeconds": 60},
            "runPolicy": {"backoffLimit": 5, "permanentExitCodes": [3], "cleanPodPolicy": "All"},
            "volumes": [{"name": "data", "mountPath": "/data", "readOnly": true,
                          "persistentVolumeClaim": {"claimName": "imagenet"}}]
        }))
        .unwrap();
        assert_eq!(c.world_size(), 16);
        assert_eq!(c.gang_scheduling.mode, GangMode::SchedulerPlugins);
        assert!(c.volumes[0].read_only);
        let err = serde_json::from_value::<ClusterSpec>(serde_json::json!({"gpuPerNode": 8}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("gpuPerNode"), "{err}");
    }

    #[test]
    fn cpu_job_runs_one_process_per_node() {
        let c = ClusterSpec {
            nodes: 3,
            gpus_per_node: 0,
            ..Default::default()
        };
        assert_eq!(c.procs_per_node(), 1);
        assert_eq!(c.world_size(), 3);
    }

    #[test]
    fn trainer_codes_and_user_codes_are_permanent_others_retryable() {
        let p = RunPolicy {
            permanent_exit_codes: vec![42],
            ..Default::default()
        };
        assert!(p.is_permanent_exit_code(78));
        assert!(p.is_permanent_exit_code(79));
        assert!(p.is_permanent_exit_code(42));
        assert!(!p.is_permanent_exit_code(1));
        assert!(!p.is_permanent_exit_code(137));
    }

    #[test]
    fn schema_carries_cel_rules_with_field_naming_messages() {
        let schema = serde_json::to_string(&schemars::schema_for!(ClusterSpec)).unwrap();
        assert!(schema.contains("cluster.nodes must be at least 1"));
        assert!(schema.contains("self.nodes == oldSelf.nodes"));
        assert!(schema.contains("x-kubernetes-list-map-keys"));
    }
}
