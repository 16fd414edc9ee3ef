//! `training.evaluation`, `training.checkpoint` and `training.logging`.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Most kNN `k` values / linear-probe learning rates (bounds CEL cost).
pub const MAX_GRID: usize = 32;

/// k-nearest-neighbour evaluation on the teacher's features (official `eval/knn.py`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct KnnConfig {
    /// Run the kNN evaluation.
    pub enabled: bool,
    /// Numbers of neighbours to report (official `nb_knn`), each >= 1.
    #[schemars(length(min = 1, max = 32))]
    pub k: Vec<u32>,
    /// Softmax temperature of the neighbour vote (official `temperature`), > 0.
    pub temperature: f64,
}

impl Default for KnnConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            k: vec![10, 20, 100, 200],
            temperature: 0.07,
        }
    }
}

/// Linear probe on frozen features (official `eval/linear.py`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct LinearProbeConfig {
    /// Run the linear probe.
    pub enabled: bool,
    /// Learning-rate grid; one classifier per value, the best is reported (official
    /// `learning_rates`), each > 0.
    #[schemars(length(min = 1, max = 32))]
    pub learning_rates: Vec<f64>,
    /// Training epochs of the probe (official `epochs`).
    #[schemars(range(min = 1))]
    pub epochs: u32,
    /// Batch size of the probe (official `batch_size`).
    #[schemars(range(min = 1))]
    pub batch_size: u32,
}

impl Default for LinearProbeConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            learning_rates: vec![
                1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1,
            ],
            epochs: 10,
            batch_size: 128,
        }
    }
}

/// Periodic evaluation during training.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct EvaluationConfig {
    /// Evaluate every this many iterations (official `evaluation.eval_period_iterations`);
    /// 0 disables periodic evaluation.
    pub period_iterations: u32,
    /// kNN classification.
    pub knn: KnnConfig,
    /// Linear probe.
    pub linear_probe: LinearProbeConfig,
    /// Use at most this many training images (evenly strided) as the k-NN reference set and
    /// the linear probe's training set. Unset uses the whole training split, the official
    /// protocol; a cap keeps frequent evaluations of small CPU runs cheap.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_train_images: Option<u32>,
}

impl Default for EvaluationConfig {
    fn default() -> Self {
        Self {
            period_iterations: 12500,
            knn: KnnConfig::default(),
            linear_probe: LinearProbeConfig::default(),
            max_train_images: None,
        }
    }
}

/// Checkpoint cadence and retention (the official trainer's `PeriodicCheckpointer`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Write a checkpoint every this many iterations; unset means 3 official epochs
    /// (3 × `train.officialEpochLength`), the official period.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub period_iterations: Option<u32>,
    /// Verified checkpoints kept on disk (official `max_to_keep`).
    #[schemars(range(min = 1))]
    pub keep_last: u32,
    /// Official `train.saveckp_freq` (epochs). The official trainer ignores it and so does
    /// Dinoflow: only the official value 20 is accepted (official configs copy over as they
    /// are); set the cadence with `periodIterations`.
    pub saveckp_freq: u32,
    /// Evaluation metric that picks the best checkpoint, higher is better: `knn_top1_k<K>` or
    /// `knn_top5_k<K>` (K one of `evaluation.knn.k`), `linear_top1` or `linear_val_top1` (with
    /// `evaluation.linearProbe.enabled`). Checkpoints written at an evaluation's iteration
    /// compete; the best so far is recorded in `status.bestCheckpoint` and kept on disk however
    /// old, on top of `keepLast`. Unset (the default, as the reference): no best is tracked.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^(knn_top[15]_k[1-9][0-9]*|linear_(val_)?top1)$"))]
    pub best_metric: Option<String>,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self {
            period_iterations: None,
            keep_last: 3,
            saveckp_freq: 20,
            best_metric: None,
        }
    }
}

impl CheckpointConfig {
    /// The checkpoint period in iterations.
    pub fn period(&self, official_epoch_length: u32) -> u64 {
        self.period_iterations
            .map(u64::from)
            .unwrap_or(3 * u64::from(official_epoch_length))
    }
}

/// Log line format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Logging and metrics.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct LoggingConfig {
    /// Log training metrics every this many iterations (the official `MetricLogger` prints
    /// every 10).
    #[schemars(range(min = 1))]
    pub every_iterations: u32,
    /// Port of the Prometheus `/metrics` endpoint of each trainer process; 0 disables it.
    #[schemars(range(min = 0, max = 65535))]
    pub metrics_port: u32,
    /// Format of the trainer's log lines on stderr: `text`, or `json` (one JSON object per
    /// line, the final error of a failed run included).
    pub format: LogFormat,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        Self {
            every_iterations: 10,
            metrics_port: 9464,
            format: LogFormat::Text,
        }
    }
}
