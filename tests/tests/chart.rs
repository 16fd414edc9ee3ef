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
