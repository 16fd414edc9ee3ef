//! The plain install (`manifests/install/`, the chart rendered) on a real control plane: it
//! applies server-side as the README says (client-side fails for the CRDs' size); the
//! operator's ServiceAccount can do exactly the least-privilege table of operator/README.md;
//! the operator runs under that identity through a job's gang (and refuses to take over the
//! children of a same-named job of the other kind); the admission policy refuses every
//! forbidden pod-template power; `helm upgrade` keeps the generated progress key.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use dinoflow_api::status::{JobPhase, JobStatus};
use dinoflow_api::{DistillJob, PretrainJob};
use dinoflow_e2e::{TestCluster, find_binary, load_invalid_cases, repo_root, wait_for};
use dinoflow_operator::controller::{self, Scope};
use dinoflow_operator::health::Readiness;
use dinoflow_operator::leader::{self, LeaseTiming};
use dinoflow_operator::metrics::Metrics;
use dinoflow_operator::settings::Settings;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, ResourceExt};
use serde_json::json;
use tokio_util::sync::CancellationToken;

const NAMESPACE: &str = "dinoflow-system";
const SERVICE_ACCOUNT: &str = "system:serviceaccount:dinoflow-system:dinoflow-operator";
const TIMEOUT: Duration = Duration::from_secs(60);

fn install_dir() -> PathBuf {
    repo_root().join("manifests/install")
}

/// The shared cluster of this binary with the plain install applied (once), as README says.
fn cluster() -> &'static TestCluster {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    let cluster = TestCluster::shared();
    INSTALLED.get_or_init(|| {
        let dir = install_dir();
        cluster
            .kubectl(["apply", "--server-side", "-f", dir.to_str().unwrap()])
            .unwrap()
            .ok()
            .unwrap_or_else(|e| panic!("kubectl apply --server-side -f manifests/install/: {e}"));
        let established = wait_for(TIMEOUT, || {
            cluster
                .kubectl([
                    "wait",
                    "--for=condition=Established",
                    "--timeout=10s",
                    "crd/pretrainjobs.dinoflow.dev",
                    "crd/distilljobs.dinoflow.dev",
                ])
                .ok()?
                .success()
                .then_some(())
        });
        assert!(established.is_some(), "the CRDs were not established");
    });
    cluster
}

fn kubectl_ok(args: &[&str]) -> String {
    cluster()
        .kubectl(args)
        .expect("run kubectl")
        .ok()
        .unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn the_plain_install_applies_server_side_and_not_client_side() {
    let cluster = cluster();
    for (kind, name) in [
        ("deployment", "dinoflow-operator"),
        ("serviceaccount", "dinoflow-operator"),
        ("role", "dinoflow-operator-leader"),
    ] {
        kubectl_ok(&["get", kind, name, "-n", NAMESPACE]);
    }
    kubectl_ok(&["get", "validatingadmissionpolicy", "dinoflow-pod-template"]);
    // What the README warns about: a client-side apply of the CRDs writes them whole into an
    // annotation, over the API server's 256 KiB limit.
    let crds = install_dir().join("crds.yaml");
    let client_side = cluster
        .kubectl(["apply", "--dry-run=server", "-f", crds.to_str().unwrap()])
        .unwrap();
    assert!(
        !client_side.success() && client_side.stderr.contains("Too long"),
        "client-side apply of the CRDs: {}",
        client_side.stderr
    );
}

/// One permission: (resource as `kubectl auth can-i` names it, resource names, verb).
type Permission = (String, Vec<String>, String);

/// `kubectl auth can-i --list` for `user` in `namespace`, resource rules only.
fn can_i(user: &str, namespace: &str) -> BTreeSet<Permission> {
    let out = kubectl_ok(&["auth", "can-i", "--list", "--as", user, "-n", namespace]);
    let mut permissions = BTreeSet::new();
    for line in out.lines().skip(1) {
        // Columns: resource, [non-resource URLs], [resource names], [verbs].
        let Some(first) = line.find('[') else {
            continue;
        };
        let resource = line[..first].trim().to_owned();
        let groups: Vec<Vec<String>> = line[first..]
            .split(']')
            .filter_map(|g| g.trim().strip_prefix('['))
            .map(|g| g.split_whitespace().map(str::to_owned).collect())
            .collect();
        let [urls, names, verbs] = groups.as_slice() else {
            panic!("unexpected `kubectl auth can-i --list` line: {line}");
        };
        if resource.is_empty() || !urls.is_empty() {
            continue;
        }
        let mut names = names.clone();
        names.sort();
        for verb in verbs {
            permissions.insert((resource.clone(), names.clone(), verb.clone()));
        }
    }
    permissions
}

/// The least-privilege table of operator/README.md: (permission, namespaced?) rows.
fn documented_table() -> Vec<(Permission, bool)> {
    let readme = std::fs::read_to_string(repo_root().join("operator/README.md")).unwrap();
    let table = readme
        .split("<!-- rbac-table -->")
        .nth(1)
        .and_then(|rest| rest.split("<!-- /rbac-table -->").next())
        .expect("operator/README.md has the <!-- rbac-table --> block");
    let cells = |row: &str| -> Vec<String> {
        row.trim()
            .trim_matches('|')
            .split('|')
            .map(|c| c.trim().to_owned())
            .collect()
    };
    let list = |cell: &str| -> Vec<String> {
        cell.split(',')
            .map(|s| s.trim().trim_matches('`').to_owned())
            .filter(|s| !s.is_empty())
            .collect()
    };
    let mut rows = Vec::new();
    for row in table.lines().filter(|l| l.starts_with('|')).skip(2) {
        let c = cells(row);
        assert!(c.len() >= 4, "short rbac-table row: {row}");
        let namespaced = match c[3].as_str() {
            "cluster" => false,
            "release namespace" => true,
            other => panic!("scope must be `cluster` or `release namespace`, not {other}"),
        };
        let mut names = list(&c[1]);
        names.sort();
        for resource in list(&c[0]) {
            for verb in list(&c[2]) {
                rows.push(((resource.clone(), names.clone(), verb), namespaced));
            }
        }
    }
    assert!(!rows.is_empty(), "empty rbac-table");
    rows
}

#[test]
fn the_service_account_can_do_exactly_the_documented_least_privilege_table() {
    let other = cluster().create_namespace("rbac").unwrap();
    // What any authenticated user may do (self reviews, discovery) is not the operator's.
    let nobody = "system:serviceaccount:dinoflow-system:nobody";
    let table = documented_table();
    for (namespace, in_release) in [(NAMESPACE, true), (other.as_str(), false)] {
        let baseline = can_i(nobody, namespace);
        let granted: BTreeSet<Permission> = can_i(SERVICE_ACCOUNT, namespace)
            .difference(&baseline)
            .cloned()
            .collect();
        let expected: BTreeSet<Permission> = table
            .iter()
            .filter(|(_, namespaced)| in_release || !namespaced)
            .map(|(p, _)| p.clone())
            .collect();
        assert_eq!(
            granted, expected,
            "in namespace {namespace}: `kubectl auth can-i --list` (left) differs from the \
             table in operator/README.md (right)"
        );
    }
}

#[test]
fn the_admission_policy_refuses_each_forbidden_power() {
    let cluster = cluster();
    let namespace = cluster.create_namespace("admission").unwrap();
    let cases = load_invalid_cases(&repo_root().join("tests/data/admission")).unwrap();
    assert!(cases.len() >= 5, "one case per rule at least");
    let dir = tempfile::tempdir().unwrap();
    let dry_run = |name: &str, manifest: &str| {
        let file = dir.path().join(format!("{name}.yaml"));
        std::fs::write(&file, manifest).unwrap();
        cluster
            .kubectl([
                "apply",
                "--dry-run=server",
                "-n",
                namespace.as_str(),
                "-f",
                file.to_str().unwrap(),
            ])
            .unwrap()
    };
    // A new policy takes effect once the API server has loaded it.
    let first = &cases[0];
    let loaded = wait_for(Duration::from_secs(30), || {
        let out = dry_run(&first.name(), &first.manifest);
        (!out.success() && out.stderr.contains(&first.expect)).then_some(())
    });
    assert!(loaded.is_some(), "{} was never rejected", first.name());
    let mut failures = Vec::new();
    for case in &cases {
        let out = dry_run(&case.name(), &case.manifest);
        if out.success() || !out.stderr.contains(&case.expect) {
            failures.push(format!(
                "{}: expected a rejection containing {:?}, got success={} {}",
                case.name(),
                case.expect,
                out.success(),
                out.stderr
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // The secure defaults themselves pass, in both kinds.
    for (name, manifest) in [("ok-pretrain", OK_PRETRAIN), ("ok-distill", OK_DISTILL)] {
        let out = dry_run(name, manifest);
        assert!(out.success(), "{name} rejected: {}", out.stderr);
    }
}

const OK_PRETRAIN: &str = "apiVersion: dinoflow.dev/v1alpha1
kind: PretrainJob
metadata: {name: fine}
spec:
  training: {data: {path: /data/train}}
  cluster:
    volumes: [{name: data, mountPath: /data, persistentVolumeClaim: {claimName: imagenet}}]
    podTemplate:
      securityContext: {runAsUser: 2000}
      containerSecurityContext: {capabilities: {add: [IPC_LOCK]}}
";

const OK_DISTILL: &str = "apiVersion: dinoflow.dev/v1alpha1
kind: DistillJob
metadata: {name: fine}
spec:
  teacher: {checkpoint: {format: dinoflow, path: /ckpt/teacher}}
  training: {data: {path: /data/train}}
";

/// A kube client that is the operator's ServiceAccount (the admin impersonating it), so every
/// call has exactly the chart's permissions.
async fn operator_client() -> Client {
    let kubeconfig = Kubeconfig::read_from(cluster().kubeconfig()).unwrap();
    let mut config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .unwrap();
    config.auth_info.impersonate = Some(SERVICE_ACCOUNT.into());
    config.auth_info.impersonate_groups = Some(vec![
        "system:serviceaccounts".into(),
        format!("system:serviceaccounts:{NAMESPACE}"),
        "system:authenticated".into(),
    ]);
    Client::try_from(config).unwrap()
}

/// Polls `check` until it returns Some; panics naming `what` after TIMEOUT.
async fn wait<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    dinoflow_e2e::wait_until(TIMEOUT, what, check).await
}

/// Plays kubelet: the pod runs, or its trainer exited with `code`.
async fn set_pod(pods: &Api<Pod>, name: &str, exit: Option<i32>) {
    let (phase, state) = match exit {
        None => (
            "Running",
            json!({ "running": { "startedAt": "2026-01-01T00:00:00Z" } }),
        ),
        Some(code) => (
            if code == 0 { "Succeeded" } else { "Failed" },
            json!({ "terminated": {
                "exitCode": code, "reason": "Completed",
                "startedAt": "2026-01-01T00:00:00Z", "finishedAt": "2026-01-01T00:01:00Z"
            } }),
        ),
    };
    let status = json!({ "status": {
        "phase": phase,
        "containerStatuses": [{
            "name": "trainer", "image": "dinoflow/trainer:test", "imageID": "",
            "ready": exit.is_none(), "restartCount": 0, "state": state
        }]
    }});
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap_or_else(|e| panic!("set pod {name}: {e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_runs_a_job_with_exactly_the_charts_permissions() {
    let admin = cluster().client().await.unwrap();
    let ns = cluster().create_namespace("least-privilege").unwrap();
    let as_operator = operator_client().await;

    // Leader election in the release namespace, through the lease Role only.
    let timing = LeaseTiming::for_duration(Duration::from_secs(6));
    let (mut leadership, election) = leader::elect(
        as_operator.clone(),
        NAMESPACE,
        "dinoflow-operator-leader",
        "least-privilege-test",
        timing,
    )
    .await
    .expect("elect with the chart's lease Role");
    tokio::time::timeout(TIMEOUT, leadership.acquired())
        .await
        .expect("the only candidate leads");

    // The controllers cluster-wide, as installed.
    let stop = CancellationToken::new();
    let operator = tokio::spawn(controller::run::<PretrainJob, DistillJob>(
        as_operator,
        Settings {
            default_image: "dinoflow/trainer:test".into(),
            progress_endpoint: "http://127.0.0.1:9090".into(),
            progress_key: b"least-privilege-test-key".to_vec(),
            progress_ca: None,
        },
        Metrics::default(),
        leadership,
        Readiness::default(),
        Scope::default(),
        stop.clone(),
    ));

    let jobs: Api<PretrainJob> = Api::namespaced(admin.clone(), &ns);
    let job: PretrainJob = serde_json::from_value(json!({
        "apiVersion": "dinoflow.dev/v1alpha1",
        "kind": "PretrainJob",
        "metadata": { "name": "lp" },
        "spec": {
            "training": { "data": { "path": "/data/train" } },
            "cluster": { "nodes": 2, "gpusPerNode": 0,
                         "runPolicy": { "ttlSecondsAfterFinished": 0 } },
        },
    }))
    .unwrap();
    jobs.create(&PostParams::default(), &job).await.unwrap();

    // Its children: created (create, patch) under the operator's identity.
    let pods: Api<Pod> = Api::namespaced(admin.clone(), &ns);
    let lp = ListParams::default().labels("dinoflow.dev/job=lp");
    let gang = wait("the gang of 2 pods", || async {
        let items = pods.list(&lp).await.ok()?.items;
        (items.len() == 2).then_some(items)
    })
    .await;
    for pod in &gang {
        let ctx = pod
            .spec
            .as_ref()
            .unwrap()
            .security_context
            .as_ref()
            .unwrap();
        assert_eq!(ctx.run_as_non_root, Some(true), "secure by default");
    }
    // The gang's Service and ConfigMap go out beside its pods, not necessarily before them.
    let services = Api::<Service>::namespaced(admin.clone(), &ns);
    wait("the gang's Service", || async {
        services.get("lp").await.ok()
    })
    .await;
    let config_maps = Api::<ConfigMap>::namespaced(admin.clone(), &ns);
    wait("the gang's ConfigMap", || async {
        config_maps.get("lp-config").await.ok()
    })
    .await;
    Api::<Secret>::namespaced(admin.clone(), &ns)
        .get("lp-progress")
        .await
        .unwrap();

    // A DistillJob of the same name: it runs beside the PretrainJob under its own children
    // (lp-distill...), nothing of the PretrainJob's taken over.
    let distill: DistillJob = serde_json::from_value(json!({
        "apiVersion": "dinoflow.dev/v1alpha1",
        "kind": "DistillJob",
        "metadata": { "name": "lp" },
        "spec": {
            "teacher": { "checkpoint": { "format": "dinoflow", "path": "/ckpt/teacher" } },
            "training": { "data": { "path": "/data/train" } },
            "cluster": { "nodes": 1, "gpusPerNode": 0 },
        },
    }))
    .unwrap();
    Api::<DistillJob>::namespaced(admin.clone(), &ns)
        .create(&PostParams::default(), &distill)
        .await
        .unwrap();

    // Running: the status patch.
    for pod in &gang {
        set_pod(&pods, &pod.name_any(), None).await;
    }
    let status =
        |job: Option<PretrainJob>| -> JobStatus { job.and_then(|j| j.status).unwrap_or_default() };
    wait("the job Running", || async {
        let s = status(jobs.get_opt("lp").await.ok()?);
        (s.phase() == JobPhase::Running).then_some(())
    })
    .await;
    let events: Api<Event> = Api::namespaced(admin.clone(), &ns);
    wait("an event of the job", || async {
        let list = events.list(&ListParams::default()).await.ok()?;
        list.items
            .iter()
            .any(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("lp"))
            .then_some(())
    })
    .await;
    // The DistillJob's pod beside the PretrainJob's two, each under its own name.
    let by_kind = wait("the DistillJob's pod", || async {
        let mut items: Vec<(String, String)> = (pods.list(&lp).await.ok()?.items.iter())
            .map(|p| (p.labels()["dinoflow.dev/job-kind"].clone(), p.name_any()))
            .collect();
        items.sort();
        (items.len() == 3).then_some(items)
    })
    .await;
    let pair = |k: &str, n: &str| (k.to_string(), n.to_string());
    assert_eq!(
        by_kind,
        [
            pair("DistillJob", "lp-distill-a0-0"),
            pair("PretrainJob", "lp-a0-0"),
            pair("PretrainJob", "lp-a0-1")
        ]
    );
    let service = Api::<Service>::namespaced(admin.clone(), &ns)
        .get("lp")
        .await
        .unwrap();
    assert_eq!(
        service.owner_references()[0].kind,
        "PretrainJob",
        "the Service was not taken over"
    );

    // Succeeded, then ttlSecondsAfterFinished: 0 deletes it (delete on the jobs).
    for pod in &gang {
        set_pod(&pods, &pod.name_any(), Some(0)).await;
    }
    wait("the finished job deleted by its TTL", || async {
        jobs.get_opt("lp").await.ok()?.is_none().then_some(())
    })
    .await;

    stop.cancel();
    tokio::time::timeout(TIMEOUT, operator)
        .await
        .expect("the operator stops")
        .expect("no panic");
    election.release().await;
}

#[test]
fn helm_upgrade_keeps_the_generated_progress_key() {
    let cluster = cluster();
    let namespace = cluster.create_namespace("helm").unwrap();
    let helm = find_binary("helm").unwrap_or_else(|e| panic!("{e}"));
    let chart = repo_root().join("charts/dinoflow");
    let release = "keytest";
    let run = |verb: &str| {
        let out = Command::new(&helm)
            .args([verb, release, chart.to_str().unwrap()])
            .args(["--namespace", namespace.as_str(), "--kubeconfig"])
            .arg(cluster.kubeconfig())
            // Cluster-wide parts are the plain install's here.
            .args([
                "--set",
                "crds.enabled=false",
                "--set",
                "admissionPolicy.enabled=false",
                "--set",
                "rbac.create=false",
            ])
            .output()
            .expect("run helm");
        assert!(
            out.status.success(),
            "helm {verb}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let key = || {
        kubectl_ok(&[
            "get",
            "secret",
            "keytest-dinoflow-progress-key",
            "-n",
            &namespace,
            "-o",
            "jsonpath={.data.key}",
        ])
    };
    // The progress endpoint's generated CA, certificate and key, all three.
    let tls = || {
        kubectl_ok(&[
            "get",
            "secret",
            "keytest-dinoflow-progress-tls",
            "-n",
            &namespace,
            "-o",
            "jsonpath={.data.ca\\.crt},{.data.tls\\.crt},{.data.tls\\.key}",
        ])
    };
    run("install");
    let installed = key();
    assert!(installed.len() >= 24, "{installed}");
    let installed_tls = tls();
    let parts: Vec<&str> = installed_tls.split(',').collect();
    assert!(
        parts.len() == 3 && parts.iter().all(|p| p.len() > 100),
        "{installed_tls}"
    );
    run("upgrade");
    assert_eq!(key(), installed, "the upgrade must keep the key");
    assert_eq!(
        tls(),
        installed_tls,
        "the upgrade must keep the CA the running jobs' pods were handed, and the certificate"
    );
}
