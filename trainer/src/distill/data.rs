//! The distillation batch: the pretraining batch (crops and iBOT masks) rewritten for the
//! recipe's `masking` and `ibotOnGlobalCrops` flags.
use tch::{Kind, Tensor};

use super::DistillSettings;
use crate::meta_arch::SslBatch;
use crate::train_loop::components::{Data, TrainBatch};
use crate::train_loop::{BatchSource, StepError};

/// Applies the flags to one collated batch:
/// - `masking: false`: no student patch is replaced by the mask token (all-false masks; the
///   masked forward is then the plain one);
/// - `ibotOnGlobalCrops: true`: the iBOT loss scores every patch token of the two global
///   crops, each image's patches weighted `1 / patches` as the official masked loss weights
///   its masked ones.
///
/// With both off there is nothing for iBOT to score; [`DistillSettings::check`] refuses that.
pub fn apply_flags(mut b: SslBatch, settings: &DistillSettings) -> SslBatch {
    if settings.ibot_on_global_crops {
        let [images, patches] = b.masks.size()[..] else {
            return b; // `SslBatch::validate` reports the malformed masks at the step
        };
        let n = images * patches;
        let device = b.masks.device();
        b.mask_indices_list = Tensor::arange(n, (Kind::Int64, device));
        b.masks_weight = Tensor::full([n], 1.0 / patches as f64, (Kind::Float, device));
        b.n_masked_patches = n;
        b.upperbound = n;
    }
    if !settings.masking {
        b.masks = b.masks.zeros_like();
    }
    b
}

/// The pretraining data source with [`apply_flags`] on every batch. Batches stay a function
/// of (seed, rank, iteration), so resume is exact as in pretraining.
#[derive(Debug)]
pub struct DistillData {
    pub inner: Data,
    pub settings: DistillSettings,
}

impl BatchSource for DistillData {
    type Batch = TrainBatch;

    fn next_batch(&mut self) -> Result<TrainBatch, StepError> {
        let b = self.inner.next_batch()?;
        Ok(TrainBatch {
            iteration: b.iteration,
            ssl: apply_flags(b.ssl, &self.settings),
        })
    }

    fn images_per_batch(&self) -> u64 {
        self.inner.images_per_batch()
    }

    fn position(&self) -> serde_json::Value {
        self.inner.position()
    }

    fn seek(&mut self, position: &serde_json::Value) -> Result<(), StepError> {
        self.inner.seek(position)
    }

    fn skipped_images(&self) -> u64 {
        self.inner.skipped_images()
    }

    fn queue_depth(&self) -> Option<usize> {
        self.inner.queue_depth()
    }
}

#[cfg(test)]
mod tests {
    use tch::Device;

    use super::*;

    fn batch() -> SslBatch {
        let mut rows = vec![false; 2 * 4];
        rows[1] = true;
        rows[6] = true;
        let masks = Tensor::from_slice(&rows).reshape([2, 4]);
        let indices = masks.flatten(0, -1).nonzero().squeeze_dim(1);
        SslBatch {
            global_crops: Tensor::zeros([2, 3, 8, 8], (Kind::Float, Device::Cpu)),
            local_crops: Tensor::zeros([0, 3, 4, 4], (Kind::Float, Device::Cpu)),
            masks,
            mask_indices_list: indices,
            masks_weight: Tensor::from_slice(&[1.0f32, 1.0]),
            n_masked_patches: 2,
            upperbound: 3,
        }
    }

    fn settings(masking: bool, ibot_on_global_crops: bool) -> DistillSettings {
        DistillSettings {
            masking,
            ibot_on_global_crops,
            ..DistillSettings::default()
        }
    }

    #[test]
    fn the_paper_recipe_unmasks_the_student_and_scores_every_global_patch() {
        let b = apply_flags(batch(), &settings(false, true));
        assert_eq!(b.masks.sum(Kind::Int64).int64_value(&[]), 0);
        assert_eq!(
            Vec::<i64>::try_from(&b.mask_indices_list).unwrap(),
            (0..8).collect::<Vec<_>>()
        );
        assert_eq!(
            Vec::<f32>::try_from(&b.masks_weight).unwrap(),
            vec![0.25; 8]
        );
        assert_eq!((b.n_masked_patches, b.upperbound), (8, 8));
        b.validate(0).unwrap();
    }

    #[test]
    fn masking_kept_with_ibot_on_all_patches_keeps_the_mask_tokens() {
        let b = apply_flags(batch(), &settings(true, true));
        assert_eq!(b.masks.sum(Kind::Int64).int64_value(&[]), 2);
        assert_eq!(b.n_masked(), 8);
    }

    #[test]
    fn masking_without_ibot_on_global_crops_is_the_pretraining_batch() {
        let original = batch();
        let b = apply_flags(batch(), &settings(true, false));
        assert!(b.masks.equal(&original.masks));
        assert!(b.mask_indices_list.equal(&original.mask_indices_list));
        assert_eq!((b.n_masked_patches, b.upperbound), (2, 3));
    }
}
