//! One pod per node: the trainer container with the rendezvous env contract, GPUs, NCCL
//! settings, volumes, placement, and the user's overrides merged in.

use std::collections::BTreeMap;

use dinoflow_api::cluster::{ClusterSpec, GangMode, NcclProfile};
use dinoflow_api::contract::{self, GPU_RESOURCE};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    EnvVarSource, Pod, PodSecurityContext, PodSpec, ResourceRequirements, SeccompProfile,
    SecretKeySelector, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use super::configmap::{CONFIG_DIR, config_path};
use super::podgroup;
use super::secret::{CA_KEY, TOKEN_KEY};
use super::{LABEL_NODE_RANK, LABEL_RUN_ATTEMPT, child_meta, names};
use crate::job::JobRef;
use crate::settings::Settings;

/// Name of the trainer container.
pub const TRAINER_CONTAINER: &str = "trainer";

/// User (and group) trainer pods run as unless `podTemplate.securityContext` says otherwise:
/// the trainer image's non-root user.
pub const DEFAULT_RUN_AS_USER: i64 = 1000;

/// Volume of the trainer's scratch at [`SCRATCH_DIR`] under a read-only root filesystem (an
/// emptyDir; the CRD reserves the name).
pub const SCRATCH_VOLUME: &str = "dinoflow-tmp";

/// Where the trainer container gets writable scratch when its root filesystem is read-only.
pub const SCRATCH_DIR: &str = "/tmp";

/// Env names that make up the rendezvous contract; user overrides cannot replace them.
pub const CONTRACT_ENV: [&str; 12] = [
    contract::MASTER_ADDR,
    contract::MASTER_PORT,
    contract::NNODES,
    contract::NODE_RANK,
    contract::NPROC_PER_NODE,
    contract::WORLD_SIZE,
    contract::JOB,
    contract::NAMESPACE,
    contract::RUN_ATTEMPT,
    contract::PROGRESS_ENDPOINT,
    contract::PROGRESS_TOKEN,
    contract::PROGRESS_CA,
];

/// What one pod depends on besides the job's identity and cluster spec.
#[derive(Clone, Debug)]
pub struct PodInputs<'a> {
    pub job: &'a JobRef,
    pub cluster: &'a ClusterSpec,
    pub settings: &'a Settings,
    pub attempt: i32,
    /// DistillJob: the teacher checkpoint resolved by the controller.
    pub teacher_checkpoint: Option<&'a str>,
}

/// All pods of the gang for the inputs' attempt, rank 0 first.
pub fn pods(inputs: &PodInputs<'_>) -> Vec<Pod> {
    (0..inputs.cluster.nodes)
        .map(|rank| pod(inputs, rank))
        .collect()
}

/// The pod of node `rank`.
pub fn pod(inputs: &PodInputs<'_>, rank: i32) -> Pod {
    let PodInputs {
        job,
        cluster,
        attempt,
        ..
    } = *inputs;
    let name = names::pod(job, attempt, rank);
    let mut meta = child_meta(job, name.clone());
    let labels = meta.labels.get_or_insert_with(BTreeMap::new);
    labels.insert(LABEL_NODE_RANK.into(), rank.to_string());
    labels.insert(LABEL_RUN_ATTEMPT.into(), attempt.to_string());
    let mut annotations = BTreeMap::new();

    let mut spec = PodSpec {
        // The operator restarts whole gangs; a kubelet restart of one rank would hang NCCL.
        restart_policy: Some("Never".into()),
        hostname: Some(name),
        subdomain: Some(names::service(job)),
        termination_grace_period_seconds: Some(cluster.termination_grace_period_seconds),
        node_selector: (!cluster.node_selector.is_empty()).then(|| cluster.node_selector.clone()),
        tolerations: (!cluster.tolerations.is_empty()).then(|| cluster.tolerations.clone()),
        affinity: cluster.affinity.clone(),
        priority_class_name: cluster.priority_class_name.clone(),
        scheduler_name: scheduler_name(cluster),
        // The trainer needs no API access.
        automount_service_account_token: Some(false),
        containers: vec![trainer_container(inputs, rank)],
        volumes: Some(volumes(inputs)),
        ..Default::default()
    };

    match cluster.gang_scheduling.mode {
        GangMode::None => {}
        GangMode::Volcano => {
            annotations.insert(
                podgroup::VOLCANO_GROUP_ANNOTATION.into(),
                names::pod_group(job),
            );
        }
        GangMode::SchedulerPlugins => {
            labels.insert(
                podgroup::SCHEDULER_PLUGINS_GROUP_LABEL.into(),
                names::pod_group(job),
            );
        }
    }

    if let Some(o) = &cluster.pod_template {
        for (k, v) in &o.labels {
            // The operator's own labels select the gang; a user value must not break that.
            labels.entry(k.clone()).or_insert_with(|| v.clone());
        }
        for (k, v) in &o.annotations {
            annotations.entry(k.clone()).or_insert_with(|| v.clone());
        }
        if o.service_account_name.is_some() {
            spec.service_account_name
                .clone_from(&o.service_account_name);
        }
        if !o.image_pull_secrets.is_empty() {
            spec.image_pull_secrets = Some(o.image_pull_secrets.clone());
        }
        spec.runtime_class_name.clone_from(&o.runtime_class_name);
        if o.host_network == Some(true) {
            spec.host_network = Some(true);
            // Keep cluster DNS (the rendezvous name) reachable from the host network.
            spec.dns_policy = Some("ClusterFirstWithHostNet".into());
        }
        if !o.init_containers.is_empty() {
            spec.init_containers = Some(o.init_containers.iter().map(secured).collect());
        }
        spec.containers.extend(o.sidecars.iter().map(secured));
    }
    let user_context = cluster
        .pod_template
        .as_ref()
        .and_then(|o| o.security_context.as_ref());
    spec.security_context = Some(pod_security_context(user_context));
    if !annotations.is_empty() {
        meta.annotations = Some(annotations);
    }
    Pod {
        metadata: meta,
        spec: Some(spec),
        status: None,
    }
}

/// The scheduler the gang mode needs, unless the user named one.
fn scheduler_name(cluster: &ClusterSpec) -> Option<String> {
    match (&cluster.scheduler_name, cluster.gang_scheduling.mode) {
        (Some(name), _) => Some(name.clone()),
        (None, GangMode::Volcano) => Some(podgroup::VOLCANO_SCHEDULER.into()),
        (None, GangMode::SchedulerPlugins) => Some(podgroup::SCHEDULER_PLUGINS_SCHEDULER.into()),
        (None, GangMode::None) => None,
    }
}

fn env(name: &str, value: impl ToString) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.to_string()),
        value_from: None,
    }
}

/// A variable read from the job's Secret (never optional: the operator writes both keys
/// before the pods).
fn secret_env(name: &str, job: &JobRef, key: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: None,
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: names::secret(job),
                key: key.into(),
                optional: Some(false),
            }),
            ..Default::default()
        }),
    }
}

/// The env contract of DESIGN.md, then NCCL settings, then the user's variables.
pub fn trainer_env(inputs: &PodInputs<'_>, rank: i32) -> Vec<EnvVar> {
    let PodInputs {
        job,
        cluster,
        settings,
        attempt,
        teacher_checkpoint,
    } = *inputs;
    let mut vars = vec![
        env(contract::MASTER_ADDR, names::pod_dns(job, attempt, 0)),
        env(contract::MASTER_PORT, cluster.master_port),
        env(contract::NNODES, cluster.nodes),
        env(contract::NODE_RANK, rank),
        env(contract::NPROC_PER_NODE, cluster.procs_per_node()),
        env(contract::WORLD_SIZE, cluster.world_size()),
        env(contract::JOB, &job.name),
        env(contract::NAMESPACE, &job.namespace),
        env(contract::JOB_KIND, job.kind.as_str()),
        env(contract::RUN_ATTEMPT, attempt),
        env(contract::PROGRESS_ENDPOINT, &settings.progress_endpoint),
        secret_env(contract::PROGRESS_TOKEN, job, TOKEN_KEY),
        env(contract::CONFIG, config_path()),
    ];
    if settings.progress_ca.is_some() {
        // The endpoint serves TLS: the trainer verifies it against this CA, and only this one.
        vars.push(secret_env(contract::PROGRESS_CA, job, CA_KEY));
    }
    if let Some(path) = teacher_checkpoint {
        vars.push(env(contract::TEACHER_CHECKPOINT, path));
    }
    if cluster.run_policy.divergence_rollback_limit > 0 {
        // The restore then skips the data windows that diverged after its checkpoint.
        vars.push(env(contract::DIVERGENCE_ROLLBACK, "true"));
    }
    if cluster.gpus_per_node == 0 {
        // No GPUs: keep CUDA from grabbing a device the pod was not given.
        vars.push(env("CUDA_VISIBLE_DEVICES", ""));
    }
    let mut nccl = nccl_env(cluster.nccl_profile);
    nccl.extend(cluster.nccl_env.iter().map(|(k, v)| (k.clone(), v.clone())));
    vars.extend(nccl.into_iter().map(|(k, v)| env(&k, v)));
    if let Some(o) = &cluster.pod_template {
        for user in &o.env {
            if CONTRACT_ENV.contains(&user.name.as_str()) {
                continue;
            }
            match vars.iter_mut().find(|v| v.name == user.name) {
                Some(existing) => *existing = user.clone(),
                None => vars.push(user.clone()),
            }
        }
    }
    vars
}

/// NCCL variables of a profile.
pub fn nccl_env(profile: NcclProfile) -> BTreeMap<String, String> {
    let pairs: &[(&str, &str)] = match profile {
        // Surface NCCL problems in logs; otherwise let NCCL pick transports.
        NcclProfile::Default => &[("NCCL_DEBUG", "WARN")],
        NcclProfile::Infiniband => &[
            ("NCCL_DEBUG", "WARN"),
            ("NCCL_IB_DISABLE", "0"),
            // GPUDirect RDMA when GPU and NIC share a PCIe host bridge.
            ("NCCL_NET_GDR_LEVEL", "PHB"),
            // Longer IB retry timeout: large fabrics see transient congestion.
            ("NCCL_IB_TIMEOUT", "22"),
        ],
        NcclProfile::Ethernet => &[
            ("NCCL_DEBUG", "WARN"),
            ("NCCL_IB_DISABLE", "1"),
            ("NCCL_SOCKET_IFNAME", "eth0"),
            // More sockets and threads per peer: TCP needs parallel streams to fill a link.
            ("NCCL_NSOCKS_PERTHREAD", "4"),
            ("NCCL_SOCKET_NTHREADS", "2"),
        ],
        NcclProfile::Custom => &[],
    };
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn trainer_container(inputs: &PodInputs<'_>, rank: i32) -> Container {
    let PodInputs {
        job,
        cluster,
        settings,
        ..
    } = *inputs;
    let mut resources = cluster.resources.clone().unwrap_or_default();
    if cluster.gpus_per_node > 0 {
        let gpus = Quantity(cluster.gpus_per_node.to_string());
        // Extended resources need requests == limits.
        resources
            .limits
            .get_or_insert_with(BTreeMap::new)
            .insert(GPU_RESOURCE.into(), gpus.clone());
        resources
            .requests
            .get_or_insert_with(BTreeMap::new)
            .insert(GPU_RESOURCE.into(), gpus);
    }
    let mut mounts = vec![VolumeMount {
        name: "config".into(),
        mount_path: CONFIG_DIR.into(),
        read_only: Some(true),
        ..Default::default()
    }];
    if cluster.shm_size.is_some() {
        mounts.push(VolumeMount {
            name: "dshm".into(),
            mount_path: "/dev/shm".into(),
            ..Default::default()
        });
    }
    mounts.extend(cluster.volumes.iter().map(|v| VolumeMount {
        name: v.name.clone(),
        mount_path: v.mount_path.clone(),
        read_only: v.read_only.then_some(true),
        ..Default::default()
    }));
    let overrides = cluster.pod_template.as_ref();
    let security_context =
        trainer_security_context(overrides.and_then(|o| o.container_security_context.as_ref()));
    if needs_scratch(cluster) {
        mounts.push(VolumeMount {
            name: SCRATCH_VOLUME.into(),
            mount_path: SCRATCH_DIR.into(),
            ..Default::default()
        });
    }
    Container {
        name: TRAINER_CONTAINER.into(),
        image: Some(
            cluster
                .image
                .clone()
                .unwrap_or_else(|| settings.default_image.clone()),
        ),
        image_pull_policy: cluster.image_pull_policy.map(|p| p.as_str().to_string()),
        command: Some(vec![contract::TRAINER_COMMAND.into()]),
        args: Some(vec![
            "launch".into(),
            job.kind.trainer_subcommand().into(),
            "--config".into(),
            config_path(),
        ]),
        env: Some(trainer_env(inputs, rank)),
        env_from: overrides
            .filter(|o| !o.env_from.is_empty())
            .map(|o| o.env_from.clone()),
        ports: Some(vec![ContainerPort {
            name: Some("rendezvous".into()),
            container_port: cluster.master_port,
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        resources: (resources != ResourceRequirements::default()).then_some(resources),
        security_context: Some(security_context),
        volume_mounts: Some(mounts),
        // The trainer writes its failure reason here; `kubectl describe` and the operator's
        // events show it.
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Default::default()
    }
}

/// Secure by default: non-root (as [`DEFAULT_RUN_AS_USER`], volumes group-writable by it) under
/// the runtime's default seccomp profile. Every field the user sets in
/// `podTemplate.securityContext` wins.
pub fn pod_security_context(user: Option<&PodSecurityContext>) -> PodSecurityContext {
    let defaults = PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(DEFAULT_RUN_AS_USER),
        run_as_group: Some(DEFAULT_RUN_AS_USER),
        fs_group: Some(DEFAULT_RUN_AS_USER),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            localhost_profile: None,
        }),
        ..Default::default()
    };
    overlay(&defaults, user)
}

/// Secure by default: no capabilities, no privilege escalation. The user's container
/// `securityContext` wins field by field (`capabilities.add: [IPC_LOCK]` keeps `drop: [ALL]`).
pub fn container_security_context(user: Option<&SecurityContext>) -> SecurityContext {
    let defaults = SecurityContext {
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            add: None,
        }),
        ..Default::default()
    };
    let mut context = overlay(&defaults, user);
    if context.privileged == Some(true) {
        // The API server refuses privileged with allowPrivilegeEscalation false; a privileged
        // container (which an admin must have allowed) escalates anyway.
        context.allow_privilege_escalation = user.and_then(|u| u.allow_privilege_escalation);
    }
    context
}

/// The trainer container's context: [`container_security_context`] plus a read-only root
/// filesystem (the trainer writes only to its output directory and, on [`SCRATCH_DIR`], an
/// emptyDir). `readOnlyRootFilesystem: false` in the user's context turns it off.
pub fn trainer_security_context(user: Option<&SecurityContext>) -> SecurityContext {
    let mut context = container_security_context(user);
    if context.read_only_root_filesystem.is_none() {
        context.read_only_root_filesystem = Some(true);
    }
    context
}

/// Whether the trainer gets the scratch emptyDir: its root is read-only and no volume of the
/// job is mounted at [`SCRATCH_DIR`] already.
fn needs_scratch(cluster: &ClusterSpec) -> bool {
    let user = cluster
        .pod_template
        .as_ref()
        .and_then(|o| o.container_security_context.as_ref());
    trainer_security_context(user).read_only_root_filesystem == Some(true)
        && !cluster
            .volumes
            .iter()
            .any(|v| v.mount_path.trim_end_matches('/') == SCRATCH_DIR)
}

/// A user's init or sidecar container with the same secure defaults as the trainer (but its
/// root filesystem: their images are the user's, and may need to write to it).
fn secured(container: &Container) -> Container {
    Container {
        security_context: Some(container_security_context(
            container.security_context.as_ref(),
        )),
        ..container.clone()
    }
}

/// `defaults` with every field set in `user` replacing it; nested objects merge key by key,
/// lists and scalars are replaced.
fn overlay<T: serde::Serialize + serde::de::DeserializeOwned + Clone>(
    defaults: &T,
    user: Option<&T>,
) -> T {
    fn merge(base: &mut serde_json::Value, top: serde_json::Value) {
        match (base, top) {
            (serde_json::Value::Object(base), serde_json::Value::Object(top)) => {
                for (key, value) in top {
                    match base.get_mut(&key) {
                        Some(slot) => merge(slot, value),
                        None => {
                            base.insert(key, value);
                        }
                    }
                }
            }
            (base, top) => *base = top,
        }
    }
    let Some(user) = user else {
        return defaults.clone();
    };
    let (Ok(mut base), Ok(top)) = (serde_json::to_value(defaults), serde_json::to_value(user))
    else {
        // Kubernetes types always serialize; keep the user's context whole if one ever fails.
        return user.clone();
    };
    merge(&mut base, top);
    serde_json::from_value(base).unwrap_or_else(|_| user.clone())
}

fn volumes(inputs: &PodInputs<'_>) -> Vec<Volume> {
    let PodInputs { job, cluster, .. } = *inputs;
    let mut out = vec![Volume {
        name: "config".into(),
        config_map: Some(ConfigMapVolumeSource {
            name: names::config_map(job),
            ..Default::default()
        }),
        ..Default::default()
    }];
    if let Some(size) = &cluster.shm_size {
        out.push(Volume {
            name: "dshm".into(),
            empty_dir: Some(EmptyDirVolumeSource {
                medium: Some("Memory".into()),
                size_limit: Some(size.clone()),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    out.extend(cluster.volumes.iter().map(|v| Volume {
        name: v.name.clone(),
        persistent_volume_claim: v.persistent_volume_claim.clone(),
        host_path: v.host_path.clone(),
        empty_dir: v.empty_dir.clone(),
        nfs: v.nfs.clone(),
        csi: v.csi.clone(),
        ..Default::default()
    }));
    if needs_scratch(cluster) {
        out.push(Volume {
            name: SCRATCH_VOLUME.into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Default::default()
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use dinoflow_api::cluster::{JobVolume, PodTemplateOverrides};
    use k8s_openapi::api::core::v1::PersistentVolumeClaimVolumeSource;

    use super::*;

    fn env_of(pod: &Pod) -> BTreeMap<String, String> {
        pod.spec.as_ref().unwrap().containers[0]
            .env
            .as_ref()
            .unwrap()
            .iter()
            .filter_map(|e| Some((e.name.clone(), e.value.clone()?)))
            .collect()
    }

    fn gang(cluster: &ClusterSpec, attempt: i32) -> Vec<Pod> {
        let job = JobRef::test("vitl");
        let settings = Settings::for_tests();
        pods(&PodInputs {
            job: &job,
            cluster,
            settings: &settings,
            attempt,
            teacher_checkpoint: None,
        })
    }

    #[test]
    fn divergence_rollback_tells_the_trainer_to_skip_diverged_data_only_when_on() {
        let mut cluster = ClusterSpec {
            nodes: 1,
            ..Default::default()
        };
        assert!(!env_of(&gang(&cluster, 0)[0]).contains_key("DINOFLOW_DIVERGENCE_ROLLBACK"));
        cluster.run_policy.divergence_rollback_limit = 2;
        assert_eq!(
            env_of(&gang(&cluster, 0)[0])["DINOFLOW_DIVERGENCE_ROLLBACK"],
            "true"
        );
    }

    #[test]
    fn two_node_gang_gets_the_torchrun_env_contract() {
        let cluster = ClusterSpec {
            nodes: 2,
            gpus_per_node: 8,
            ..Default::default()
        };
        let pods = gang(&cluster, 3);
        assert_eq!(pods.len(), 2);
        let e1 = env_of(&pods[1]);
        assert_eq!(e1["MASTER_ADDR"], "vitl-a3-0.vitl.ml.svc");
        assert_eq!(e1["MASTER_PORT"], "29500");
        assert_eq!(e1["NNODES"], "2");
        assert_eq!(e1["NODE_RANK"], "1");
        assert_eq!(e1["NPROC_PER_NODE"], "8");
        assert_eq!(e1["WORLD_SIZE"], "16");
        assert_eq!(e1["DINOFLOW_JOB"], "vitl");
        assert_eq!(e1["DINOFLOW_RUN_ATTEMPT"], "3");
        assert_eq!(
            e1["DINOFLOW_PROGRESS_ENDPOINT"],
            Settings::for_tests().progress_endpoint
        );
        assert_eq!(env_of(&pods[0])["NODE_RANK"], "0");
        let token = pods[0].spec.as_ref().unwrap().containers[0]
            .env
            .as_ref()
            .unwrap()
            .iter()
            .find(|e| e.name == "DINOFLOW_PROGRESS_TOKEN")
            .unwrap();
        assert_eq!(
            token
                .value_from
                .as_ref()
                .unwrap()
                .secret_key_ref
                .as_ref()
                .unwrap()
                .name,
            "vitl-progress"
        );
        assert!(
            !env_of(&pods[0]).contains_key("DINOFLOW_PROGRESS_CA")
                && !pods[0].spec.as_ref().unwrap().containers[0]
                    .env
                    .as_ref()
                    .unwrap()
                    .iter()
                    .any(|e| e.name == "DINOFLOW_PROGRESS_CA"),
            "a plaintext endpoint hands out no CA"
        );
    }

    #[test]
    fn a_tls_endpoint_hands_its_ca_to_the_pods_from_the_jobs_secret() {
        let settings = Settings {
            progress_endpoint: "https://op.ns.svc:9090".into(),
            progress_ca: Some("-----BEGIN CERTIFICATE-----".into()),
            ..Settings::for_tests()
        };
        let job = JobRef::test("vitl");
        let cluster = ClusterSpec::default();
        let inputs = PodInputs {
            job: &job,
            cluster: &cluster,
            settings: &settings,
            attempt: 0,
            teacher_checkpoint: None,
        };
        let vars = trainer_env(&inputs, 0);
        let ca = vars
            .iter()
            .find(|e| e.name == "DINOFLOW_PROGRESS_CA")
            .unwrap();
        let source = ca
            .value_from
            .as_ref()
            .unwrap()
            .secret_key_ref
            .as_ref()
            .unwrap();
        assert_eq!(
            (source.name.as_str(), source.key.as_str()),
            ("vitl-progress", "ca.crt")
        );
    }

    #[test]
    fn pods_are_labelled_named_by_attempt_and_resolvable_through_the_service() {
        let pods = gang(
            &ClusterSpec {
                nodes: 2,
                ..Default::default()
            },
            1,
        );
        let meta = &pods[1].metadata;
        assert_eq!(meta.name.as_deref(), Some("vitl-a1-1"));
        let labels = meta.labels.as_ref().unwrap();
        assert_eq!(labels["dinoflow.dev/job"], "vitl");
        assert_eq!(labels["dinoflow.dev/node-rank"], "1");
        assert_eq!(labels["dinoflow.dev/run-attempt"], "1");
        let spec = pods[1].spec.as_ref().unwrap();
        assert_eq!(spec.hostname.as_deref(), Some("vitl-a1-1"));
        assert_eq!(spec.subdomain.as_deref(), Some("vitl"));
        assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
        assert_eq!(spec.termination_grace_period_seconds, Some(300));
        assert_eq!(meta.owner_references.as_ref().unwrap()[0].uid, "uid-vitl");
    }

    #[test]
    fn gpus_are_requested_and_limited_per_pod() {
        let pods = gang(
            &ClusterSpec {
                gpus_per_node: 4,
                ..Default::default()
            },
            0,
        );
        let r = pods[0].spec.as_ref().unwrap().containers[0]
            .resources
            .clone()
            .unwrap();
        assert_eq!(r.limits.unwrap()[GPU_RESOURCE].0, "4");
        assert_eq!(r.requests.unwrap()[GPU_RESOURCE].0, "4");
    }

    #[test]
    fn cpu_job_requests_no_gpu_and_hides_cuda() {
        let pods = gang(
            &ClusterSpec {
                gpus_per_node: 0,
                ..Default::default()
            },
            0,
        );
        let c = &pods[0].spec.as_ref().unwrap().containers[0];
        assert!(c.resources.is_none());
        assert_eq!(env_of(&pods[0])["CUDA_VISIBLE_DEVICES"], "");
        assert_eq!(env_of(&pods[0])["NPROC_PER_NODE"], "1");
    }

    #[test]
    fn nccl_profile_sets_variables_and_ncclenv_overrides_them() {
        let cluster = ClusterSpec {
            nccl_profile: NcclProfile::Ethernet,
            nccl_env: [("NCCL_SOCKET_IFNAME".to_string(), "ens5".to_string())].into(),
            ..Default::default()
        };
        let e = env_of(&gang(&cluster, 0)[0]);
        assert_eq!(e["NCCL_IB_DISABLE"], "1");
        assert_eq!(e["NCCL_SOCKET_IFNAME"], "ens5");
        assert_eq!(nccl_env(NcclProfile::Infiniband)["NCCL_IB_DISABLE"], "0");
        assert!(nccl_env(NcclProfile::Custom).is_empty());
    }

    #[test]
    fn config_and_user_volumes_are_mounted() {
        let cluster = ClusterSpec {
            shm_size: Some(Quantity("16Gi".into())),
            volumes: vec![JobVolume {
                name: "data".into(),
                mount_path: "/data".into(),
                read_only: true,
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: "imagenet".into(),
                    read_only: None,
                }),
                host_path: None,
                empty_dir: None,
                nfs: None,
                csi: None,
            }],
            ..Default::default()
        };
        let pod = &gang(&cluster, 0)[0];
        let spec = pod.spec.as_ref().unwrap();
        let vols: Vec<_> = spec
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .map(|v| v.name.as_str())
            .collect();
        // The scratch of the read-only root comes last.
        assert_eq!(vols, ["config", "dshm", "data", SCRATCH_VOLUME]);
        assert_eq!(
            spec.volumes.as_ref().unwrap()[0]
                .config_map
                .as_ref()
                .unwrap()
                .name,
            "vitl-config"
        );
        let mounts = spec.containers[0].volume_mounts.as_ref().unwrap();
        assert_eq!(
            (mounts[0].mount_path.as_str(), mounts[0].read_only),
            ("/etc/dinoflow", Some(true))
        );
        assert_eq!(mounts[1].mount_path, "/dev/shm");
        assert_eq!(
            (mounts[2].mount_path.as_str(), mounts[2].read_only),
            ("/data", Some(true))
        );
    }

    /// Evidence for `crds/fields.txt`: each placement and pod-template field of the cluster
    /// spec lands where the kubelet and the scheduler read it.
    #[test]
    fn placement_and_pod_template_fields_reach_the_pod() {
        use dinoflow_api::cluster::ImagePullPolicy;
        use k8s_openapi::api::core::v1::{
            Affinity, CSIVolumeSource, ConfigMapEnvSource, EmptyDirVolumeSource, EnvFromSource,
            HostPathVolumeSource, LocalObjectReference, NFSVolumeSource, NodeAffinity, Toleration,
        };
        let cluster = ClusterSpec {
            gpus_per_node: 0,
            image: Some("registry.example/trainer:1".into()),
            image_pull_policy: Some(ImagePullPolicy::Always),
            resources: Some(ResourceRequirements {
                requests: Some([("cpu".to_string(), Quantity("4".into()))].into()),
                ..Default::default()
            }),
            node_selector: [("pool".to_string(), "gpu".to_string())].into(),
            tolerations: vec![Toleration {
                key: Some("nvidia.com/gpu".into()),
                operator: Some("Exists".into()),
                ..Default::default()
            }],
            affinity: Some(Affinity {
                node_affinity: Some(NodeAffinity::default()),
                ..Default::default()
            }),
            priority_class_name: Some("high".into()),
            master_port: 29777,
            termination_grace_period_seconds: 120,
            volumes: ["host", "scratch", "nfs", "csi"]
                .into_iter()
                .map(|name| JobVolume {
                    name: name.into(),
                    mount_path: format!("/{name}"),
                    read_only: false,
                    persistent_volume_claim: None,
                    host_path: (name == "host").then(|| HostPathVolumeSource {
                        path: "/mnt/data".into(),
                        type_: None,
                    }),
                    empty_dir: (name == "scratch").then(EmptyDirVolumeSource::default),
                    nfs: (name == "nfs").then(|| NFSVolumeSource {
                        server: "nas".into(),
                        path: "/export".into(),
                        read_only: None,
                    }),
                    csi: (name == "csi").then(|| CSIVolumeSource {
                        driver: "lustre.csi".into(),
                        ..Default::default()
                    }),
                })
                .collect(),
            pod_template: Some(PodTemplateOverrides {
                env_from: vec![EnvFromSource {
                    config_map_ref: Some(ConfigMapEnvSource {
                        name: "s3".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }],
                image_pull_secrets: vec![LocalObjectReference {
                    name: "pull".into(),
                }],
                runtime_class_name: Some("nvidia".into()),
                init_containers: vec![Container {
                    name: "stage".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        let pod = &gang(&cluster, 0)[0];
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(spec.node_selector.as_ref().unwrap()["pool"], "gpu");
        let tolerations = spec.tolerations.as_ref().unwrap();
        assert_eq!(tolerations[0].key.as_deref(), Some("nvidia.com/gpu"));
        assert!(spec.affinity.as_ref().unwrap().node_affinity.is_some());
        assert_eq!(spec.priority_class_name.as_deref(), Some("high"));
        assert_eq!(spec.termination_grace_period_seconds, Some(120));
        assert_eq!(env_of(pod)["MASTER_PORT"], "29777");
        assert_eq!(spec.runtime_class_name.as_deref(), Some("nvidia"));
        assert_eq!(spec.image_pull_secrets.as_ref().unwrap()[0].name, "pull");
        assert_eq!(spec.init_containers.as_ref().unwrap()[0].name, "stage");
        let c = &spec.containers[0];
        assert_eq!(c.image.as_deref(), Some("registry.example/trainer:1"));
        assert_eq!(c.image_pull_policy.as_deref(), Some("Always"));
        let requests = c.resources.as_ref().unwrap().requests.as_ref().unwrap();
        assert_eq!(requests["cpu"], Quantity("4".into()));
        let env_from = c.env_from.as_ref().unwrap();
        assert_eq!(env_from[0].config_map_ref.as_ref().unwrap().name, "s3");
        let vols = spec.volumes.as_ref().unwrap();
        let vol = |n: &str| vols.iter().find(|v| v.name == n).unwrap();
        assert_eq!(vol("host").host_path.as_ref().unwrap().path, "/mnt/data");
        assert!(vol("scratch").empty_dir.is_some());
        assert_eq!(vol("nfs").nfs.as_ref().unwrap().server, "nas");
        assert_eq!(vol("csi").csi.as_ref().unwrap().driver, "lustre.csi");
        let mounts = c.volume_mounts.as_ref().unwrap();
        assert!(
            mounts
                .iter()
                .any(|m| m.name == "nfs" && m.mount_path == "/nfs")
        );
    }

    #[test]
    fn overrides_merge_without_breaking_the_contract() {
        let cluster = ClusterSpec {
            nodes: 2,
            pod_template: Some(PodTemplateOverrides {
                labels: [
                    ("team".to_string(), "vision".to_string()),
                    ("dinoflow.dev/job".to_string(), "hijack".to_string()),
                ]
                .into(),
                annotations: [("a".to_string(), "b".to_string())].into(),
                env: vec![
                    env("WORLD_SIZE", 99),
                    env("NCCL_DEBUG", "INFO"),
                    env("HF_HOME", "/cache"),
                ],
                service_account_name: Some("trainer".into()),
                host_network: Some(true),
                sidecars: vec![Container {
                    name: "logs".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        let pod = &gang(&cluster, 0)[1];
        let labels = pod.metadata.labels.as_ref().unwrap();
        assert_eq!(labels["team"], "vision");
        assert_eq!(labels["dinoflow.dev/job"], "vitl");
        assert_eq!(pod.metadata.annotations.as_ref().unwrap()["a"], "b");
        let e = env_of(pod);
        assert_eq!(e["WORLD_SIZE"], "2");
        assert_eq!(e["NCCL_DEBUG"], "INFO");
        assert_eq!(e["HF_HOME"], "/cache");
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(spec.service_account_name.as_deref(), Some("trainer"));
        assert_eq!(spec.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"));
        assert_eq!(spec.containers.len(), 2);
    }

    #[test]
    fn gang_modes_set_scheduler_and_group_membership() {
        let mut cluster = ClusterSpec::default();
        cluster.gang_scheduling.mode = GangMode::Volcano;
        let pod = &gang(&cluster, 0)[0];
        assert_eq!(
            pod.spec.as_ref().unwrap().scheduler_name.as_deref(),
            Some("volcano")
        );
        assert_eq!(
            pod.metadata.annotations.as_ref().unwrap()[podgroup::VOLCANO_GROUP_ANNOTATION],
            "vitl"
        );
        cluster.gang_scheduling.mode = GangMode::SchedulerPlugins;
        let pod = &gang(&cluster, 0)[0];
        assert_eq!(
            pod.spec.as_ref().unwrap().scheduler_name.as_deref(),
            Some(podgroup::SCHEDULER_PLUGINS_SCHEDULER)
        );
        assert_eq!(
            pod.metadata.labels.as_ref().unwrap()[podgroup::SCHEDULER_PLUGINS_GROUP_LABEL],
            "vitl"
        );
        cluster.scheduler_name = Some("my-sched".into());
        assert_eq!(
            gang(&cluster, 0)[0]
                .spec
                .as_ref()
                .unwrap()
                .scheduler_name
                .as_deref(),
            Some("my-sched")
        );
        assert!(
            gang(&ClusterSpec::default(), 0)[0]
                .spec
                .as_ref()
                .unwrap()
                .scheduler_name
                .is_none()
        );
    }

    #[test]
    fn image_falls_back_to_the_operator_default_and_teacher_path_is_passed() {
        let job = JobRef {
            kind: crate::job::JobKind::Distill,
            ..JobRef::test("small")
        };
        let settings = Settings::for_tests();
        let cluster = ClusterSpec::default();
        let pods = pods(&PodInputs {
            job: &job,
            cluster: &cluster,
            settings: &settings,
            attempt: 0,
            teacher_checkpoint: Some("/ckpt/big/final"),
        });
        let c = &pods[0].spec.as_ref().unwrap().containers[0];
        assert_eq!(c.image.as_deref(), Some(settings.default_image.as_str()));
        assert_eq!(c.args.as_ref().unwrap()[1], "distill");
        assert_eq!(
            env_of(&pods[0])["DINOFLOW_TEACHER_CHECKPOINT"],
            "/ckpt/big/final"
        );
    }

    #[test]
    fn pods_run_as_non_root_without_capabilities_or_escalation_by_default() {
        let cluster = ClusterSpec::default();
        let pod = &gang(&cluster, 0)[0];
        let spec = pod.spec.as_ref().unwrap();
        let ctx = spec.security_context.as_ref().unwrap();
        assert_eq!(ctx.run_as_non_root, Some(true));
        assert_eq!(ctx.run_as_user, Some(DEFAULT_RUN_AS_USER));
        assert_eq!(
            ctx.seccomp_profile.as_ref().unwrap().type_,
            "RuntimeDefault"
        );
        let c = spec.containers[0].security_context.as_ref().unwrap();
        assert_eq!(c.allow_privilege_escalation, Some(false));
        assert_eq!(
            c.capabilities.as_ref().unwrap().drop.as_deref(),
            Some(&["ALL".to_string()][..])
        );
        assert_eq!(c.privileged, None);
    }

    fn scratch_mounts(pod: &Pod) -> Vec<String> {
        let spec = pod.spec.as_ref().unwrap();
        spec.containers[0]
            .volume_mounts
            .iter()
            .flatten()
            .filter(|m| m.name == SCRATCH_VOLUME)
            .map(|m| m.mount_path.clone())
            .collect()
    }

    #[test]
    fn the_trainer_root_is_read_only_with_scratch_on_an_empty_dir() {
        let pod = &gang(&ClusterSpec::default(), 0)[0];
        let spec = pod.spec.as_ref().unwrap();
        let c = spec.containers[0].security_context.as_ref().unwrap();
        assert_eq!(c.read_only_root_filesystem, Some(true));
        assert_eq!(scratch_mounts(pod), [SCRATCH_DIR]);
        let scratch = spec
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == SCRATCH_VOLUME)
            .unwrap();
        assert!(scratch.empty_dir.is_some());
    }

    #[test]
    fn a_writable_root_or_a_job_volume_at_tmp_drops_the_scratch() {
        let writable = ClusterSpec {
            pod_template: Some(PodTemplateOverrides {
                container_security_context: Some(SecurityContext {
                    read_only_root_filesystem: Some(false),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let pod = &gang(&writable, 0)[0];
        let c = pod.spec.as_ref().unwrap().containers[0]
            .security_context
            .as_ref()
            .unwrap();
        assert_eq!(c.read_only_root_filesystem, Some(false));
        assert_eq!(
            c.allow_privilege_escalation,
            Some(false),
            "other defaults stay"
        );
        assert!(scratch_mounts(pod).is_empty());
        let vols = pod.spec.as_ref().unwrap().volumes.as_ref().unwrap();
        assert!(vols.iter().all(|v| v.name != SCRATCH_VOLUME));

        let own_tmp = ClusterSpec {
            volumes: vec![JobVolume {
                name: "fast-tmp".into(),
                mount_path: "/tmp/".into(),
                read_only: false,
                persistent_volume_claim: None,
                host_path: None,
                empty_dir: Some(EmptyDirVolumeSource::default()),
                nfs: None,
                csi: None,
            }],
            ..Default::default()
        };
        let pod = &gang(&own_tmp, 0)[0];
        assert!(scratch_mounts(pod).is_empty(), "one mount at /tmp only");
        let c = pod.spec.as_ref().unwrap().containers[0]
            .security_context
            .as_ref()
            .unwrap();
        assert_eq!(c.read_only_root_filesystem, Some(true));
    }

    #[test]
    fn the_pod_template_overrides_security_defaults_field_by_field() {
        let cluster = ClusterSpec {
            pod_template: Some(PodTemplateOverrides {
                security_context: Some(PodSecurityContext {
                    run_as_user: Some(4242),
                    ..Default::default()
                }),
                container_security_context: Some(SecurityContext {
                    capabilities: Some(Capabilities {
                        add: Some(vec!["IPC_LOCK".into()]),
                        drop: None,
                    }),
                    ..Default::default()
                }),
                sidecars: vec![Container {
                    name: "logs".into(),
                    security_context: Some(SecurityContext {
                        privileged: Some(true),
                        ..Default::default()
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        let pod = &gang(&cluster, 0)[0];
        let spec = pod.spec.as_ref().unwrap();
        let ctx = spec.security_context.as_ref().unwrap();
        assert_eq!(ctx.run_as_user, Some(4242));
        assert_eq!(
            ctx.run_as_non_root,
            Some(true),
            "unset fields keep the default"
        );
        let trainer = spec.containers[0].security_context.as_ref().unwrap();
        let caps = trainer.capabilities.as_ref().unwrap();
        assert_eq!(caps.add.as_deref(), Some(&["IPC_LOCK".to_string()][..]));
        assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
        assert_eq!(trainer.allow_privilege_escalation, Some(false));
        // A privileged sidecar (admin-allowed) cannot also forbid escalation: the API server
        // would refuse the pod.
        let sidecar = spec.containers[1].security_context.as_ref().unwrap();
        assert_eq!(sidecar.privileged, Some(true));
        assert_eq!(sidecar.allow_privilege_escalation, None);
    }
}
