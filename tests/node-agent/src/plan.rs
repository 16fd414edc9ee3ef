//! What running one pod's container as a host process takes: the program, its args and env
//! (references resolved, paths mapped), the directories and projected files its volumes
//! become, and where its log goes. Built from the pod and the objects it references, fetched
//! first ([`References::fetch`]) so that the plan itself is a pure function.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, EnvVar, KeyToPath, PersistentVolume, PersistentVolumeClaim, Pod, Secret,
    ServiceAccount,
};
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};

use super::AgentError;
use super::mapping::{PathMap, is_cluster_dns_name};

/// The IP every pod of the local node gets: they all share the host's network.
pub const POD_IP: &str = "127.0.0.1";

/// Where the agent keeps things, and what it maps commands to.
#[derive(Clone, Debug)]
pub struct Host {
    /// Per-pod directories (`pods/<namespace>/<name>-<uid>`) and claim directories
    /// (`claims/<namespace>/<claim>`) live here.
    pub root: PathBuf,
    /// Container command name -> local executable (`dinoflow-trainer` -> the built binary).
    pub binaries: BTreeMap<String, PathBuf>,
    /// The "image's" environment: variables passed from the agent to every container
    /// before the pod's own (PATH, LD_LIBRARY_PATH for libtorch, HOME).
    pub base_env: Vec<(String, String)>,
    pub node_name: String,
}

/// The objects a pod references, fetched before it starts (a kubelet does the same).
#[derive(Clone, Debug, Default)]
pub struct References {
    pub config_maps: BTreeMap<String, ConfigMap>,
    pub secrets: BTreeMap<String, Secret>,
    /// Claim name -> host path of the PersistentVolume it is bound to, for hostPath/local PVs.
    pub claim_paths: BTreeMap<String, PathBuf>,
    /// `<volume>/<path>` of a projected service-account token -> the token (TokenRequest).
    pub tokens: BTreeMap<String, String>,
}

/// One container's process, ready to start.
#[derive(Clone, Debug)]
pub struct Plan {
    pub container: String,
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
    pub dirs: Vec<PathBuf>,
    pub files: Vec<(PathBuf, Vec<u8>)>,
    pub paths: PathMap,
    pub pod_dir: PathBuf,
    pub log: PathBuf,
}

/// `<namespace>/<name>` for messages.
pub fn pod_key(pod: &Pod) -> String {
    format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any())
}

/// The per-pod directory (a new one per pod uid, so a recreated pod of the same name starts
/// clean while the logs of the old one stay).
pub fn pod_dir(root: &Path, pod: &Pod) -> PathBuf {
    let uid = pod.uid().unwrap_or_default();
    root.join("pods")
        .join(pod.namespace().unwrap_or_default())
        .join(format!("{}-{}", pod.name_any(), &uid[..uid.len().min(8)]))
}

impl References {
    /// Fetches every ConfigMap, Secret and claim the pod's volumes and env name. A missing
    /// object that is not marked optional is an error (the pod stays Pending and is retried).
    pub async fn fetch(client: &Client, pod: &Pod) -> Result<Self, AgentError> {
        let ns = pod.namespace().unwrap_or_default();
        let key = pod_key(pod);
        let spec = pod.spec.clone().unwrap_or_default();
        let mut cms: BTreeMap<String, bool> = BTreeMap::new();
        let mut secrets: BTreeMap<String, bool> = BTreeMap::new();
        let mut claims = Vec::new();
        let want = |map: &mut BTreeMap<String, bool>, name: &str, optional: Option<bool>| {
            let required = !optional.unwrap_or(false);
            *map.entry(name.to_owned()).or_default() |= required;
        };
        for v in spec.volumes.iter().flatten() {
            if let Some(cm) = &v.config_map {
                want(&mut cms, &cm.name, cm.optional);
            }
            if let Some(s) = &v.secret {
                want(
                    &mut secrets,
                    s.secret_name.as_deref().unwrap_or_default(),
                    s.optional,
                );
            }
            if let Some(c) = &v.persistent_volume_claim {
                claims.push(c.claim_name.clone());
            }
            for source in v.projected.iter().flat_map(|p| p.sources.iter().flatten()) {
                if let Some(cm) = &source.config_map {
                    want(&mut cms, &cm.name, cm.optional);
                }
                if let Some(s) = &source.secret {
                    want(&mut secrets, &s.name, s.optional);
                }
            }
        }
        for c in &spec.containers {
            for e in c.env.iter().flatten() {
                let Some(from) = &e.value_from else { continue };
                if let Some(r) = &from.config_map_key_ref {
                    want(&mut cms, &r.name, r.optional);
                }
                if let Some(r) = &from.secret_key_ref {
                    want(&mut secrets, &r.name, r.optional);
                }
            }
            for f in c.env_from.iter().flatten() {
                if let Some(r) = &f.config_map_ref {
                    want(&mut cms, &r.name, r.optional);
                }
                if let Some(r) = &f.secret_ref {
                    want(&mut secrets, &r.name, r.optional);
                }
            }
        }
        let missing = |what: String| AgentError::MissingReference {
            pod: key.clone(),
            what,
            hint: " (it is retried until it exists)",
        };
        let mut refs = Self::default();
        let cm_api: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
        for (name, required) in cms {
            match cm_api.get_opt(&name).await? {
                Some(cm) => {
                    refs.config_maps.insert(name, cm);
                }
                None if required => return Err(missing(format!("ConfigMap {name}"))),
                None => {}
            }
        }
        let secret_api: Api<Secret> = Api::namespaced(client.clone(), &ns);
        for (name, required) in secrets {
            match secret_api.get_opt(&name).await? {
                Some(s) => {
                    refs.secrets.insert(name, s);
                }
                None if required => return Err(missing(format!("Secret {name}"))),
                None => {}
            }
        }
        let pvc_api: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns);
        let pv_api: Api<PersistentVolume> = Api::all(client.clone());
        for claim in claims {
            let pvc = pvc_api
                .get_opt(&claim)
                .await?
                .ok_or_else(|| missing(format!("PersistentVolumeClaim {claim}")))?;
            let volume = pvc.spec.and_then(|s| s.volume_name);
            if let Some(volume) = volume
                && let Some(pv) = pv_api.get_opt(&volume).await?
                && let Some(spec) = pv.spec
            {
                let path = spec
                    .host_path
                    .map(|h| h.path)
                    .or(spec.local.map(|l| l.path));
                if let Some(path) = path {
                    refs.claim_paths.insert(claim, PathBuf::from(path));
                }
            }
        }
        refs.tokens = service_account_tokens(client, pod).await?;
        Ok(refs)
    }
}

/// Tokens for the pod's projected `serviceAccountToken` sources, bound to the pod (what the
/// kubelet asks the TokenRequest API for; the `kube-api-access-*` volume the ServiceAccount
/// admission plugin adds has one).
async fn service_account_tokens(
    client: &Client,
    pod: &Pod,
) -> Result<BTreeMap<String, String>, AgentError> {
    let spec = pod.spec.clone().unwrap_or_default();
    let account = spec
        .service_account_name
        .clone()
        .unwrap_or_else(|| "default".into());
    let accounts: Api<ServiceAccount> =
        Api::namespaced(client.clone(), &pod.namespace().unwrap_or_default());
    let mut tokens = BTreeMap::new();
    for v in spec.volumes.iter().flatten() {
        for source in v.projected.iter().flat_map(|p| p.sources.iter().flatten()) {
            let Some(t) = &source.service_account_token else {
                continue;
            };
            let request = TokenRequest {
                spec: Some(TokenRequestSpec {
                    audiences: t.audience.clone().map(|a| vec![a]),
                    expiration_seconds: Some(t.expiration_seconds.unwrap_or(3600)),
                    bound_object_ref: Some(BoundObjectReference {
                        api_version: Some("v1".into()),
                        kind: Some("Pod".into()),
                        name: pod.metadata.name.clone(),
                        uid: pod.metadata.uid.clone(),
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            };
            let issued: TokenRequest = accounts
                .create_subresource("token", &account, &PostParams::default(), &request)
                .await?;
            let token = issued.status.and_then(|s| s.token).unwrap_or_default();
            tokens.insert(format!("{}/{}", v.name, t.path), token);
        }
    }
    Ok(tokens)
}

/// The plan for the pod's (single) container.
pub fn plan(pod: &Pod, refs: &References, host: &Host) -> Result<Plan, AgentError> {
    let key = pod_key(pod);
    let unsupported = |message: String| AgentError::Unsupported {
        pod: key.clone(),
        message,
    };
    let spec = pod.spec.clone().unwrap_or_default();
    if spec.init_containers.as_ref().is_some_and(|c| !c.is_empty()) {
        return Err(unsupported(
            "init containers are not supported by the local node agent".into(),
        ));
    }
    let [container] = spec.containers.as_slice() else {
        return Err(unsupported(format!(
            "the local node agent runs pods of exactly one container, this one has {}",
            spec.containers.len()
        )));
    };
    let dir = pod_dir(&host.root, pod);
    let ns = pod.namespace().unwrap_or_default();

    // Volumes -> host directories (and the files projected into them).
    let mut volume_dirs: BTreeMap<String, PathBuf> = BTreeMap::new();
    let mut dirs = Vec::new();
    let mut files = Vec::new();
    for v in spec.volumes.iter().flatten() {
        let own = dir.join("volumes").join(&v.name);
        let host_dir = if let Some(cm) = &v.config_map {
            let data = refs.config_maps.get(&cm.name).map(config_map_data);
            files.extend(project(&own, data.unwrap_or_default(), cm.items.as_deref()));
            own
        } else if let Some(s) = &v.secret {
            let name = s.secret_name.clone().unwrap_or_default();
            let data = refs.secrets.get(&name).map(secret_data);
            files.extend(project(&own, data.unwrap_or_default(), s.items.as_deref()));
            own
        } else if let Some(p) = &v.projected {
            for source in p.sources.iter().flatten() {
                if let Some(cm) = &source.config_map {
                    let data = refs.config_maps.get(&cm.name).map(config_map_data);
                    files.extend(project(&own, data.unwrap_or_default(), cm.items.as_deref()));
                }
                if let Some(s) = &source.secret {
                    let data = refs.secrets.get(&s.name).map(secret_data);
                    files.extend(project(&own, data.unwrap_or_default(), s.items.as_deref()));
                }
                for item in source
                    .downward_api
                    .iter()
                    .flat_map(|d| d.items.iter().flatten())
                {
                    let value = item
                        .field_ref
                        .as_ref()
                        .and_then(|f| field(pod, &f.field_path, host))
                        .ok_or_else(|| {
                            unsupported(format!(
                                "volume {}: downwardAPI item {} (only fieldRef is supported)",
                                v.name, item.path
                            ))
                        })?;
                    files.push((own.join(&item.path), value.into_bytes()));
                }
                if let Some(t) = &source.service_account_token {
                    let token = refs.tokens.get(&format!("{}/{}", v.name, t.path));
                    files.push((
                        own.join(&t.path),
                        token.cloned().unwrap_or_default().into_bytes(),
                    ));
                }
                if source.cluster_trust_bundle.is_some() || source.pod_certificate.is_some() {
                    return Err(unsupported(format!(
                        "volume {}: clusterTrustBundle and podCertificate projections are not supported",
                        v.name
                    )));
                }
            }
            own
        } else if let Some(e) = &v.empty_dir {
            let mounted_at_shm = container
                .volume_mounts
                .iter()
                .flatten()
                .any(|m| m.name == v.name && m.mount_path == "/dev/shm");
            let mounted_at_tmp = container
                .volume_mounts
                .iter()
                .flatten()
                .any(|m| m.name == v.name && m.mount_path.trim_end_matches('/') == "/tmp");
            if e.medium.as_deref() == Some("Memory") && mounted_at_shm {
                // Shared memory is what the pod asked for, and the host has it.
                PathBuf::from("/dev/shm")
            } else if mounted_at_tmp {
                // Scratch at /tmp (the operator's, for a read-only root, which the agent does
                // not apply): the host's own /tmp. Host processes share it, and moving it would
                // move every path under it, the tests' and the demo's output dirs included.
                PathBuf::from("/tmp")
            } else {
                own
            }
        } else if let Some(h) = &v.host_path {
            PathBuf::from(&h.path)
        } else if let Some(c) = &v.persistent_volume_claim {
            refs.claim_paths
                .get(&c.claim_name)
                .cloned()
                .unwrap_or_else(|| host.root.join("claims").join(&ns).join(&c.claim_name))
        } else {
            return Err(unsupported(format!(
                "volume {}: only configMap, secret, projected, emptyDir, hostPath and \
                 persistentVolumeClaim volumes are supported by the local node agent",
                v.name
            )));
        };
        // A hostPath of a file type (File, Socket, ...) is used as it is; directories are
        // created like a kubelet's DirectoryOrCreate (or an emptyDir/claim provisioned).
        let dir_type = v
            .host_path
            .as_ref()
            .map(|h| h.type_.as_deref().unwrap_or(""));
        if dir_type.is_none_or(|t| matches!(t, "" | "Directory" | "DirectoryOrCreate")) {
            dirs.push(host_dir.clone());
        }
        volume_dirs.insert(v.name.clone(), host_dir);
    }

    let mut mounts = Vec::new();
    for m in container.volume_mounts.iter().flatten() {
        let base = volume_dirs.get(&m.name).ok_or_else(|| {
            unsupported(format!("volumeMount {} names no volume of the pod", m.name))
        })?;
        let host_dir = match m.sub_path.as_deref().filter(|s| !s.is_empty()) {
            Some(sub) => {
                let p = base.join(sub);
                dirs.push(p.clone());
                p
            }
            None => base.clone(),
        };
        mounts.push((m.mount_path.clone(), host_dir));
    }
    let paths = PathMap::new(mounts);
    // ConfigMap/Secret files are seen by the process through the path map too.
    let files = files
        .into_iter()
        .map(|(path, bytes)| match String::from_utf8(bytes) {
            Ok(text) => (path, paths.map_text(&text).into_bytes()),
            Err(e) => (path, e.into_bytes()),
        })
        .collect();

    let env = resolve_env(pod, container, refs, host, &paths)?;
    let (program, args) = command(pod, container, host, &paths, &env)?;
    let cwd = match container.working_dir.as_deref() {
        Some(wd) => paths.host_path(wd).unwrap_or_else(|| PathBuf::from(wd)),
        None => dir.clone(),
    };
    let log = dir.join(format!("{}.log", container.name));
    Ok(Plan {
        container: container.name.clone(),
        program,
        args,
        env,
        cwd,
        dirs,
        files,
        paths,
        pod_dir: dir,
        log,
    })
}

fn config_map_data(cm: &ConfigMap) -> BTreeMap<String, Vec<u8>> {
    let mut out: BTreeMap<String, Vec<u8>> = cm
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.clone().into_bytes()))
        .collect();
    out.extend(
        cm.binary_data
            .iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.0.clone())),
    );
    out
}

fn secret_data(s: &Secret) -> BTreeMap<String, Vec<u8>> {
    let mut out: BTreeMap<String, Vec<u8>> = s
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.0.clone()))
        .collect();
    out.extend(
        s.string_data
            .iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.clone().into_bytes())),
    );
    out
}

/// Files of a ConfigMap/Secret volume: every key, or only `items` at their paths.
fn project(
    dir: &Path,
    data: BTreeMap<String, Vec<u8>>,
    items: Option<&[KeyToPath]>,
) -> Vec<(PathBuf, Vec<u8>)> {
    match items {
        Some(items) if !items.is_empty() => items
            .iter()
            .filter_map(|i| Some((dir.join(&i.path), data.get(&i.key)?.clone())))
            .collect(),
        _ => data.into_iter().map(|(k, v)| (dir.join(k), v)).collect(),
    }
}

/// The container's env: the base env, then `envFrom`, then `env` (later wins, as in
/// Kubernetes), with references resolved, mount paths mapped and cluster DNS names turned
/// into 127.0.0.1.
fn resolve_env(
    pod: &Pod,
    container: &Container,
    refs: &References,
    host: &Host,
    paths: &PathMap,
) -> Result<Vec<(String, String)>, AgentError> {
    let key = pod_key(pod);
    let mut env: Vec<(String, String)> = host.base_env.clone();
    let mut set = |name: &str, value: String| {
        let value = if is_cluster_dns_name(&value) {
            POD_IP.to_owned()
        } else {
            paths.map_text(&value)
        };
        match env.iter_mut().find(|(n, _)| n == name) {
            Some(slot) => slot.1 = value,
            None => env.push((name.to_owned(), value)),
        }
    };
    for from in container.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        let data = if let Some(r) = &from.config_map_ref {
            refs.config_maps.get(&r.name).map(config_map_data)
        } else if let Some(r) = &from.secret_ref {
            refs.secrets.get(&r.name).map(secret_data)
        } else {
            None
        };
        for (k, v) in data.unwrap_or_default() {
            set(
                &format!("{prefix}{k}"),
                String::from_utf8_lossy(&v).into_owned(),
            );
        }
    }
    for var in container.env.iter().flatten() {
        if let Some(value) = env_value(pod, var, refs, host, &key)? {
            set(&var.name, value);
        }
    }
    Ok(env)
}

/// One `env` entry's value; None for an optional reference that is absent.
fn env_value(
    pod: &Pod,
    var: &EnvVar,
    refs: &References,
    host: &Host,
    key: &str,
) -> Result<Option<String>, AgentError> {
    let Some(from) = &var.value_from else {
        return Ok(Some(var.value.clone().unwrap_or_default()));
    };
    let missing = |what: String| AgentError::MissingReference {
        pod: key.to_owned(),
        what,
        hint: "",
    };
    if let Some(r) = &from.secret_key_ref {
        let value = refs
            .secrets
            .get(&r.name)
            .and_then(|s| secret_data(s).remove(&r.key));
        return match value {
            Some(v) => Ok(Some(String::from_utf8_lossy(&v).into_owned())),
            None if r.optional == Some(true) => Ok(None),
            None => Err(missing(format!(
                "key {} of Secret {} (env {})",
                r.key, r.name, var.name
            ))),
        };
    }
    if let Some(r) = &from.config_map_key_ref {
        let value = refs
            .config_maps
            .get(&r.name)
            .and_then(|c| config_map_data(c).remove(&r.key));
        return match value {
            Some(v) => Ok(Some(String::from_utf8_lossy(&v).into_owned())),
            None if r.optional == Some(true) => Ok(None),
            None => Err(missing(format!(
                "key {} of ConfigMap {} (env {})",
                r.key, r.name, var.name
            ))),
        };
    }
    if let Some(f) = &from.field_ref {
        return field(pod, &f.field_path, host)
            .map(Some)
            .ok_or_else(|| AgentError::Unsupported {
                pod: key.to_owned(),
                message: format!(
                    "env {}: fieldRef {} is not supported by the local node agent",
                    var.name, f.field_path
                ),
            });
    }
    Err(AgentError::Unsupported {
        pod: key.to_owned(),
        message: format!(
            "env {}: only value, secretKeyRef, configMapKeyRef and fieldRef are supported",
            var.name
        ),
    })
}

/// The downward API fields a kubelet resolves for `fieldRef`.
fn field(pod: &Pod, path: &str, host: &Host) -> Option<String> {
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref();
    let indexed = |prefix: &str, map: Option<&BTreeMap<String, String>>| {
        let k = path.strip_prefix(prefix)?.strip_suffix("']")?;
        Some(map.and_then(|m| m.get(k)).cloned().unwrap_or_default())
    };
    match path {
        "metadata.name" => meta.name.clone(),
        "metadata.namespace" => meta.namespace.clone(),
        "metadata.uid" => meta.uid.clone(),
        "spec.nodeName" => Some(host.node_name.clone()),
        "spec.serviceAccountName" => Some(
            spec.and_then(|s| s.service_account_name.clone())
                .unwrap_or_else(|| "default".into()),
        ),
        "status.podIP" | "status.podIPs" | "status.hostIP" | "status.hostIPs" => {
            Some(POD_IP.to_owned())
        }
        _ => indexed("metadata.labels['", meta.labels.as_ref())
            .or_else(|| indexed("metadata.annotations['", meta.annotations.as_ref())),
    }
}

/// The executable and args: `command[0]` through the agent's binaries, else a path (mapped)
/// or a name looked up in the container's PATH; everything else path-mapped.
fn command(
    pod: &Pod,
    container: &Container,
    host: &Host,
    paths: &PathMap,
    env: &[(String, String)],
) -> Result<(PathBuf, Vec<String>), AgentError> {
    let key = pod_key(pod);
    let mut argv: Vec<String> = container.command.clone().unwrap_or_default();
    let Some(first) = argv.first().cloned() else {
        return Err(AgentError::Unsupported {
            pod: key,
            message: format!(
                "container {} has no `command`: the local node agent cannot know an image's \
                 entrypoint",
                container.name
            ),
        });
    };
    argv.remove(0);
    argv.extend(container.args.clone().unwrap_or_default());
    let args = argv.iter().map(|a| paths.map_text(a)).collect();
    let program = if let Some(local) = host.binaries.get(&first) {
        local.clone()
    } else if first.contains('/') {
        paths
            .host_path(&first)
            .unwrap_or_else(|| PathBuf::from(&first))
    } else {
        let path = env
            .iter()
            .rev()
            .find(|(n, _)| n == "PATH")
            .map(|(_, v)| v.as_str())
            .unwrap_or_default();
        std::env::split_paths(path)
            .map(|d| d.join(&first))
            .find(|p| p.is_file())
            .ok_or_else(|| AgentError::UnknownCommand {
                pod: key.clone(),
                command: first.clone(),
                known: host.binaries.keys().cloned().collect::<Vec<_>>().join(", "),
            })?
    };
    Ok((program, args))
}

#[cfg(test)]
mod tests {
    use dinoflow_api::contract;
    use k8s_openapi::ByteString;
    use serde_json::json;

    use super::*;

    /// A pod as the operator writes it (operator/src/desired/pods.rs), trimmed to what the
    /// agent reads, plus a hostPath and a claim for checkpoints.
    fn operator_pod() -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "tiny-a0-0", "namespace": "ml", "uid": "0123456789abcdef",
                         "labels": {(contract::LABEL_NODE_RANK): "0"}},
            "spec": {
                "containers": [{
                    "name": "trainer",
                    "command": ["dinoflow-trainer"],
                    "args": ["launch", "train", "--config", "/etc/dinoflow/config.yaml"],
                    "env": [
                        {"name": contract::MASTER_ADDR, "value": "tiny-a0-0.tiny.ml.svc"},
                        {"name": contract::MASTER_PORT, "value": "29500"},
                        {"name": contract::CONFIG, "value": "/etc/dinoflow/config.yaml"},
                        {"name": contract::PROGRESS_TOKEN, "valueFrom": {"secretKeyRef": {"name": "tiny-progress", "key": "token"}}},
                        {"name": "RANK_LABEL", "valueFrom": {"fieldRef": {"fieldPath": format!("metadata.labels['{}']", contract::LABEL_NODE_RANK)}}},
                        {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                        {"name": "OUT", "value": "/ckpt/run"}
                    ],
                    "volumeMounts": [
                        {"name": "config", "mountPath": "/etc/dinoflow", "readOnly": true},
                        {"name": "ckpt", "mountPath": "/ckpt"},
                        {"name": "scratch", "mountPath": "/scratch"}
                    ]
                }],
                "volumes": [
                    {"name": "config", "configMap": {"name": "tiny-config"}},
                    {"name": "ckpt", "persistentVolumeClaim": {"claimName": "checkpoints"}},
                    {"name": "scratch", "emptyDir": {}}
                ]
            }
        }))
        .unwrap()
    }

    fn refs() -> References {
        let cm: ConfigMap = serde_json::from_value(json!({
            "metadata": {"name": "tiny-config"},
            "data": {"config.yaml": "spec:\n  training:\n    output:\n      dir: /ckpt/run\n"}
        }))
        .unwrap();
        let secret = Secret {
            data: Some([("token".to_string(), ByteString(b"s3cret".to_vec()))].into()),
            ..Default::default()
        };
        References {
            config_maps: [("tiny-config".to_string(), cm)].into(),
            secrets: [("tiny-progress".to_string(), secret)].into(),
            claim_paths: BTreeMap::new(),
            tokens: BTreeMap::new(),
        }
    }

    fn host() -> Host {
        Host {
            root: "/agent".into(),
            binaries: [(
                "dinoflow-trainer".to_string(),
                PathBuf::from("/build/dinoflow-trainer"),
            )]
            .into(),
            base_env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            node_name: "local".into(),
        }
    }

    fn env_of(plan: &Plan) -> BTreeMap<&str, &str> {
        plan.env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }

    #[test]
    fn the_operators_pod_becomes_the_local_trainer_with_mapped_paths() {
        let plan = plan(&operator_pod(), &refs(), &host()).unwrap();
        let dir = PathBuf::from("/agent/pods/ml/tiny-a0-0-01234567");
        assert_eq!(plan.program, PathBuf::from("/build/dinoflow-trainer"));
        let config = dir.join("volumes/config/config.yaml");
        assert_eq!(
            plan.args,
            ["launch", "train", "--config", config.to_str().unwrap()]
        );
        assert_eq!(plan.log, dir.join("trainer.log"));
        assert_eq!(plan.cwd, dir);
        // The config the trainer reads names the claim's host directory.
        let (path, bytes) = &plan.files[0];
        assert_eq!(path, &config);
        assert_eq!(
            String::from_utf8_lossy(bytes),
            "spec:\n  training:\n    output:\n      dir: /agent/claims/ml/checkpoints/run\n"
        );
        assert!(
            plan.dirs
                .contains(&PathBuf::from("/agent/claims/ml/checkpoints"))
        );
        assert!(plan.dirs.contains(&dir.join("volumes/scratch")));
    }

    #[test]
    fn an_empty_dir_at_tmp_is_the_hosts_tmp() {
        // The operator's scratch for a read-only root: paths under /tmp (the demo's output
        // dir) must stay the host's, as they were before the operator mounted it.
        let mut pod = operator_pod();
        let spec = pod.spec.as_mut().unwrap();
        spec.containers[0].volume_mounts.as_mut().unwrap()[2].mount_path = "/tmp".into();
        spec.containers[0].env.as_mut().unwrap()[6].value = Some("/tmp/demo/out".into());
        let plan = plan(&pod, &refs(), &host()).unwrap();
        assert_eq!(env_of(&plan)["OUT"], "/tmp/demo/out");
        assert!(!plan.dirs.contains(&PathBuf::from(
            "/agent/pods/ml/tiny-a0-0-01234567/volumes/scratch"
        )));
    }

    #[test]
    fn env_references_are_resolved_and_the_master_address_is_this_host() {
        let plan = plan(&operator_pod(), &refs(), &host()).unwrap();
        let env = env_of(&plan);
        assert_eq!(env[contract::MASTER_ADDR], "127.0.0.1");
        assert_eq!(env[contract::MASTER_PORT], "29500");
        assert_eq!(env[contract::PROGRESS_TOKEN], "s3cret");
        assert_eq!(env["RANK_LABEL"], "0");
        assert_eq!(env["POD"], "tiny-a0-0");
        assert_eq!(env["OUT"], "/agent/claims/ml/checkpoints/run");
        assert_eq!(env["PATH"], "/usr/bin:/bin", "the base env comes first");
    }

    #[test]
    fn a_claim_bound_to_a_host_path_volume_uses_that_path() {
        let mut refs = refs();
        refs.claim_paths
            .insert("checkpoints".into(), "/mnt/ckpt".into());
        let plan = plan(&operator_pod(), &refs, &host()).unwrap();
        assert_eq!(env_of(&plan)["OUT"], "/mnt/ckpt/run");
    }

    #[test]
    fn a_missing_secret_key_names_the_key_the_secret_and_the_variable() {
        let mut refs = refs();
        refs.secrets.clear();
        let err = plan(&operator_pod(), &refs, &host())
            .unwrap_err()
            .to_string();
        assert!(err.contains("ml/tiny-a0-0"), "{err}");
        assert!(
            err.contains("key token of Secret tiny-progress (env DINOFLOW_PROGRESS_TOKEN)"),
            "{err}"
        );
    }

    #[test]
    fn an_unknown_command_and_unsupported_volumes_are_clear_errors() {
        let mut pod = operator_pod();
        pod.spec.as_mut().unwrap().containers[0].command = Some(vec!["no-such-tool-here".into()]);
        let err = plan(&pod, &refs(), &host()).unwrap_err().to_string();
        assert!(
            err.contains("`no-such-tool-here`") && err.contains("dinoflow-trainer"),
            "{err}"
        );

        let mut pod = operator_pod();
        pod.spec.as_mut().unwrap().volumes.as_mut().unwrap()[2] = serde_json::from_value(
            json!({"name": "scratch", "nfs": {"server": "s", "path": "/x"}}),
        )
        .unwrap();
        let err = plan(&pod, &refs(), &host()).unwrap_err().to_string();
        assert!(err.contains("volume scratch"), "{err}");
    }

    #[test]
    fn a_command_without_a_slash_is_found_in_the_containers_path() {
        let mut pod = operator_pod();
        pod.spec.as_mut().unwrap().containers[0].command = Some(vec!["sh".into(), "-c".into()]);
        pod.spec.as_mut().unwrap().containers[0].args = Some(vec!["ls /ckpt".into()]);
        let plan = plan(&pod, &refs(), &host()).unwrap();
        assert!(plan.program.ends_with("sh"));
        assert_eq!(plan.args, ["-c", "ls /agent/claims/ml/checkpoints"]);
    }
}
