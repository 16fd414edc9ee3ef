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

/// `training.logging.format`: `json` turns every stderr line into a JSON object (the final
/// error included); the default `text` keeps plain lines.
#[test]
fn logging_format_json_writes_json_lines_and_text_plain_ones() {
    let dir = tempfile::tempdir().unwrap();
    let run = |format: &str| {
        let config = write_config(
            dir.path(),
            &format!(
                "training:\n  data: {{kind: imagefolder, path: {}/no-such-data}}\n  \
                 logging: {{format: {format}, metricsPort: 0}}\n",
                dir.path().display()
            ),
        );
        let out = Command::new(env!("CARGO_BIN_EXE_dinoflow-trainer"))
            .args(["train", "--config"])
            .arg(&config)
            .arg("--output-dir")
            .arg(dir.path().join("out"))
            .output()
            .expect("the trainer binary runs");
        assert_eq!(out.status.code(), Some(78));
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let json = run("json");
    let lines: Vec<&str> = json.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty());
    for line in &lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        assert!(v.get("level").is_some(), "{line}");
    }
    let last: serde_json::Value = serde_json::from_str(lines.last().unwrap()).unwrap();
    assert_eq!(last["level"], "ERROR");
    assert!(
        last["fields"]["message"]
            .as_str()
            .unwrap()
            .contains("no-such-data")
    );
    let text = run("text");
    assert!(text.lines().any(|l| l.starts_with("error: ")), "{text}");
    assert!(
        text.lines()
            .all(|l| serde_json::from_str::<serde_json::Value>(l).is_err())
    );
}
