//! `training.train` (batch, seed, epoch length), `training.data` and `training.output`.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Batch size, seed and what an "epoch" means.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct TrainConfig {
    /// Images per GPU (per process on CPU) per iteration (official `train.batch_size_per_gpu`).
    #[schemars(range(min = 1))]
    pub batch_size_per_gpu: u32,
    /// Seed of every random stream (official `train.seed`).
    pub seed: u64,
    /// Iterations per "official epoch" (official `train.OFFICIAL_EPOCH_LENGTH`); all
    /// epoch-based settings are multiplied by it, whatever the dataset size.
    #[schemars(range(min = 1))]
    pub official_epoch_length: u32,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            batch_size_per_gpu: 64,
            seed: 0,
            official_epoch_length: 1250,
        }
    }
}

impl TrainConfig {
    /// Total iterations of a run of `epochs` official epochs.
    pub fn iterations(&self, epochs: u32) -> u64 {
        u64::from(epochs) * u64::from(self.official_epoch_length)
    }
}

/// Dataset format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DatasetKind {
    /// The official ImageNet-1k layout (official `dataset_path: ImageNet:split=...`): `path` is
    /// the root holding `train/`, `val/`, `test/`; `extraPath` the directory of the official
    /// `entries-<SPLIT>.npy` files, which list the samples of `split` with their labels.
    Imagenet,
    /// ImageNet-22k read as an image folder (one sub-folder of images per class) under `path`.
    /// The official ImageNet-22k tarball layout and its extra files are not read (so
    /// `extraPath` is refused with this kind).
    Imagenet22k,
    /// A directory with one sub-directory of images per class (torchvision `ImageFolder`).
    Imagefolder,
    /// WebDataset tar shards; `path` is a directory of `.tar` files or a brace pattern.
    Webdataset,
    /// MNIST-style IDX files: `path` is the `*-images-idx3-ubyte[.gz]` file; labels are read from
    /// the sibling `*-labels-idx1-ubyte[.gz]` (Fashion-MNIST, MNIST).
    Idx,
}

/// Split of the official ImageNet datasets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum DatasetSplit {
    /// Training split.
    Train,
    /// Validation split.
    Val,
    /// Test split.
    Test,
}

/// Training data (official `train.dataset_path`, `train.num_workers`, `train.cache_dataset`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct DataConfig {
    /// Dataset format (official `train.dataset_path` prefix).
    pub kind: DatasetKind,
    /// Where the training images are (root directory or file, depending on `kind`). Required.
    pub path: String,
    /// With `kind: imagenet`, the directory of the official extra files (official `:extra=`):
    /// `entries-<SPLIT>.npy` as the official `ImageNet.dump_extra` writes them gives the
    /// samples, their order and labels. Unset: the samples are what `dump_extra` would list,
    /// an image folder of `<path>/<split>` (classes sorted). Refused with other kinds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extra_path: Option<String>,
    /// With `kind: imagenet`, the split trained on (official `:split=`); `valPath` is read as
    /// the `VAL` split. Other kinds have no splits: only the default `TRAIN` is accepted.
    pub split: DatasetSplit,
    /// Labelled validation images for evaluation, same `kind`; without it evaluation is skipped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_path: Option<String>,
    /// Data-loading worker threads per process (official `train.num_workers`).
    pub num_workers: u32,
    /// Official `train.cache_dataset`, which the official trainer never reads. Dinoflow always
    /// holds the dataset index (file list, tar member offsets, ImageNet entries) in memory, so
    /// only `true` is accepted.
    pub cache_dataset: bool,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            kind: DatasetKind::Imagenet,
            path: String::new(),
            extra_path: None,
            split: DatasetSplit::Train,
            val_path: None,
            num_workers: 10,
            cache_dataset: true,
        }
    }
}

/// Where the trainer writes checkpoints, metrics and evaluation results.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct OutputConfig {
    /// Output directory (official `train.output_dir`); must be writable.
    pub dir: String,
}

impl Default for OutputConfig {
    fn default() -> Self {
        Self { dir: ".".into() }
    }
}
