//! Training FLOPs per image of one DINOv2 step, for the MFU estimate
//! (`dinoflow_trainer_mfu_ratio` = FLOPs/image × images/s ÷ (peak FLOP/s × ranks)).
//!
//! Counted as MFU usually is: the matrix products only (2 FLOPs per multiply-add), a backward
//! pass twice its forward, no recomputation; layer norms, softmax, GELU, the losses, centering
//! and Sinkhorn-Knopp are left out (elementwise, a few percent at most). Per image of the
//! batch, the step does:
//!
//! - student forward + backward (×3) on the 2 global and N local crops, its stochastic depth
//!   running each residual branch on the kept subset of `max(⌊b·(1-p)⌋, 1)` of `b` crops only
//!   (`model::block`), the DINO head on every CLS token and the iBOT head on the padded
//!   buffer of masked patch tokens;
//! - teacher forward on the 2 global crops, the DINO head on their CLS tokens and the iBOT head
//!   on the same masked-token buffer.
//!
//! The iBOT buffer has `upperbound` rows per batch (`masking::collate_masks`), which depends
//! only on the batch size and the mask settings, so the count is exact rather than expected.

use crate::masking::{MaskCollateConfig, linspace_f32};
use crate::meta_arch::MetaArchConfig;
use crate::model::{DinoHeadConfig, FfnLayer, VitConfig, ffn::swiglu_hidden_dim};

/// The shape of one step that the model config does not hold.
#[derive(Debug, Clone, PartialEq)]
pub struct StepShape {
    /// Images per batch on one rank (`train.batchSizePerGpu`).
    pub batch_size: usize,
    pub global_crops_size: i64,
    pub local_crops_size: i64,
    pub masks: MaskCollateConfig,
}

/// Training FLOPs per image of one step (see the module doc for what is counted).
pub fn training_flops_per_image(arch: &MetaArchConfig, shape: &StepShape) -> f64 {
    let b = shape.batch_size.max(1);
    let vit = &arch.student;
    let n_local = arch.n_local_crops.max(0) as usize;
    let (n_global_imgs, n_local_imgs) = (2 * b, n_local * b);
    let ibot_rows = if arch.do_ibot() {
        ibot_buffer_rows(vit, shape, n_global_imgs)
    } else {
        0.0
    };
    let ibot_head = arch.ibot_head.as_ref().unwrap_or(&arch.dino_head);

    let student = backbone_forward(vit, shape.global_crops_size, n_global_imgs, true)
        + backbone_forward(vit, shape.local_crops_size, n_local_imgs, true)
        + (n_global_imgs + n_local_imgs) as f64 * head_forward_per_row(&arch.dino_head)
        + ibot_rows * head_forward_per_row(ibot_head);
    let teacher = backbone_forward(vit, shape.global_crops_size, n_global_imgs, false)
        + n_global_imgs as f64 * head_forward_per_row(&arch.dino_head)
        + ibot_rows * head_forward_per_row(ibot_head);
    (3.0 * student + teacher) / b as f64
}

/// Forward FLOPs of the backbone over `crops` crops of side `size`; `train` applies the
/// student's batch-subset stochastic depth.
pub fn backbone_forward(vit: &VitConfig, size: i64, crops: usize, train: bool) -> f64 {
    if crops == 0 {
        return 0.0;
    }
    let d = vit.embed_dim as f64;
    let patches = ((size / vit.patch_size) * (size / vit.patch_size)) as f64;
    let tokens = 1.0 + vit.num_register_tokens as f64 + patches;
    let patch_embed = patches * 2.0 * (vit.in_chans * vit.patch_size * vit.patch_size) as f64 * d;
    let per_crop_block = block_forward(vit, tokens);
    let blocks: f64 = vit
        .drop_path_rates()
        .iter()
        .map(|&rate| {
            let kept = if train && rate > 0.0 {
                ((crops as f64 * (1.0 - rate)) as usize).max(1)
            } else {
                crops
            };
            kept as f64 * per_crop_block
        })
        .sum();
    crops as f64 * patch_embed + blocks
}

/// One transformer block on one crop of `t` tokens: qkv and output projections (8·t·d²),
/// scores and weighted values (4·t²·d), and the FFN.
fn block_forward(vit: &VitConfig, t: f64) -> f64 {
    let d = vit.embed_dim as f64;
    let ffn = match vit.ffn_layer {
        FfnLayer::Mlp => 4.0 * t * d * vit.mlp_hidden() as f64,
        // w12: d -> 2h, w3: h -> d.
        FfnLayer::SwiGluFused => 6.0 * t * d * swiglu_hidden_dim(vit.mlp_hidden()) as f64,
        FfnLayer::Identity => 0.0,
    };
    8.0 * t * d * d + 4.0 * t * t * d + ffn
}

/// The DINO/iBOT head on one row: the MLP to the bottleneck and the prototype layer.
pub fn head_forward_per_row(h: &DinoHeadConfig) -> f64 {
    let mlp = if h.nlayers <= 1 {
        h.in_dim * h.bottleneck_dim
    } else {
        h.in_dim * h.hidden_dim
            + (h.nlayers - 2) * h.hidden_dim * h.hidden_dim
            + h.hidden_dim * h.bottleneck_dim
    };
    2.0 * (mlp + h.bottleneck_dim * h.out_dim) as f64
}

/// Rows of the padded masked-token buffer of one batch: `Σ int(n_tokens · probs[i+1])` over
/// the `int(n_images · p)` masked images, as `masking::collate_masks` sizes it.
fn ibot_buffer_rows(vit: &VitConfig, shape: &StepShape, n_images: usize) -> f64 {
    let grid = shape.global_crops_size / vit.patch_size;
    let n_tokens = (grid * grid) as f32;
    let (lo, hi) = shape.masks.mask_ratio_min_max;
    let n_masked = (n_images as f64 * shape.masks.mask_sample_probability) as usize;
    linspace_f32(lo, hi, n_masked + 1)[1..]
        .iter()
        .map(|p| (n_tokens * p) as i64 as f64)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// d 8, one block, MLP 32, patch 4; global crops 8² (4 patches + CLS = 5 tokens), local
    /// crops 4² (1 patch + CLS = 2 tokens); head 8 -> 16 -> 16 -> 4 -> 10 prototypes.
    fn tiny(drop_path_rate: f64) -> (MetaArchConfig, StepShape) {
        let vit = VitConfig {
            img_size: 8,
            embed_dim: 8,
            depth: 1,
            num_heads: 2,
            drop_path_rate,
            ..VitConfig::vit_small(4)
        };
        let head = DinoHeadConfig {
            in_dim: 8,
            out_dim: 10,
            hidden_dim: 16,
            bottleneck_dim: 4,
            nlayers: 3,
            mlp_bias: true,
        };
        let arch = MetaArchConfig {
            dino_head: head,
            n_local_crops: 2,
            ..MetaArchConfig::official(vit)
        };
        let shape = StepShape {
            batch_size: 2,
            global_crops_size: 8,
            local_crops_size: 4,
            masks: MaskCollateConfig::default(),
        };
        (arch, shape)
    }

    #[test]
    fn a_tiny_vit_step_matches_the_hand_count() {
        // Patch embedding: patches · 2 · (3·4·4) · 8 = 768 per patch.
        // Block on t tokens: qkv 6·t·64 + proj 2·t·64 + attention 4·t²·8 + MLP 4·t·8·32
        //   = 1536·t + 32·t²: 8480 at t = 5, 3200 at t = 2.
        // Crops: global 4·768 + 8480 = 11552, local 768 + 3200 = 3968.
        // Head row: 2·(8·16 + 16·16 + 16·4 + 4·10) = 976.
        // iBOT buffer for a batch of 2 (4 global crops, 2 masked, probs 0.1, 0.3, 0.5 of 4
        // patches): int(1.2) + int(2) = 3 rows, 1.5 per image.
        // Per image: student 2·11552 + 2·3968 + 4·976 + 1.5·976 = 36408, ×3 = 109224;
        //            teacher 2·11552 + 2·976 + 1.5·976 = 26520.
        let (arch, shape) = tiny(0.0);
        assert_eq!(training_flops_per_image(&arch, &shape), 135_744.0);
    }

    #[test]
    fn stochastic_depth_runs_the_student_blocks_on_the_kept_crops_only() {
        // Rate 0.5 on 4 global and 4 local crops keeps 2 of each: the student's block work
        // halves, (2·8480 + 2·3200)/2 = 11680 less per image forward, ×3 with the backward.
        let (arch, shape) = tiny(0.5);
        assert_eq!(
            training_flops_per_image(&arch, &shape),
            135_744.0 - 3.0 * 11_680.0
        );
    }

    #[test]
    fn without_ibot_the_masked_token_buffer_costs_nothing() {
        let (mut arch, shape) = tiny(0.0);
        arch.ibot_loss_weight = 0.0;
        // 1.5 rows per image through the head, in the student (×3) and the teacher.
        assert_eq!(
            training_flops_per_image(&arch, &shape),
            135_744.0 - 4.0 * 1.5 * 976.0
        );
    }

    #[test]
    fn vit_large_16_forward_at_224_is_the_published_123_gflops() {
        // timm lists vit_large_patch16_224 at 61.6 GMACs.
        let f = backbone_forward(&VitConfig::vit_large(16), 224, 1, false);
        assert!((f / 123.2e9 - 1.0).abs() < 0.005, "{f:e}");
    }
}
