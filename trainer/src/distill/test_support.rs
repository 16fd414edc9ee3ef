//! Tiny configs and checkpoints shared by the distillation unit tests.
use std::path::{Path, PathBuf};

use dinoflow_api::TrainingConfig;
use tch::{Device, Kind, Tensor};

use crate::checkpoint::{CheckpointManager, Snapshot};
use crate::config;
use crate::meta_arch::{MetaArch, SslBatch};

/// A 2-block ViT (patch 7, 28px crops) with heads of `prototypes` prototypes, fp32.
pub fn tiny_training(embed_dim: u32, prototypes: u32) -> TrainingConfig {
    let yaml = format!(
        r#"training:
  model: {{arch: custom, embedDim: {embed_dim}, depth: 2, numHeads: 2, patchSize: 7, dropPathRate: 0.1}}
  dino: {{headNPrototypes: {prototypes}, headBottleneckDim: 8, headHiddenDim: 16}}
  ibot: {{headNPrototypes: {prototypes}, headBottleneckDim: 8, headHiddenDim: 16}}
  crops: {{globalCropsSize: 28, localCropsSize: 14, localCropsNumber: 2}}
  train: {{batchSizePerGpu: 2, officialEpochLength: 3}}
  data: {{path: /unused}}
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
"#
    );
    dinoflow_api::load_training_config_str(&yaml)
        .expect("the tiny config is valid")
        .training
}

/// A pretraining-style checkpoint of a fresh `training` model under `root`; returns its
/// directory and the arch whose teacher it stores.
pub fn write_pretrain_checkpoint(root: &Path, training: &TrainingConfig) -> (PathBuf, MetaArch) {
    tch::manual_seed(3);
    let arch = MetaArch::new(config::meta_arch_config(training).unwrap(), Device::Cpu).unwrap();
    let vars = |vs: &tch::nn::VarStore| {
        vs.variables()
            .into_iter()
            .map(|(k, t)| (k, t.detach().copy()))
            .collect::<Vec<_>>()
    };
    let snapshot = Snapshot {
        iteration: 9,
        world_size: 1,
        config_hash: config::config_hash(training),
        guarded: config::guarded_fields(training),
        tensors: [
            ("student".to_string(), vars(&arch.student.vs)),
            ("teacher".to_string(), vars(&arch.teacher.vs)),
        ]
        .into(),
        json: Default::default(),
    };
    let manager = CheckpointManager::open(root, 2).unwrap();
    let saved = manager.save(&snapshot).unwrap();
    (saved.path, arch)
}

/// Two images: 2 global 28px crops (4×4 patches of 7px), 2 local 14px crops, a few masked
/// patches.
pub fn tiny_batch() -> SslBatch {
    tch::manual_seed(0);
    let opts = (Kind::Float, Device::Cpu);
    let mut rows = vec![false; 4 * 16];
    for i in [0usize, 5, 16 + 3, 32 + 7, 48 + 9] {
        rows[i] = true;
    }
    let masks = Tensor::from_slice(&rows).reshape([4, 16]);
    let indices = masks.flatten(0, -1).nonzero().squeeze_dim(1);
    let n = indices.size()[0];
    SslBatch {
        global_crops: Tensor::randn([4, 3, 28, 28], opts),
        local_crops: Tensor::randn([4, 3, 14, 14], opts),
        masks,
        mask_indices_list: indices,
        masks_weight: Tensor::full([n], 0.5, opts),
        n_masked_patches: n,
        upperbound: n,
    }
}
