//! Exact resume, end to end through the binary: N iterations, kill -9, resume, continue to
//! 2N gives the same losses and bitwise the same weights as 2N uninterrupted (CPU, one thread).
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

mod common;
use common::{TinyJob, ckpt, have_data, kill_at_checkpoint};

fn trainer(config: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dinoflow-trainer"));
    cmd.arg("train")
        .arg("--config")
        .arg(config)
        .arg("--output-dir")
        .arg(out)
        .args(extra);
    // Bitwise equality needs the same reduction order: one intra-op thread.
    cmd.env("DINOFLOW_THREADS", "1")
        .env("OMP_NUM_THREADS", "1")
        .env("RUST_LOG", "warn");
    cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    cmd
}

/// Per-iteration total loss from metrics.jsonl; a later line for the same iteration (the
/// resumed run redoing work the killed one had done) replaces the earlier.
fn losses(out: &Path) -> BTreeMap<u64, f64> {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["type"] == "train")
        .map(|v| {
            (
                v["iteration"].as_u64().unwrap(),
                v["losses"]["total_loss"]
                    .as_f64()
                    .or(v["losses"]["total"].as_f64())
                    .unwrap(),
            )
        })
        .collect()
}

#[test]
fn killed_and_resumed_run_equals_the_uninterrupted_run_bitwise() {
    if !have_data() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = TinyJob {
        seed: 11,
        ..TinyJob::default()
    }
    .write(dir.path(), "job.yaml");

    let straight = dir.path().join("straight");
    let out = trainer(&cfg, &straight, &[]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Interrupted: kill -9 as soon as the checkpoint at N = 3 exists.
    let split = dir.path().join("split");
    let mut child = trainer(&cfg, &split, &[]).spawn().unwrap();
    kill_at_checkpoint(&mut child, &split, 3, Duration::from_secs(600));
    // Resume from exactly N (the killed run may have got further).
    let ckpt3 = ckpt(&split, 3);
    let out = trainer(&cfg, &split, &["--resume", ckpt3.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let (a, b) = (losses(&straight), losses(&split));
    assert_eq!(a.len(), 6);
    assert_eq!(a, b, "per-iteration losses differ");
    for file in [
        "student.safetensors",
        "teacher.safetensors",
        "optimizer.safetensors",
    ] {
        let x = std::fs::read(ckpt(&straight, 6).join(file)).unwrap();
        let y = std::fs::read(ckpt(&split, 6).join(file)).unwrap();
        assert!(
            x == y,
            "{file} differs between the uninterrupted and the resumed run"
        );
    }
}

#[test]
fn resume_auto_picks_the_newest_verified_checkpoint_and_skips_a_torn_one() {
    if !have_data() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = TinyJob {
        seed: 11,
        ..TinyJob::default()
    }
    .write(dir.path(), "job.yaml");
    let out_dir = dir.path().join("run");
    let out = trainer(&cfg, &out_dir, &["--max-iterations", "3"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A torn newer checkpoint (no manifest) and a temp dir left by a killed writer.
    std::fs::create_dir_all(ckpt(&out_dir, 5)).unwrap();
    std::fs::write(ckpt(&out_dir, 5).join("student.safetensors"), b"torn").unwrap();
    std::fs::create_dir_all(out_dir.join("checkpoints/.tmp-ckpt-000000006")).unwrap();
    let out = trainer(&cfg, &out_dir, &[]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("ckpt-000000005"),
        "the torn checkpoint is reported: {stderr}"
    );
    let l = losses(&out_dir);
    assert_eq!(l.keys().copied().collect::<Vec<_>>(), [1, 2, 3, 4, 5, 6]);
}

/// `model.pretrainedWeights` is read when a run starts from scratch and never on resume: the
/// resumed run succeeds after the weights file is gone and does not load it again.
#[test]
fn pretrained_weights_start_a_fresh_run_and_a_resume_does_not_reload_them() {
    if !have_data() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let source_cfg = TinyJob {
        epochs: 1,
        ..TinyJob::default()
    }
    .write(dir.path(), "source.yaml");
    let source = dir.path().join("source");
    let out = trainer(&source_cfg, &source, &[]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let weights = dir.path().join("backbone.safetensors");
    let export = Command::new(env!("CARGO_BIN_EXE_dinoflow-trainer"))
        .args(["export", "--config"])
        .arg(&source_cfg)
        .arg("--output-dir")
        .arg(&source)
        .arg("--out")
        .arg(&weights)
        .output()
        .unwrap();
    assert!(
        export.status.success(),
        "{}",
        String::from_utf8_lossy(&export.stderr)
    );

    let cfg = TinyJob::default().write(dir.path(), "job.yaml");
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "dropPathRate: 0.1}",
        &format!(
            "dropPathRate: 0.1, pretrainedWeights: {}}}",
            weights.display()
        ),
    );
    std::fs::write(&cfg, text).unwrap();
    let run = dir.path().join("run");
    let first = trainer(&cfg, &run, &["--max-iterations", "3"])
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&first.stderr);
    assert!(first.status.success(), "{log}");
    assert!(log.contains("initial weights loaded"), "{log}");
    std::fs::remove_file(&weights).unwrap();
    let resumed = trainer(&cfg, &run, &[])
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&resumed.stderr);
    assert!(resumed.status.success(), "{log}");
    assert!(log.contains("resumed from checkpoint"), "{log}");
    assert!(!log.contains("initial weights loaded"), "{log}");
    // A fresh start without the file is refused, naming the field.
    let fresh = trainer(&cfg, &dir.path().join("fresh"), &[])
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&fresh.stderr);
    assert_eq!(fresh.status.code(), Some(78), "{log}");
    assert!(log.contains("training.model.pretrainedWeights"), "{log}");
}
