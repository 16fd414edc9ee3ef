//! Distillation end to end through the binary: exact resume, the teacher guard, bad configs
//! (exit 78 naming the field), and learning on Fashion-MNIST from a teacher trained here.
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

mod common;
use common::{TinyJob, ckpt, have_data, kill_at_checkpoint};

const PERMANENT_FAILURE: i32 = 78;

fn trainer(sub: &str, config: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dinoflow-trainer"));
    cmd.arg(sub)
        .arg("--config")
        .arg(config)
        .arg("--output-dir")
        .arg(out)
        .args(extra);
    // Bitwise equality needs the same reduction order: one intra-op thread.
    cmd.env("DINOFLOW_THREADS", "1")
        .env("OMP_NUM_THREADS", "1")
        .env("RUST_LOG", "warn")
        .env_remove("DINOFLOW_TEACHER_CHECKPOINT");
    cmd
}

fn ok(out: Output) -> Output {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Two checkpoints (iterations 3 and 6) of the tiny pretraining job: two different teachers.
fn tiny_teachers() -> &'static (PathBuf, PathBuf) {
    static TEACHERS: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    TEACHERS.get_or_init(|| {
        // Kept for the whole test binary; the OS cleans /tmp.
        let dir = tempfile::tempdir().unwrap().keep();
        let cfg = TinyJob::default().write(&dir, "teacher.yaml");
        let out = dir.join("teacher");
        ok(trainer("train", &cfg, &out, &[]).output().unwrap());
        (ckpt(&out, 3), ckpt(&out, 6))
    })
}

fn distill_job(dir: &Path, file: &str, teacher: &str, prototypes: u32) -> PathBuf {
    TinyJob::default().write_distill(dir, file, teacher, prototypes)
}

fn dinoflow_teacher(path: &Path) -> String {
    format!(
        "{{checkpoint: {{path: {}, format: dinoflow}}}}",
        path.display()
    )
}

/// Per-iteration losses from metrics.jsonl (a later line for an iteration replaces an earlier).
fn losses(out: &Path) -> BTreeMap<u64, serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["type"] == "train")
        .map(|v| (v["iteration"].as_u64().unwrap(), v["losses"].clone()))
        .collect()
}

#[test]
fn a_killed_and_resumed_distillation_equals_the_uninterrupted_one_bitwise() {
    if !have_data() {
        return;
    }
    let (teacher, _) = tiny_teachers();
    let dir = tempfile::tempdir().unwrap();
    let cfg = distill_job(dir.path(), "distill.yaml", &dinoflow_teacher(teacher), 64);

    let straight = dir.path().join("straight");
    ok(trainer("distill", &cfg, &straight, &[]).output().unwrap());
    // Interrupted: kill -9 as soon as the checkpoint at N = 3 exists, resume from exactly it.
    let split = dir.path().join("split");
    let mut child = trainer("distill", &cfg, &split, &[])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    kill_at_checkpoint(&mut child, &split, 3, Duration::from_secs(300));
    let ckpt3 = ckpt(&split, 3);
    ok(trainer(
        "distill",
        &cfg,
        &split,
        &["--resume", ckpt3.to_str().unwrap()],
    )
    .output()
    .unwrap());

    let (a, b) = (losses(&straight), losses(&split));
    assert_eq!(a.keys().copied().collect::<Vec<_>>(), [1, 2, 3, 4, 5, 6]);
    assert_eq!(a, b, "per-iteration losses differ");
    assert!(a[&6]["ibot_loss"].as_f64().is_some(), "{:?}", a[&6]);
    for file in [
        "student.safetensors",
        "student_ema.safetensors",
        "optimizer.safetensors",
        "loss_state.safetensors",
    ] {
        let x = std::fs::read(ckpt(&straight, 6).join(file)).unwrap();
        let y = std::fs::read(ckpt(&split, 6).join(file)).unwrap();
        assert!(
            x == y,
            "{file} differs between the uninterrupted and the resumed run"
        );
    }
    // The frozen teacher is re-read from its source, never stored.
    assert!(!ckpt(&straight, 6).join("teacher.safetensors").exists());
}

#[test]
fn a_resume_under_another_teacher_is_refused_unless_forced() {
    if !have_data() {
        return;
    }
    let (first, second) = tiny_teachers();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let cfg = distill_job(dir.path(), "a.yaml", &dinoflow_teacher(first), 64);
    ok(trainer("distill", &cfg, &out, &["--max-iterations", "3"])
        .output()
        .unwrap());
    let other = distill_job(dir.path(), "b.yaml", &dinoflow_teacher(second), 64);
    let refused = trainer("distill", &other, &out, &["--max-iterations", "4"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(PERMANENT_FAILURE), "{stderr}");
    assert!(
        stderr.contains("spec.teacher: checkpoint has sha256:") && stderr.contains("--force"),
        "{stderr}"
    );
    ok(trainer(
        "distill",
        &other,
        &out,
        &["--max-iterations", "4", "--force"],
    )
    .output()
    .unwrap());
    assert_eq!(losses(&out).keys().copied().max(), Some(4));
}

#[test]
fn bad_distillation_configs_exit_78_naming_the_field() {
    if !have_data() {
        return;
    }
    let (teacher, _) = tiny_teachers();
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            TinyJob::default().write(dir.path(), "pretrain.yaml"),
            "kind: expected a DistillJob manifest",
        ),
        (
            distill_job(
                dir.path(),
                "missing.yaml",
                &dinoflow_teacher(&dir.path().join("nope")),
                64,
            ),
            "spec.teacher.checkpoint.path",
        ),
        (
            distill_job(dir.path(), "protos.yaml", &dinoflow_teacher(teacher), 32),
            "spec.training.dino.headNPrototypes: the student's DINO head has 32 prototypes, the teacher's 64; set it to 64",
        ),
        (
            distill_job(dir.path(), "job.yaml", "{pretrainJob: big}", 64),
            "spec.teacher.pretrainJob",
        ),
    ];
    for (cfg, needle) in cases {
        let out = trainer("distill", &cfg, &dir.path().join("out"), &[])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(PERMANENT_FAILURE),
            "{}: {stderr}",
            cfg.display()
        );
        assert!(stderr.contains(needle), "'{needle}' not in: {stderr}");
    }
}

/// The first `n` images and labels of an idx pair, written uncompressed under `dir`: a
/// smaller evaluation split keeps the learning test cheap.
fn idx_subset(images_gz: &Path, dir: &Path, n: usize) -> PathBuf {
    let read = |p: &Path| {
        let mut bytes = Vec::new();
        flate2::read::GzDecoder::new(std::fs::File::open(p).unwrap())
            .read_to_end(&mut bytes)
            .unwrap();
        bytes
    };
    let images = read(images_gz);
    let labels = read(&PathBuf::from(
        images_gz
            .to_str()
            .unwrap()
            .replace("images-idx3", "labels-idx1"),
    ));
    let count = (n as u32).to_be_bytes();
    let mut img = images[..16].to_vec();
    img[4..8].copy_from_slice(&count);
    img.extend_from_slice(&images[16..16 + n * 28 * 28]);
    let mut lab = labels[..8].to_vec();
    lab[4..8].copy_from_slice(&count);
    lab.extend_from_slice(&labels[8..8 + n]);
    let path = dir.join("sub-images-idx3-ubyte");
    std::fs::write(&path, img).unwrap();
    std::fs::write(dir.join("sub-labels-idx1-ubyte"), lab).unwrap();
    path
}

fn example(name: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../manifests/examples")
            .join(name),
    )
    .unwrap()
}

/// `(iteration, k-NN top-1 at k=20)` of every evaluation line.
fn knn(out: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["type"] == "eval")
        .map(|v| {
            let top1 = v["report"]["knn"]
                .as_array()
                .unwrap()
                .iter()
                .find(|a| a["k"] == 20)
                .expect("k=20 is reported")["top1"]
                .as_f64()
                .unwrap();
            (v["iteration"].as_u64().unwrap(), top1)
        })
        .collect()
}

const TEACHER_ITERATIONS: &str = "20";
const STUDENT_ITERATIONS: u64 = 30;

#[test]
fn a_student_distilled_from_a_fashion_mnist_teacher_raises_its_knn_accuracy() {
    if !have_data() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let fashion = Path::new(common::FASHION).parent().unwrap();
    let val = idx_subset(&fashion.join("t10k-images-idx3-ubyte.gz"), dir.path(), 2000);
    // The tiny pretraining example, smaller batches, evaluation off: the teacher.
    let teacher_cfg = dir.path().join("teacher.yaml");
    // No metrics server: its default port may be taken by a concurrent run.
    let no_server = "everyIterations: 10\n      metricsPort: 0";
    let teacher_yaml = example("tiny-cpu-fashion-mnist.yaml")
        .replace("everyIterations: 10", no_server)
        .replace("batchSizePerGpu: 64", "batchSizePerGpu: 32")
        .replace("k: [10, 20]", "enabled: false")
        .replace(
            "linearProbe:\n        enabled: true",
            "linearProbe:\n        enabled: false",
        );
    std::fs::write(&teacher_cfg, teacher_yaml).unwrap();
    let teacher_out = dir.path().join("teacher");
    let mut cmd = trainer(
        "train",
        &teacher_cfg,
        &teacher_out,
        &["--max-iterations", TEACHER_ITERATIONS],
    );
    cmd.env_remove("DINOFLOW_THREADS")
        .env_remove("OMP_NUM_THREADS");
    ok(cmd.output().unwrap());
    let teacher_ckpt = ckpt(&teacher_out, TEACHER_ITERATIONS.parse().unwrap());

    // The distillation example as it is (teacher.pretrainJob, resolved as the operator
    // does), on smaller batches and a 2000-image evaluation split.
    let student_cfg = dir.path().join("student.yaml");
    let student_yaml = example("tiny-cpu-fashion-mnist-distill.yaml")
        .replace("everyIterations: 10", no_server)
        .replace("batchSizePerGpu: 64", "batchSizePerGpu: 32")
        .replace("maxTrainImages: 10000", "maxTrainImages: 2000")
        .replace(
            "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz",
            val.to_str().unwrap(),
        );
    std::fs::write(&student_cfg, student_yaml).unwrap();
    let student_out = dir.path().join("student");
    let mut cmd = trainer(
        "distill",
        &student_cfg,
        &student_out,
        &["--max-iterations", &STUDENT_ITERATIONS.to_string()],
    );
    cmd.env_remove("DINOFLOW_THREADS")
        .env_remove("OMP_NUM_THREADS")
        .env("DINOFLOW_TEACHER_CHECKPOINT", &teacher_ckpt);
    ok(cmd.output().unwrap());
    let evals = knn(&student_out);
    let (first, last) = (evals.first().unwrap(), evals.last().unwrap());
    assert_eq!((first.0, last.0), (0, STUDENT_ITERATIONS), "{evals:?}");
    assert!(
        last.1 >= first.1 + 5.0,
        "the student EMA's k-NN top-1 went from {:.2} at initialisation to {:.2} after \
         {STUDENT_ITERATIONS} iterations",
        first.1,
        last.1
    );
    eprintln!(
        "student EMA k-NN top-1 (k=20): {:.2} -> {:.2}",
        first.1, last.1
    );
}
