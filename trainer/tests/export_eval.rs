//! `export` and `eval` through the binary, on a checkpoint a short training run wrote:
//! `eval` reproduces the training loop's own final evaluation exactly, `export` writes the
//! teacher backbone under the official key names, and evaluating the export gives the same
//! numbers again.
mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{FASHION, TinyJob, have_data};

const VAL: &str = "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz";

fn trainer(args: &[&str], extra: &[&Path]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_dinoflow-trainer"))
        .args(args)
        .args(extra)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    out
}

/// The tiny job with k-NN on (k = 5, 10) over 600 reference images and the 10k test split.
fn write_config(dir: &Path) -> std::path::PathBuf {
    let path = TinyJob::default().write(dir, "job.yaml");
    let yaml = std::fs::read_to_string(&path).unwrap();
    let yaml = yaml
        .replace(
            "evaluation: {knn: {enabled: false}, linearProbe: {enabled: false}}",
            "evaluation: {knn: {enabled: true, k: [5, 10]}, linearProbe: {enabled: false}, maxTrainImages: 600}",
        )
        .replace(
            &format!("path: {FASHION}, "),
            &format!("path: {FASHION}, valPath: {VAL}, "),
        );
    assert!(yaml.contains("valPath") && yaml.contains("maxTrainImages"));
    std::fs::write(&path, yaml).unwrap();
    path
}

/// The metrics of the last evaluation line of metrics.jsonl, as `eval` names them.
fn last_loop_evaluation(out: &Path) -> (u64, serde_json::Value) {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let line = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .rfind(|v| v["type"] == "eval")
        .expect("the loop evaluated");
    let mut metrics = serde_json::Map::new();
    for a in line["report"]["knn"].as_array().unwrap() {
        metrics.insert(format!("knn_top1_k{}", a["k"]), a["top1"].clone());
        metrics.insert(format!("knn_top5_k{}", a["k"]), a["top5"].clone());
    }
    (line["iteration"].as_u64().unwrap(), metrics.into())
}

fn report(out: &Output) -> serde_json::Value {
    assert!(out.status.success(), "exit {}", out.status);
    serde_json::from_slice(&out.stdout).expect("eval prints one JSON report")
}

#[test]
fn eval_reproduces_the_loop_and_export_round_trips_with_official_key_names() {
    if !have_data() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    let run = dir.path().join("run");
    let train = trainer(
        &["train", "--config"],
        &[&config, Path::new("--output-dir"), &run],
    );
    assert!(train.status.success(), "train exited with {}", train.status);
    let (iteration, loop_metrics) = last_loop_evaluation(&run);

    let from_ckpt = report(&trainer(
        &["eval", "--config"],
        &[&config, Path::new("--output-dir"), &run],
    ));
    assert_eq!(from_ckpt["iteration"], iteration);
    assert_eq!(from_ckpt["metrics"], loop_metrics);

    let export = dir.path().join("export/backbone.safetensors");
    let exported = trainer(
        &["export", "--config"],
        &[
            &config,
            Path::new("--output-dir"),
            &run,
            Path::new("--out"),
            &export,
        ],
    );
    assert!(
        exported.status.success(),
        "export exited with {}",
        exported.status
    );
    let tensors = tch::Tensor::read_safetensors(&export).unwrap();
    let keys: Vec<&str> = tensors.iter().map(|(k, _)| k.as_str()).collect();
    for official in [
        "cls_token",
        "pos_embed",
        "patch_embed.proj.weight",
        "blocks.1.attn.qkv.weight",
        "norm.weight",
    ] {
        assert!(keys.contains(&official), "{official} missing from {keys:?}");
    }
    assert!(keys.iter().all(|k| !k.starts_with("backbone.")), "{keys:?}");

    let from_export = report(&trainer(
        &["eval", "--raw-pixels", "--config"],
        &[&config, Path::new("--weights"), &export],
    ));
    assert_eq!(from_export["metrics"], loop_metrics);
    assert!(from_export["iteration"].is_null());
    // The raw-pixel baseline beside it, with the same k values: pixels classify
    // Fashion-MNIST far above chance (10%) even from 600 reference images.
    let raw = from_export["raw_pixels"]
        .as_object()
        .expect("raw_pixels report");
    for k in [5, 10] {
        let top1 = raw[&format!("knn_top1_k{k}")].as_f64().unwrap();
        assert!((50.0..=100.0).contains(&top1), "raw pixels k={k}: {top1}");
    }
    assert_eq!(raw.len(), 4, "{raw:?}");
    assert!(from_ckpt.get("raw_pixels").is_none(), "only on request");
}

#[test]
fn bad_sources_are_permanent_failures_that_say_what_to_do() {
    if !have_data() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    let empty = dir.path().join("empty-run");
    let cases: [(&[&Path], &str); 3] = [
        (
            &[Path::new("--output-dir"), &empty],
            "no verified checkpoint",
        ),
        (
            &[Path::new("--checkpoint"), &empty.join("ckpt-000000009")],
            "ckpt-000000009",
        ),
        (
            &[Path::new("--weights"), &dir.path().join("job.yaml")],
            "--weights",
        ),
    ];
    for (args, message) in cases {
        let out = trainer(
            &["export", "--out", "/tmp/unused.safetensors", "--config"],
            &[&[config.as_path()][..], args].concat(),
        );
        assert_eq!(
            out.status.code(),
            Some(dinoflow_api::exit_codes::PERMANENT_FAILURE),
            "{args:?}"
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(message), "{args:?}: {stderr}");
    }
}
