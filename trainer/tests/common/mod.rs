//! What the binary-level tests share: the Fashion-MNIST path and a tiny fp32 job config.
#![allow(dead_code)] // each test binary uses its own part

use std::path::{Path, PathBuf};

/// Debian's `dataset-fashion-mnist` (installed by scripts/setup.sh).
pub const FASHION: &str = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz";

/// Checkpoint directory of iteration `it` under the output directory `out`.
pub fn ckpt(out: &Path, it: u64) -> PathBuf {
    out.join("checkpoints").join(format!("ckpt-{it:09}"))
}

/// `kill -9` of `child` (a trainer writing into `out`) as soon as the checkpoint at `it`
/// exists; fails if it does not appear within `limit` or the trainer exits first.
pub fn kill_at_checkpoint(
    child: &mut std::process::Child,
    out: &Path,
    it: u64,
    limit: std::time::Duration,
) {
    let started = std::time::Instant::now();
    while !ckpt(out, it).join("manifest.json").exists() {
        assert!(
            started.elapsed() < limit,
            "no checkpoint at {it} after {limit:?}"
        );
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the trainer exited early: {status}");
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
}

/// False (with the reason printed) when Fashion-MNIST is not installed.
pub fn have_data() -> bool {
    let ok = Path::new(FASHION).exists();
    if !ok {
        eprintln!("skipping: {FASHION} missing (apt install dataset-fashion-mnist)");
    }
    ok
}

/// A 2-block ViT on 28px crops, fp32, no evaluation: `epochs` × 3 iterations of 4 images.
#[derive(Debug, Clone)]
pub struct TinyJob {
    pub epochs: u32,
    pub checkpoint_every: u32,
    pub freeze_last_layer_epochs: u32,
    pub seed: u64,
    /// `training.data.kind`.
    pub data_kind: String,
    pub data_path: String,
    pub num_workers: u32,
}

impl Default for TinyJob {
    fn default() -> Self {
        Self {
            epochs: 2,
            checkpoint_every: 3,
            freeze_last_layer_epochs: 1,
            seed: 5,
            data_kind: "idx".into(),
            data_path: FASHION.into(),
            num_workers: 2,
        }
    }
}

impl TinyJob {
    /// Writes the config as `<dir>/<file>`; the output directory comes from `--output-dir`.
    pub fn write(&self, dir: &Path, file: &str) -> PathBuf {
        let yaml = format!(
            r#"training:
  model: {{arch: custom, embedDim: 32, depth: 2, numHeads: 2, patchSize: 7, dropPathRate: 0.1}}
  dino: {{headNPrototypes: 64, headBottleneckDim: 16, headHiddenDim: 32}}
  ibot: {{headNPrototypes: 64, headBottleneckDim: 16, headHiddenDim: 32}}
  crops:
    globalCropsSize: 28
    localCropsSize: 14
    localCropsNumber: 2
    augmentation: {{normalizeMean: [0.286], normalizeStd: [0.353]}}
  optim: {{epochs: {epochs}, warmupEpochs: 1, freezeLastLayerEpochs: {freeze}, baseLr: 0.004}}
  teacher: {{warmupTeacherTempEpochs: 1}}
  train: {{batchSizePerGpu: 4, officialEpochLength: 3, seed: {seed}}}
  data: {{kind: {kind}, path: {path}, numWorkers: {workers}}}
  precision:
    gradScaler: false
    student:
      backbone: {{paramDtype: fp32, reduceDtype: fp32, bufferDtype: fp32}}
      dinoHead: {{paramDtype: fp32, reduceDtype: fp32, bufferDtype: fp32}}
      ibotHead: {{paramDtype: fp32, reduceDtype: fp32, bufferDtype: fp32}}
    teacher:
      backbone: {{paramDtype: fp32, reduceDtype: fp32, bufferDtype: fp32}}
      dinoHead: {{paramDtype: fp32, reduceDtype: fp32, bufferDtype: fp32}}
      ibotHead: {{paramDtype: fp32, reduceDtype: fp32, bufferDtype: fp32}}
  sharding:
    student: {{backbone: NO_SHARD, dinoHead: NO_SHARD, ibotHead: NO_SHARD}}
    teacher: {{backbone: NO_SHARD, dinoHead: NO_SHARD, ibotHead: NO_SHARD}}
  evaluation: {{knn: {{enabled: false}}, linearProbe: {{enabled: false}}}}
  checkpoint: {{periodIterations: {ckpt}, keepLast: 5}}
  output: {{dir: /nonexistent/overridden-by-the-cli}}
  logging: {{everyIterations: 1, metricsPort: 0}}
"#,
            epochs = self.epochs,
            freeze = self.freeze_last_layer_epochs,
            seed = self.seed,
            kind = self.data_kind,
            path = self.data_path,
            workers = self.num_workers,
            ckpt = self.checkpoint_every,
        );
        let path = dir.join(file);
        std::fs::write(&path, yaml).unwrap();
        path
    }

    /// A DistillJob manifest around this job's training block with a narrower student (width
    /// 16, same depth) whose heads have `prototypes` prototypes; `teacher` is the YAML of
    /// `spec.teacher`.
    pub fn write_distill(&self, dir: &Path, file: &str, teacher: &str, prototypes: u32) -> PathBuf {
        let training =
            std::fs::read_to_string(self.write(dir, &format!("{file}.training"))).unwrap();
        let training = training.replace("embedDim: 32", "embedDim: 16").replace(
            "headNPrototypes: 64",
            &format!("headNPrototypes: {prototypes}"),
        );
        let mut yaml = format!(
            "apiVersion: dinoflow.dev/v1alpha1\nkind: DistillJob\nmetadata: {{name: tiny}}\nspec:\n  teacher: {teacher}\n"
        );
        for line in training.lines() {
            yaml.push_str("  ");
            yaml.push_str(line);
            yaml.push('\n');
        }
        let path = dir.join(file);
        std::fs::write(&path, yaml).unwrap();
        path
    }
}
