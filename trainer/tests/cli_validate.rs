//! `dinoflow-trainer validate` end to end: the shipped examples resolve, bad configs exit 78
//! naming the YAML path of the offending field.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn validate(config: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dinoflow-trainer"))
        .args(["validate", "--config"])
        .arg(config)
        .output()
        .expect("the trainer binary runs")
}

fn write_config(dir: &Path, body: &str) -> PathBuf {
    let path = dir.join("config.yaml");
    std::fs::write(&path, body).unwrap();
    path
}

#[test]
fn every_example_manifest_validates_and_prints_the_resolved_config() {
    let mut seen = 0;
    for entry in std::fs::read_dir(repo().join("manifests/examples")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let out = validate(&path);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{}: {stderr}", path.display());
        let stdout = String::from_utf8_lossy(&out.stdout);
        // The resolved config carries the defaults the file left out.
        assert!(stdout.contains("baseLr"), "{}: {stdout}", path.display());
        seen += 1;
    }
    assert!(seen >= 3, "only {seen} example manifests found");
}

#[test]
fn a_negative_base_lr_exits_78_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "training:\n  optim: {baseLr: -1}\n  data: {path: /data/train}\n",
    );
    let out = validate(&config);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(stderr.contains("optim.baseLr"), "{stderr}");
    assert!(out.stdout.is_empty());
}

#[test]
fn an_unknown_field_exits_78_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "training:\n  optim: {baseLr: 0.004, baseLearningRate: 0.1}\n  data: {path: /data/train}\n",
    );
    let out = validate(&config);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(stderr.contains("baseLearningRate"), "{stderr}");
}

#[test]
fn a_missing_file_exits_78_naming_it() {
    let out = validate(Path::new("/nonexistent/dinoflow.yaml"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(stderr.contains("/nonexistent/dinoflow.yaml"), "{stderr}");
}
