//! The custom resources against the real API server: CRDs install, the examples are accepted,
//! the invalid-manifest table is rejected by the server itself, `kubectl explain` shows our
//! docs, and the controller-manager garbage-collects what a job owns.
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use dinoflow_e2e::{
    TestCluster, apply_object, load_invalid_cases, parse_manifests, repo_root, wait_for, yaml_files,
};
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Api, PostParams};
use serde::Deserialize;

const MIN_INVALID_CASES: usize = 25;

fn crd_files() -> Vec<PathBuf> {
    let files = yaml_files(&repo_root().join("crds")).expect("read crds/");
    assert!(
        !files.is_empty(),
        "no crds/*.yaml: generate them with `cargo run -p dinoflow-api --bin crdgen`"
    );
    files
}

fn example_files() -> Vec<PathBuf> {
    let files =
        yaml_files(&repo_root().join("manifests/examples")).expect("read manifests/examples/");
    assert!(!files.is_empty(), "manifests/examples/ holds no *.yaml");
    files
}

/// The shared cluster of this test binary with our CRDs installed (once).
fn cluster() -> &'static TestCluster {
    static CRDS: OnceLock<()> = OnceLock::new();
    let cluster = TestCluster::shared();
    CRDS.get_or_init(|| {
        cluster
            .install_crds(&crd_files())
            .expect("install crds/*.yaml")
    });
    cluster
}

/// Every CRD document of crds/*.yaml (a file may hold several).
fn crd_documents() -> Vec<serde_yaml_ng::Value> {
    let mut documents = Vec::new();
    for path in crd_files() {
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        for document in serde_yaml_ng::Deserializer::from_str(&text) {
            let value = serde_yaml_ng::Value::deserialize(document)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            if !value.is_null() {
                documents.push(value);
            }
        }
    }
    documents
}

/// The CRD document (from crds/) whose spec.names.kind is `kind`.
fn crd_of_kind(kind: &str) -> serde_yaml_ng::Value {
    crd_documents()
        .into_iter()
        .find(|crd| crd["spec"]["names"]["kind"].as_str() == Some(kind))
        .unwrap_or_else(|| panic!("no CRD for kind {kind} in crds/"))
}

fn kubectl_ok(args: &[&str]) -> String {
    cluster()
        .kubectl(args)
        .expect("run kubectl")
        .ok()
        .unwrap_or_else(|e| panic!("{e}"))
}

fn squash_whitespace(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[test]
fn the_crds_install_and_are_served_under_their_short_names() {
    for crd in crd_documents() {
        let name = crd["metadata"]["name"].as_str().map(str::to_owned).unwrap();
        let established = kubectl_ok(&[
            "get",
            "crd",
            &name,
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Established\")].status}",
        ]);
        assert_eq!(established, "True", "crd {name} not established");
    }
    for short in ["ptj", "dsj"] {
        kubectl_ok(&["get", short, "--all-namespaces"]);
    }
}

#[test]
fn every_example_manifest_is_accepted_by_the_api_server() {
    let cluster = cluster();
    let mut created = 0;
    for file in example_files() {
        let namespace = cluster.create_namespace("example").unwrap();
        let path = file.to_str().unwrap();
        let out = cluster
            .kubectl(["apply", "-n", namespace.as_str(), "-f", path])
            .unwrap();
        assert!(
            out.success(),
            "{} rejected:\n{}",
            file.display(),
            out.stderr
        );
        let text = std::fs::read_to_string(&file).unwrap();
        for object in parse_manifests(&text).unwrap() {
            let kind = object
                .types
                .as_ref()
                .map(|t| t.kind.clone())
                .unwrap_or_default();
            let name = object.metadata.name.clone().unwrap_or_default();
            kubectl_ok(&["get", &kind, &name, "-n", &namespace]);
            created += 1;
        }
    }
    assert!(created > 0);
}

/// Applies every document but the last for real (status through the status subresource), then
/// the last one as a server-side dry run; returns kubectl's error text for the last one.
fn rejection_of(case_manifest: &str, namespace: &str, dir: &Path) -> Result<String, String> {
    let cluster = cluster();
    let objects = parse_manifests(case_manifest).map_err(|e| format!("not YAML: {e}"))?;
    let (last, setup) = objects.split_last().ok_or("no YAML document")?;
    for (i, object) in setup.iter().enumerate() {
        let file = dir.join(format!("setup-{i}.json"));
        let mut spec_only = object.clone();
        let status = spec_only
            .data
            .as_object_mut()
            .and_then(|o| o.remove("status"));
        std::fs::write(&file, serde_json::to_vec(&spec_only).unwrap()).unwrap();
        let out = cluster
            .kubectl(["apply", "-n", namespace, "-f", file.to_str().unwrap()])
            .unwrap();
        if !out.success() {
            return Err(format!("set-up document {i} was rejected: {}", out.stderr));
        }
        if let Some(status) = status {
            let kind = object
                .types
                .as_ref()
                .map(|t| t.kind.as_str())
                .unwrap_or_default();
            let name = object.metadata.name.as_deref().unwrap_or_default();
            let patch = serde_json::json!({ "status": status }).to_string();
            let out = cluster
                .kubectl([
                    "patch",
                    kind,
                    name,
                    "-n",
                    namespace,
                    "--subresource=status",
                    "--type=merge",
                    "-p",
                    patch.as_str(),
                ])
                .unwrap();
            if !out.success() {
                return Err(format!(
                    "status of set-up document {i} was rejected: {}",
                    out.stderr
                ));
            }
        }
    }
    let file = dir.join("case.json");
    std::fs::write(&file, serde_json::to_vec(last).unwrap()).unwrap();
    let out = cluster
        .kubectl([
            "apply",
            "--dry-run=server",
            "-n",
            namespace,
            "-f",
            file.to_str().unwrap(),
        ])
        .unwrap();
    if out.success() {
        return Err(format!("accepted: {}", out.stdout.trim()));
    }
    // kubectl prefixes its own (client-side) failures with "error:"; the server's answers are
    // "Error from server (...)" or "The <Kind> \"<name>\" is invalid: ...".
    let from_server =
        out.stderr.contains("Error from server") || out.stderr.contains(" is invalid: ");
    if !from_server {
        return Err(format!(
            "rejected by kubectl itself, not the API server: {}",
            out.stderr
        ));
    }
    Ok(out.stderr)
}

#[test]
fn every_invalid_manifest_is_rejected_by_the_api_server_naming_the_field() {
    let cases = load_invalid_cases(&repo_root().join("tests/data/invalid")).unwrap();
    assert!(
        cases.len() >= MIN_INVALID_CASES,
        "tests/data/invalid/ has {} cases, want at least {MIN_INVALID_CASES}",
        cases.len()
    );
    let cluster = cluster();
    let scratch = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    for case in &cases {
        let namespace = cluster.create_namespace("invalid").unwrap();
        let dir = scratch.path().join(case.name());
        std::fs::create_dir_all(&dir).unwrap();
        match rejection_of(&case.manifest, &namespace, &dir) {
            Ok(message) if message.contains(&case.expect) => {}
            Ok(message) => failures.push(format!(
                "{}: rejected, but the message lacks {:?}:\n    {}",
                case.name(),
                case.expect,
                message.trim()
            )),
            Err(why) => failures.push(format!("{}: {why}", case.name())),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} invalid cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn kubectl_explain_shows_the_training_docs() {
    let crd = crd_of_kind("PretrainJob");
    let training = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
        ["training"];
    let doc = training["description"].as_str().unwrap_or_default();
    assert!(
        !doc.trim().is_empty(),
        "spec.training has no description in the CRD"
    );
    // explain re-wraps text, so compare with whitespace squashed; the first sentence is enough.
    let first_sentence = squash_whitespace(doc.split(". ").next().unwrap_or(doc));
    let fields: Vec<String> = training["properties"]
        .as_mapping()
        .map(|m| {
            m.keys()
                .filter_map(|k| k.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    assert!(
        !fields.is_empty(),
        "spec.training has no properties in the CRD"
    );

    // The OpenAPI document is published a few seconds after the CRD is established.
    let cluster = cluster();
    let mut last = String::new();
    let shown = wait_for(Duration::from_secs(60), || {
        let out = cluster
            .kubectl(["explain", "pretrainjob.spec.training"])
            .ok()?;
        last = format!("{}{}", out.stdout, out.stderr);
        let text = squash_whitespace(&out.stdout);
        (out.success() && text.contains(&first_sentence)).then_some(out.stdout)
    });
    let shown = shown.unwrap_or_else(|| panic!("explain lacks {first_sentence:?}:\n{last}"));
    for field in &fields {
        assert!(
            shown.contains(&format!("\n  {field}\t")),
            "explain lists no field {field}:\n{shown}"
        );
    }
}

#[tokio::test]
async fn deleting_a_pretrain_job_garbage_collects_the_configmap_it_owns() {
    let cluster = cluster();
    let namespace = cluster.create_namespace("gc").unwrap();
    let tiny = repo_root().join("manifests/examples/tiny-cpu-fashion-mnist.yaml");
    let owner = parse_manifests(&std::fs::read_to_string(&tiny).unwrap())
        .unwrap()
        .into_iter()
        .find(|o| o.types.as_ref().is_some_and(|t| t.kind == "PretrainJob"))
        .expect("the tiny example holds a PretrainJob");
    let client = cluster.client().await.unwrap();
    let created = apply_object(&client, &namespace, &owner, false)
        .await
        .unwrap();
    let name = created.metadata.name.clone().unwrap();
    let uid = created.metadata.uid.clone().expect("the server sets a uid");
    let api_version = created.types.as_ref().unwrap().api_version.clone();

    let configmaps: Api<ConfigMap> = Api::namespaced(client, &namespace);
    let owned = ConfigMap {
        metadata: ObjectMeta {
            name: Some(format!("{name}-config")),
            owner_references: Some(vec![OwnerReference {
                api_version,
                kind: "PretrainJob".into(),
                name: name.clone(),
                uid,
                controller: Some(true),
                block_owner_deletion: Some(true),
            }]),
            ..ObjectMeta::default()
        },
        data: Some([("config.yaml".to_owned(), "training: {}\n".to_owned())].into()),
        ..ConfigMap::default()
    };
    configmaps
        .create(&PostParams::default(), &owned)
        .await
        .unwrap();

    kubectl_ok(&["delete", "ptj", &name, "-n", &namespace, "--wait=false"]);
    let cm_name = format!("{name}-config");
    let started = std::time::Instant::now();
    let mut collected = false;
    while started.elapsed() < Duration::from_secs(120) {
        if configmaps.get_opt(&cm_name).await.unwrap().is_none() {
            collected = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        collected,
        "the controller-manager did not delete configmap {cm_name} within 120 s of its owner"
    );
    eprintln!(
        "owned configmap collected {:.1?} after its PretrainJob was deleted",
        started.elapsed()
    );
}
