//! The Helm chart: lint, render, schema guard rails, CRD copy in sync, and the rendered
//! manifests accepted by a real API server.
use std::path::PathBuf;
use std::process::{Command, Output};

use dinoflow_e2e::{TestCluster, find_binary, parse_manifests, repo_root, yaml_files};
use kube::api::DynamicObject;

fn chart() -> PathBuf {
    repo_root().join("charts/dinoflow")
}

fn helm(args: &[&str]) -> Output {
    let helm = find_binary("helm").unwrap_or_else(|e| panic!("{e}"));
    Command::new(helm).args(args).output().expect("run helm")
}

fn render(extra: &[&str]) -> Vec<DynamicObject> {
    let chart = chart();
    let mut args = vec![
        "template",
        "dinoflow",
        chart.to_str().unwrap(),
        "--namespace",
        "dinoflow-system",
    ];
    args.extend_from_slice(extra);
    let out = helm(&args);
    assert!(
        out.status.success(),
        "helm template failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse_manifests(&String::from_utf8_lossy(&out.stdout)).expect("rendered YAML parses")
}

fn kinds(objects: &[DynamicObject]) -> Vec<String> {
    objects
        .iter()
        .filter_map(|o| o.types.as_ref().map(|t| t.kind.clone()))
        .collect()
}

#[test]
fn helm_lint_passes_with_default_and_all_optional_parts_on() {
    let chart = chart();
    let chart = chart.to_str().unwrap();
    for extra in [
        &[][..],
        &[
            "--set",
            "serviceMonitor.enabled=true",
            "--set",
            "grafana.dashboards.enabled=true",
        ][..],
    ] {
        let mut args = vec!["lint", "--strict", chart];
        args.extend_from_slice(extra);
        let out = helm(&args);
        assert!(
            out.status.success(),
            "helm lint {extra:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn the_default_render_holds_the_crds_kept_on_uninstall_and_the_operator() {
    let objects = render(&[]);
    let found = kinds(&objects);
    for kind in [
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Deployment",
        "Service",
    ] {
        assert!(found.iter().any(|k| k == kind), "no {kind} in {found:?}");
    }
    assert!(
        !found.iter().any(|k| k == "ServiceMonitor"),
        "ServiceMonitor is off by default"
    );
    let crds: Vec<_> = objects
        .iter()
        .filter(|o| {
            o.types
                .as_ref()
                .is_some_and(|t| t.kind == "CustomResourceDefinition")
        })
        .collect();
    let generated: usize = yaml_files(&repo_root().join("crds"))
        .unwrap()
        .iter()
        .map(|f| {
            parse_manifests(&std::fs::read_to_string(f).unwrap())
                .unwrap()
                .len()
        })
        .sum();
    assert_eq!(crds.len(), generated, "one CRD per document in crds/*.yaml");
    for crd in crds {
        let keep = crd
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("helm.sh/resource-policy"));
        assert_eq!(
            keep.map(String::as_str),
            Some("keep"),
            "{:?}",
            crd.metadata.name
        );
    }
    let without = kinds(&render(&["--set", "crds.enabled=false"]));
    assert!(!without.iter().any(|k| k == "CustomResourceDefinition"));
}

#[test]
fn service_monitor_and_dashboards_render_when_enabled() {
    let objects = render(&[
        "--set",
        "serviceMonitor.enabled=true",
        "--set",
        "grafana.dashboards.enabled=true",
    ]);
    assert!(kinds(&objects).iter().any(|k| k == "ServiceMonitor"));
    let dashboards: Vec<_> = objects
        .iter()
        .filter(|o| {
            o.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("grafana_dashboard"))
                .map(String::as_str)
                == Some("1")
        })
        .collect();
    assert!(
        !dashboards.is_empty(),
        "no ConfigMap labelled grafana_dashboard: \"1\""
    );
    for dashboard in dashboards {
        for (key, json) in dashboard.data["data"].as_object().unwrap() {
            let parsed: serde_json::Value = serde_json::from_str(json.as_str().unwrap())
                .unwrap_or_else(|e| panic!("{key}: {e}"));
            assert!(
                parsed["panels"].as_array().is_some_and(|p| !p.is_empty()),
                "{key} has no panels"
            );
        }
    }
}

/// `helm template` with these `--set` values must fail, naming `needle` in its error.
fn assert_rejected(sets: &[&str], needle: &str) {
    let chart = chart();
    let mut args = vec!["template", "x", chart.to_str().unwrap()];
    for set in sets {
        args.extend(["--set", set]);
    }
    let out = helm(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains(needle), "{stderr}");
}

#[test]
fn a_misspelled_value_is_rejected_by_the_schema() {
    assert_rejected(&["serviceMonitor.enabeld=true"], "enabeld");
}

#[test]
fn several_replicas_without_leader_election_fail_with_the_reason() {
    assert_rejected(
        &["replicaCount=2", "operator.leaderElection.enabled=false"],
        "leaderElection",
    );
}

#[test]
fn the_charts_crds_equal_the_generated_ones() {
    let generated = yaml_files(&repo_root().join("crds")).unwrap();
    let copied = yaml_files(&chart().join("files/crds")).unwrap();
    let names = |files: &[PathBuf]| -> Vec<_> {
        files
            .iter()
            .map(|f| f.file_name().unwrap().to_owned())
            .collect()
    };
    assert_eq!(
        names(&generated),
        names(&copied),
        "run scripts/chart-crds.sh"
    );
    for (a, b) in generated.iter().zip(&copied) {
        assert!(
            std::fs::read(a).unwrap() == std::fs::read(b).unwrap(),
            "{} differs from {}: run scripts/chart-crds.sh",
            b.display(),
            a.display()
        );
    }
}

#[test]
fn the_rendered_chart_is_accepted_by_the_api_server() {
    let chart = chart();
    let out = helm(&[
        "template",
        "dinoflow",
        chart.to_str().unwrap(),
        "--namespace",
        "dinoflow-system",
    ]);
    assert!(out.status.success());
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &out.stdout).unwrap();
    let cluster = TestCluster::shared();
    let namespace = cluster.create_namespace("chart").unwrap();
    // Namespaced objects render into dinoflow-system; point them at the test namespace.
    let text = String::from_utf8_lossy(&out.stdout).replace(
        "namespace: dinoflow-system",
        &format!("namespace: {namespace}"),
    );
    std::fs::write(file.path(), text).unwrap();
    let applied = cluster
        .kubectl([
            "apply",
            // Server-side: the CRDs are larger than the 256 KiB last-applied annotation that a
            // client-side apply would write (users install them the same way).
            "--server-side",
            "--dry-run=server",
            "-f",
            file.path().to_str().unwrap(),
        ])
        .unwrap();
    assert!(applied.success(), "{}", applied.stderr);
}

/// The rendered object of `kind` named `name`.
fn object<'a>(objects: &'a [DynamicObject], kind: &str, name: &str) -> &'a DynamicObject {
    objects
        .iter()
        .find(|o| {
            o.types.as_ref().is_some_and(|t| t.kind == kind)
                && o.metadata.name.as_deref() == Some(name)
        })
        .unwrap_or_else(|| panic!("no {kind} {name} in the render"))
}

/// The operator container of the rendered Deployment.
fn operator_container(objects: &[DynamicObject]) -> serde_json::Value {
    let deployment = object(objects, "Deployment", "dinoflow-operator");
    deployment.data["spec"]["template"]["spec"]["containers"][0].clone()
}

#[test]
fn only_the_leader_is_ready_and_updates_replace_the_replicas_at_once() {
    let objects = render(&["--set", "replicaCount=2"]);
    let container = operator_container(&objects);
    // /readyz is 503 on a standby (operator/src/health.rs); /healthz would admit it to the
    // progress Service although only the leader serves progress reports.
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    let deployment = object(&objects, "Deployment", "dinoflow-operator");
    // A rolling update would wait forever for a new replica that cannot lead.
    assert_eq!(deployment.data["spec"]["strategy"]["type"], "Recreate");
    // Headless: DNS answers with Ready pods only (the leader), and needs no kube-proxy.
    let service = object(&objects, "Service", "dinoflow-operator");
    assert_eq!(service.data["spec"]["clusterIP"], "None");
    assert!(service.data["spec"].get("type").is_none());
}

/// Env vars the kube client's in-cluster config reads (the chart's apiServer.* values).
const KUBE_CLIENT_ENV: [&str; 2] = ["KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"];

#[test]
fn api_server_values_set_the_kube_clients_address_and_a_host_alias() {
    let env_value = |container: &serde_json::Value, name: &str| {
        container["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .map(|e| e["value"].as_str().unwrap().to_owned())
    };
    // Default: the kubelet's values, no alias.
    let objects = render(&[]);
    let container = operator_container(&objects);
    for name in KUBE_CLIENT_ENV {
        assert_eq!(env_value(&container, name), None);
    }
    let pod = &object(&objects, "Deployment", "dinoflow-operator").data["spec"]["template"]["spec"];
    assert!(pod.get("hostAliases").is_none());

    let objects = render(&[
        "--set",
        "apiServer.host=kubernetes.default.svc",
        "--set",
        "apiServer.port=24443",
        "--set",
        "apiServer.address=10.70.1.1",
    ]);
    let container = operator_container(&objects);
    assert_eq!(
        env_value(&container, "KUBERNETES_SERVICE_HOST").as_deref(),
        Some("kubernetes.default.svc")
    );
    assert_eq!(
        env_value(&container, "KUBERNETES_SERVICE_PORT").as_deref(),
        Some("24443")
    );
    let pod = &object(&objects, "Deployment", "dinoflow-operator").data["spec"]["template"]["spec"];
    assert_eq!(
        pod["hostAliases"],
        serde_json::json!([{"ip": "10.70.1.1", "hostnames": ["kubernetes.default.svc"]}])
    );

    // Half a setting is refused with the fix.
    assert_rejected(
        &["apiServer.host=kubernetes.default.svc"],
        "apiServer.host needs apiServer.port",
    );
    assert_rejected(
        &["apiServer.port=6443"],
        "apiServer.port needs apiServer.host",
    );
    assert_rejected(
        &["apiServer.address=10.70.1.1"],
        "apiServer.address needs apiServer.host",
    );
    assert_rejected(
        &[
            "apiServer.host=10.70.1.1",
            "apiServer.port=6443",
            "apiServer.address=10.70.1.2",
        ],
        "drop apiServer.address",
    );
    // The schema refuses a URL or an address that is not one.
    assert_rejected(
        &["apiServer.host=https://api:6443", "apiServer.port=6443"],
        "/apiServer/host",
    );
    assert_rejected(
        &[
            "apiServer.host=api",
            "apiServer.port=6443",
            "apiServer.address=api",
        ],
        "/apiServer/address",
    );
    assert_rejected(&["service.type=NodePort"], "type");
}

#[test]
fn the_deployment_sets_only_env_vars_the_operator_reads() {
    let mut known = dinoflow_operator::settings::env_names();
    known.extend(KUBE_CLIENT_ENV.map(str::to_owned));
    for extra in [
        &[][..],
        &[
            "--set",
            "operator.watchNamespace=ml",
            "--set",
            "operator.logFormat=text",
            "--set",
            "apiServer.host=kubernetes.default.svc",
            "--set",
            "apiServer.port=6443",
        ][..],
    ] {
        let objects = render(extra);
        let container = operator_container(&objects);
        let env = container["env"].as_array().expect("env list");
        let names: Vec<&str> = env.iter().map(|e| e["name"].as_str().unwrap()).collect();
        for name in &names {
            assert!(
                known.iter().any(|k| k == name),
                "the chart sets {name}, which dinoflow-operator does not read (it reads {known:?})"
            );
        }
        // The settings a production install depends on are really passed.
        for needed in [
            "DINOFLOW_LEADER_ELECT",
            "DINOFLOW_PROGRESS_KEY_FILE",
            "DINOFLOW_PROGRESS_ENDPOINT",
            "DINOFLOW_PROGRESS_TLS_CERT_FILE",
            "DINOFLOW_PROGRESS_TLS_KEY_FILE",
            "DINOFLOW_PROGRESS_TLS_CA_FILE",
            "DINOFLOW_HEALTH_ADDR",
            "DINOFLOW_PROGRESS_ADDR",
            "POD_NAMESPACE",
        ] {
            assert!(names.contains(&needed), "{needed} not set: {names:?}");
        }
        let value = |name: &str| {
            env.iter()
                .find(|e| e["name"] == name)
                .and_then(|e| e["value"].as_str())
                .map(str::to_owned)
        };
        assert_eq!(value("DINOFLOW_LEADER_ELECT").as_deref(), Some("true"));
        if extra.is_empty() {
            assert_eq!(
                value("DINOFLOW_WATCH_NAMESPACE"),
                None,
                "empty: all namespaces"
            );
            assert_eq!(value("DINOFLOW_LOG_FORMAT").as_deref(), Some("json"));
        } else {
            assert_eq!(value("DINOFLOW_WATCH_NAMESPACE").as_deref(), Some("ml"));
            assert_eq!(value("DINOFLOW_LOG_FORMAT").as_deref(), Some("text"));
        }
    }
}

#[test]
fn the_progress_key_is_a_generated_secret_mounted_where_the_operator_reads_it() {
    let objects = render(&[]);
    let secret = object(&objects, "Secret", "dinoflow-progress-key");
    let key = secret.data["data"]["key"].as_str().expect("data.key");
    assert!(key.len() >= 24, "a key of at least 16 bytes, base64: {key}");
    let container = operator_container(&objects);
    let file = container["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "DINOFLOW_PROGRESS_KEY_FILE")
        .and_then(|e| e["value"].as_str())
        .unwrap()
        .to_owned();
    let mount = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| file.starts_with(m["mountPath"].as_str().unwrap()))
        .unwrap_or_else(|| panic!("no volume mounted at {file}"));
    let deployment = object(&objects, "Deployment", "dinoflow-operator");
    let volume = deployment.data["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap()
        .clone();
    assert_eq!(volume["secret"]["secretName"], "dinoflow-progress-key");
    assert_eq!(file.rsplit('/').next(), Some("key"), "the Secret's key");

    // A user's own Secret: nothing generated, theirs mounted (the TLS Secret too, see below).
    let objects = render(&[
        "--set",
        "progressKey.existingSecret=mine",
        "--set",
        "progressTls.existingSecret=mine-tls",
    ]);
    assert!(!kinds(&objects).iter().any(|k| k == "Secret"));
    let deployment = object(&objects, "Deployment", "dinoflow-operator");
    assert_eq!(
        deployment.data["spec"]["template"]["spec"]["volumes"][0]["secret"]["secretName"],
        "mine"
    );
}

/// Where the Deployment's env var `name` points: (file value, Secret the directory is mounted from).
fn mounted_file(objects: &[DynamicObject], name: &str) -> (String, String) {
    let container = operator_container(objects);
    let file = container["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
        .and_then(|e| e["value"].as_str())
        .unwrap_or_else(|| panic!("{name} not set"))
        .to_owned();
    let mount = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| file.starts_with(&format!("{}/", m["mountPath"].as_str().unwrap())))
        .unwrap_or_else(|| panic!("no volume mounted at {file}"))
        .clone();
    let deployment = object(objects, "Deployment", "dinoflow-operator");
    let volume = deployment.data["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap()
        .clone();
    let secret = volume["secret"]["secretName"].as_str().unwrap().to_owned();
    (file, secret)
}

#[test]
fn the_progress_tls_secret_is_generated_for_the_service_and_the_operator_accepts_it() {
    use dinoflow_operator::tls::{ServerTls, TlsFiles};
    let objects = render(&[]);
    let generated = object(&objects, "Secret", "dinoflow-progress-tls");
    let secret: k8s_openapi::api::core::v1::Secret =
        serde_json::from_value(serde_json::to_value(generated).unwrap()).unwrap();
    assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
    let data = secret.data.expect("data");
    let dir = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for (var, key) in [
        ("DINOFLOW_PROGRESS_TLS_CERT_FILE", "tls.crt"),
        ("DINOFLOW_PROGRESS_TLS_KEY_FILE", "tls.key"),
        ("DINOFLOW_PROGRESS_TLS_CA_FILE", "ca.crt"),
    ] {
        let (file, from) = mounted_file(&objects, var);
        assert_eq!(from, "dinoflow-progress-tls", "{var}");
        assert_eq!(
            file.rsplit('/').next(),
            Some(key),
            "{var}: the Secret's {key}"
        );
        let path = dir.path().join(key);
        std::fs::write(
            &path,
            &data.get(key).unwrap_or_else(|| panic!("no {key}")).0,
        )
        .unwrap();
        files.push(path);
    }
    let container = operator_container(&objects);
    let endpoint = container["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "DINOFLOW_PROGRESS_ENDPOINT")
        .and_then(|e| e["value"].as_str())
        .unwrap()
        .to_owned();
    assert!(
        endpoint.starts_with("https://dinoflow-operator.dinoflow-system.svc:"),
        "{endpoint}"
    );
    // What helm's genCA/genSignedCert made passes the operator's own start-up checks: PEM,
    // key matching the certificate, and the chain to the CA for the host trainers dial.
    let files = TlsFiles {
        cert: files[0].clone(),
        key: files[1].clone(),
        ca: files[2].clone(),
    };
    let tls = ServerTls::load(&files, &endpoint).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(tls.ca_pem.as_bytes(), data["ca.crt"].0.as_slice());
    // ... and a name outside the Service's does not.
    assert!(ServerTls::load(&files, "https://dinoflow-operator.other.svc:9090").is_err());

    // A user's own Secret (e.g. one cert-manager writes): nothing generated, theirs mounted.
    let objects = render(&["--set", "progressTls.existingSecret=from-cert-manager"]);
    assert!(
        !objects
            .iter()
            .any(|o| o.metadata.name.as_deref() == Some("dinoflow-progress-tls"))
    );
    let (_, from) = mounted_file(&objects, "DINOFLOW_PROGRESS_TLS_CA_FILE");
    assert_eq!(from, "from-cert-manager");
}

/// Rules of a rendered (Cluster)Role as (apiGroup, resource, resourceNames, verb) tuples.
fn rules(role: &DynamicObject) -> Vec<(String, String, Vec<String>, String)> {
    let strings = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .map(|a| a.iter().map(|s| s.as_str().unwrap().to_owned()).collect())
            .unwrap_or_default()
    };
    let mut out = Vec::new();
    for rule in role.data["rules"].as_array().unwrap() {
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                for verb in strings(&rule["verbs"]) {
                    out.push((
                        group.clone(),
                        resource.clone(),
                        strings(&rule["resourceNames"]),
                        verb,
                    ));
                }
            }
        }
    }
    out
}

#[test]
fn rbac_grants_no_wildcards_or_unused_verbs_and_the_lease_only_in_the_release_namespace() {
    let objects = render(&[]);
    let cluster_role = rules(object(&objects, "ClusterRole", "dinoflow-operator"));
    for (group, resource, _, verb) in &cluster_role {
        assert!(
            ![
                "*",
                "update",
                "deletecollection",
                "escalate",
                "bind",
                "impersonate"
            ]
            .contains(&verb.as_str())
                && group != "*"
                && resource != "*",
            "{group}/{resource}: {verb}"
        );
        assert_ne!(
            resource, "leases",
            "the Lease belongs in the namespaced Role"
        );
    }
    for needed in [
        ("", "secrets", "create"),
        ("dinoflow.dev", "pretrainjobs", "delete"),
        ("dinoflow.dev", "distilljobs/status", "patch"),
    ] {
        assert!(
            cluster_role
                .iter()
                .any(|(g, r, _, v)| (g.as_str(), r.as_str(), v.as_str()) == needed),
            "{needed:?} missing"
        );
    }
    let role = object(&objects, "Role", "dinoflow-operator-leader");
    assert_eq!(role.metadata.namespace.as_deref(), Some("dinoflow-system"));
    assert!(
        rules(role)
            .iter()
            .all(|(g, r, _, _)| g == "coordination.k8s.io" && r == "leases")
    );
    let without = render(&["--set", "operator.leaderElection.enabled=false"]);
    assert!(!kinds(&without).iter().any(|k| k == "Role"));
}

#[test]
fn the_admission_policy_checks_only_what_the_admin_did_not_allow() {
    let policy = |extra: &[&str]| -> Option<String> {
        let objects = render(extra);
        objects
            .iter()
            .find(|o| {
                o.types
                    .as_ref()
                    .is_some_and(|t| t.kind == "ValidatingAdmissionPolicy")
            })
            .map(|o| o.data["spec"]["validations"].to_string())
    };
    let all = policy(&[]).expect("the policy is on by default");
    for rule in ["privileged", "hostNetwork", "hostPath", "sidecars"] {
        assert!(all.contains(rule), "no {rule} rule in {all}");
    }
    let host_network = policy(&["--set", "admissionPolicy.allow.hostNetwork=true"]).unwrap();
    assert!(!host_network.contains("hostNetwork"), "{host_network}");
    assert!(host_network.contains("hostPath"));
    let everything = [
        "admissionPolicy.allow.privileged=true",
        "admissionPolicy.allow.hostNetwork=true",
        "admissionPolicy.allow.hostPath=true",
        "admissionPolicy.allow.extraContainers=true",
    ];
    let sets: Vec<&str> = everything.iter().flat_map(|s| ["--set", s]).collect();
    assert_eq!(policy(&sets), None, "nothing left to refuse");
    assert_eq!(policy(&["--set", "admissionPolicy.enabled=false"]), None);
}

#[test]
fn the_plain_install_is_the_rendered_chart() {
    let fresh = tempfile::tempdir().unwrap();
    let script = repo_root().join("scripts/install-manifests.sh");
    let helm = find_binary("helm").unwrap_or_else(|e| panic!("{e}"));
    let out = Command::new("bash")
        .arg(&script)
        .arg(fresh.path())
        .env("HELM", helm)
        .output()
        .expect("run scripts/install-manifests.sh");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let committed = yaml_files(&repo_root().join("manifests/install")).unwrap();
    let rendered = yaml_files(fresh.path()).unwrap();
    let names = |files: &[PathBuf]| -> Vec<_> {
        files
            .iter()
            .map(|f| f.file_name().unwrap().to_owned())
            .collect()
    };
    assert_eq!(
        names(&committed),
        names(&rendered),
        "run scripts/install-manifests.sh"
    );
    for (a, b) in committed.iter().zip(&rendered) {
        assert!(
            std::fs::read(a).unwrap() == std::fs::read(b).unwrap(),
            "{} differs from the chart's render: run scripts/install-manifests.sh",
            a.display()
        );
    }
    // No key in the repository: the user creates the Secret (README).
    assert!(!committed.iter().any(|f| {
        std::fs::read_to_string(f)
            .unwrap()
            .contains("kind: Secret\n")
    }));
}
