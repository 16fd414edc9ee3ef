//! A tiny meta-architecture, batch and schedule values for the unit tests.

use tch::{Device, Kind, Tensor};

use super::{MetaArchConfig, SslBatch};
use crate::model::{DinoHeadConfig, VitConfig};
use crate::optim::ScheduleValues;

pub fn tiny_config() -> MetaArchConfig {
    let vit = VitConfig {
        img_size: 56,
        embed_dim: 32,
        depth: 2,
        num_heads: 2,
        drop_path_rate: 0.2,
        ..VitConfig::vit_small(14)
    };
    let head = DinoHeadConfig {
        in_dim: 32,
        out_dim: 24,
        hidden_dim: 16,
        bottleneck_dim: 8,
        nlayers: 3,
        mlp_bias: true,
    };
    MetaArchConfig {
        dino_head: head,
        n_local_crops: 2,
        ..MetaArchConfig::official(vit)
    }
}

/// A batch of 2 images: 2 global 56² crops (first image's crops masked), 2 local 28² crops.
pub fn tiny_batch() -> SslBatch {
    tch::manual_seed(0);
    let opts = (Kind::Float, Device::Cpu);
    let mut mask_rows = vec![false; 4 * 16];
    for i in [0usize, 1, 4, 5] {
        mask_rows[i] = true; // image 0, crop 0
        mask_rows[2 * 16 + i + 10] = true; // image 0, crop 1
    }
    let masks = Tensor::from_slice(&mask_rows).reshape([4, 16]);
    let indices = masks.flatten(0, -1).nonzero().squeeze_dim(1);
    let n = indices.size()[0];
    SslBatch {
        global_crops: Tensor::randn([4, 3, 56, 56], opts),
        local_crops: Tensor::randn([4, 3, 28, 28], opts),
        masks,
        mask_indices_list: indices,
        masks_weight: Tensor::full([n], 0.25, opts),
        n_masked_patches: n,
        upperbound: n + 3,
    }
}

pub fn values() -> ScheduleValues {
    ScheduleValues {
        lr: 1e-3,
        wd: 0.04,
        momentum: 0.9,
        teacher_temp: 0.04,
        last_layer_lr: 1e-3,
    }
}
