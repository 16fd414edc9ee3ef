//! The resolution curriculum through the binary: a two-phase run switches crops, local-crop
//! count and batch size at the phase's start (metrics.jsonl shows it), and a run killed one
//! iteration before, at, or one after the switch and resumed ends bitwise equal to the
//! uninterrupted run (CPU, one thread).
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

mod common;
use common::{TinyJob, ckpt, have_data, kill_at_checkpoint};

/// The phase starts at iteration 3 (0-based) of 6: 28px → 42px global crops, 14px → 21px
/// local crops, 2 → 1 local crops, 4 → 2 images per batch.
const SWITCH: u64 = 3;

fn write_config(dir: &Path) -> PathBuf {
    let path = TinyJob {
        seed: 13,
        checkpoint_every: 1,
        ..TinyJob::default()
    }
    .write(dir, "job.yaml");
    let mut yaml = std::fs::read_to_string(&path).unwrap();
    yaml.push_str(&format!(
        "  curriculum:\n    phases:\n      - {{name: high-res, startIteration: {SWITCH}, \
         globalCropsSize: 42, localCropsSize: 21, localCropsNumber: 1, batchSizePerGpu: 2}}\n"
    ));
    std::fs::write(&path, yaml).unwrap();
    path
}

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

fn run_ok(mut cmd: Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The `train` lines of metrics.jsonl by iteration; a later line for the same iteration (the
/// resumed run redoing work the killed one had done) replaces the earlier.
fn train_lines(out: &Path) -> BTreeMap<u64, serde_json::Value> {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["type"] == "train")
        .map(|v| (v["iteration"].as_u64().unwrap(), v))
        .collect()
}

fn losses(out: &Path) -> BTreeMap<u64, f64> {
    train_lines(out)
        .into_iter()
        .map(|(it, v)| (it, v["losses"]["total_loss"].as_f64().unwrap()))
        .collect()
}

#[test]
fn a_run_killed_before_at_or_after_a_phase_switch_resumes_bitwise() {
    if !have_data() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path());
    let straight = dir.path().join("straight");
    run_ok(trainer(&cfg, &straight, &[]));

    // The switch, in metrics.jsonl: line `n` is iteration n - 1 (0-based).
    let lines = train_lines(&straight);
    assert_eq!(lines.len(), 6);
    for (n, line) in &lines {
        let high = *n > SWITCH;
        assert_eq!(line["phase"], if high { "high-res" } else { "base" }, "{n}");
        let c = &line["curriculum"];
        let expect = if high { (42, 21, 1, 2) } else { (28, 14, 2, 4) };
        assert_eq!(
            (
                c["global_crops_size"].as_u64().unwrap(),
                c["local_crops_size"].as_u64().unwrap(),
                c["local_crops_number"].as_u64().unwrap(),
                c["batch_size_per_gpu"].as_u64().unwrap(),
            ),
            expect,
            "{n}"
        );
    }
    // The checkpoint at the switch resumes in the new phase, 3 × 4 images in.
    let text = std::fs::read_to_string(ckpt(&straight, SWITCH).join("data_position.json")).unwrap();
    let pos: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(pos["phase"], "high-res", "{pos}");
    assert_eq!(pos["samples"], 12, "{pos}");

    let reference = losses(&straight);
    for k in [SWITCH - 1, SWITCH, SWITCH + 1] {
        let split = dir.path().join(format!("split-{k}"));
        let mut child = trainer(&cfg, &split, &[]).spawn().unwrap();
        kill_at_checkpoint(&mut child, &split, k, Duration::from_secs(600));
        let from = ckpt(&split, k);
        run_ok(trainer(&cfg, &split, &["--resume", from.to_str().unwrap()]));
        assert_eq!(losses(&split), reference, "killed at {k}: losses differ");
        for file in [
            "student.safetensors",
            "teacher.safetensors",
            "optimizer.safetensors",
        ] {
            let x = std::fs::read(ckpt(&straight, 6).join(file)).unwrap();
            let y = std::fs::read(ckpt(&split, 6).join(file)).unwrap();
            assert!(
                x == y,
                "killed at {k}: {file} differs from the uninterrupted run"
            );
        }
    }
}
