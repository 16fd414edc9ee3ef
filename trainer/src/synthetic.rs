//! Synthetic collated batches for the step benchmark and the GPU check (`examples/`): crops of
//! standard-normal pixels, as the official step timer's `torch.randn`, and iBOT masks collated
//! exactly as the training loader does, so the step does the same work as on real data.

use dinoflow_api::training::TrainingConfig;
use rand::SeedableRng;
use tch::{Device, Kind, Tensor};

use crate::config::mask_collate_config;
use crate::masking::{MaskGenerator, MaskingError, collate_masks};
use crate::meta_arch::SslBatch;

/// One batch of the config's per-GPU batch size and crops, for a model of patch size
/// `patch`; `seed` picks the masks (the pixels come from libtorch's generator). Crops are
/// made on the host and copied to `device`, as a loader's batch is.
pub fn batch(
    t: &TrainingConfig,
    patch: usize,
    seed: u64,
    device: Device,
) -> Result<SslBatch, MaskingError> {
    let b = i64::from(t.train.batch_size_per_gpu);
    let (g, l) = (
        i64::from(t.crops.global_crops_size),
        i64::from(t.crops.local_crops_size),
    );
    let n_local = i64::from(t.crops.local_crops_number);
    let generator = MaskGenerator::for_global_crops(g as usize, patch)?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let m = collate_masks(
        2 * b as usize,
        &generator,
        &mask_collate_config(t),
        &mut rng,
    )?;
    let opts = (Kind::Float, Device::Cpu);
    Ok(SslBatch {
        global_crops: Tensor::randn([2 * b, 3, g, g], opts).to_device(device),
        local_crops: Tensor::randn([n_local * b, 3, l, l], opts).to_device(device),
        masks: m.masks.to_device(device),
        mask_indices_list: m.mask_indices_list.to_device(device),
        masks_weight: m.masks_weight.to_device(device),
        n_masked_patches: m.n_masked_patches,
        upperbound: m.upperbound,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_batch_has_the_shapes_the_step_checks() {
        let t = dinoflow_api::load::load_training_config_str(
            "training:\n  preset: vitl14\n  data: {path: /unused}\n  model: {arch: vit_small}\n  \
             crops: {globalCropsSize: 56, localCropsSize: 28, localCropsNumber: 2}\n  \
             train: {batchSizePerGpu: 3}\n",
        )
        .unwrap()
        .training;
        let b = batch(&t, 14, 7, Device::Cpu).unwrap();
        assert_eq!(b.global_crops.size(), [6, 3, 56, 56]);
        assert_eq!(b.local_crops.size(), [6, 3, 28, 28]);
        b.validate(2).unwrap();
    }
}
