//! iBOT masks: the block-mask generator and the batch mask collation (reference
//! `dinov2/data/masking.py` `MaskingGenerator` and `collate_data_and_cast`).
//!
//! Randomness comes only from the `rand::Rng` passed in, so a seeded generator (the trainer
//! uses `rand_chacha::ChaCha8Rng`, seeded per rank and iteration) makes masks reproducible.
//! The draws mirror Python's `random` module call for call (uniform, randint inclusive,
//! round-half-to-even, Fisher–Yates shuffle); the bit streams differ, so masks match the
//! reference in distribution, not sample by sample.

use rand::Rng;
use rand::seq::SliceRandom;
use tch::{Kind, Tensor};

/// Official minimum patches per block.
pub const DEFAULT_MIN_NUM_PATCHES: usize = 4;
/// Official minimum aspect ratio (the maximum is its inverse).
pub const DEFAULT_MIN_ASPECT: f64 = 0.3;
/// Attempts per block before the generator gives up on the block.
const ATTEMPTS_PER_BLOCK: usize = 10;

/// Invalid masking settings.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("{field}: {message}")]
pub struct MaskingError {
    /// Offending setting.
    pub field: &'static str,
    /// What is wrong and what is accepted.
    pub message: String,
}

fn invalid(field: &'static str, message: impl Into<String>) -> MaskingError {
    MaskingError {
        field,
        message: message.into(),
    }
}

/// Random rectangular block masks on a patch grid.
#[derive(Debug, Clone, PartialEq)]
pub struct MaskGenerator {
    height: usize,
    width: usize,
    min_num_patches: usize,
    max_num_patches: f64,
    log_aspect_ratio: (f64, f64),
}

impl MaskGenerator {
    /// Generator on a `height × width` grid with at most `max_num_patches` per block and the
    /// official minimum block size (4) and aspect range (0.3 … 1/0.3).
    pub fn new(height: usize, width: usize, max_num_patches: f64) -> Result<Self, MaskingError> {
        Self::with_options(
            height,
            width,
            DEFAULT_MIN_NUM_PATCHES,
            max_num_patches,
            DEFAULT_MIN_ASPECT,
            None,
        )
    }

    /// The generator of the official training loop for square global crops:
    /// grid `crop/patch`, and `max_num_patches = 0.5 * crop // patch * crop // patch` with
    /// Python's left-to-right float arithmetic (128 for 224/14).
    pub fn for_global_crops(crop_size: usize, patch_size: usize) -> Result<Self, MaskingError> {
        if patch_size == 0 || crop_size < patch_size {
            return Err(invalid(
                "crops.globalCropsSize",
                format!("must be ≥ the patch size {patch_size}, got {crop_size}"),
            ));
        }
        let grid = crop_size / patch_size;
        let (c, p) = (crop_size as f64, patch_size as f64);
        let max = ((0.5 * c / p).floor() * c / p).floor();
        Self::new(grid, grid, max)
    }

    /// Fully parameterised generator (`max_aspect = None` means `1 / min_aspect`).
    pub fn with_options(
        height: usize,
        width: usize,
        min_num_patches: usize,
        max_num_patches: f64,
        min_aspect: f64,
        max_aspect: Option<f64>,
    ) -> Result<Self, MaskingError> {
        if height == 0 || width == 0 {
            return Err(invalid(
                "mask grid",
                format!("must be non-empty, got {height}×{width}"),
            ));
        }
        if !(max_num_patches.is_finite() && max_num_patches >= 0.0) {
            return Err(invalid(
                "maxNumPatches",
                format!("must be ≥ 0, got {max_num_patches}"),
            ));
        }
        let max_aspect = max_aspect.unwrap_or(1.0 / min_aspect);
        if !(min_aspect > 0.0 && max_aspect >= min_aspect && max_aspect.is_finite()) {
            return Err(invalid(
                "minAspect",
                format!("need 0 < min ≤ max aspect, got {min_aspect} and {max_aspect}"),
            ));
        }
        Ok(Self {
            height,
            width,
            min_num_patches,
            max_num_patches,
            log_aspect_ratio: (min_aspect.ln(), max_aspect.ln()),
        })
    }

    /// Number of patches of the grid.
    pub fn num_patches(&self) -> usize {
        self.height * self.width
    }

    /// Grid size `(height, width)`.
    pub fn shape(&self) -> (usize, usize) {
        (self.height, self.width)
    }

    /// A mask (row-major, `true` = masked) with about `num_masking_patches` patches in blocks:
    /// blocks are added until the target is reached or a block cannot be placed in 10
    /// attempts. Never exceeds the target.
    pub fn generate<R: Rng + ?Sized>(&self, num_masking_patches: usize, rng: &mut R) -> Vec<bool> {
        let mut mask = vec![false; self.num_patches()];
        let mut count = 0;
        while count < num_masking_patches {
            let max_mask_patches = ((num_masking_patches - count) as f64).min(self.max_num_patches);
            let delta = self.add_block(&mut mask, max_mask_patches, rng);
            if delta == 0 {
                break;
            }
            count += delta;
        }
        mask
    }

    /// Reference `_mask`: up to 10 attempts to place one block adding between 1 and
    /// `max_mask_patches` new patches. Returns the number of newly masked patches.
    fn add_block<R: Rng + ?Sized>(
        &self,
        mask: &mut [bool],
        max_mask_patches: f64,
        rng: &mut R,
    ) -> usize {
        let mut delta = 0;
        for _ in 0..ATTEMPTS_PER_BLOCK {
            let target_area = py_uniform(rng, self.min_num_patches as f64, max_mask_patches);
            let (lo, hi) = self.log_aspect_ratio;
            let aspect_ratio = py_uniform(rng, lo, hi).exp();
            // Python's round() rounds half to even.
            let h = (target_area * aspect_ratio).sqrt().round_ties_even() as usize;
            let w = (target_area / aspect_ratio).sqrt().round_ties_even() as usize;
            if w < self.width && h < self.height {
                let top = rng.random_range(0..=self.height - h);
                let left = rng.random_range(0..=self.width - w);
                let cells = || {
                    (top..top + h)
                        .flat_map(move |i| (left..left + w).map(move |j| i * self.width + j))
                };
                let already = cells().filter(|&k| mask[k]).count();
                let new = (h * w - already) as f64;
                if new > 0.0 && new <= max_mask_patches {
                    for k in cells() {
                        if !mask[k] {
                            mask[k] = true;
                            delta += 1;
                        }
                    }
                }
                if delta > 0 {
                    break;
                }
            }
        }
        delta
    }
}

/// Python `random.uniform(a, b)`: `a + (b - a) · U[0, 1)`.
fn py_uniform<R: Rng + ?Sized>(rng: &mut R, a: f64, b: f64) -> f64 {
    a + (b - a) * rng.random::<f64>()
}

/// Mask-collation settings (official `ibot.mask_ratio_min_max`,
/// `ibot.mask_sample_probability`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MaskCollateConfig {
    /// Range of per-image mask ratios, `(0.1, 0.5)`.
    pub mask_ratio_min_max: (f64, f64),
    /// Fraction of global-crop images that get a mask, 0.5.
    pub mask_sample_probability: f64,
}

impl Default for MaskCollateConfig {
    fn default() -> Self {
        Self {
            mask_ratio_min_max: (0.1, 0.5),
            mask_sample_probability: 0.5,
        }
    }
}

/// The iBOT part of a collated batch.
#[derive(Debug)]
pub struct CollatedMasks {
    /// `[images, N]` bool, `true` = masked; images are the global crops, crop-major.
    pub masks: Tensor,
    /// `[n]` int64: positions of `true` in `masks.flatten()`.
    pub mask_indices_list: Tensor,
    /// `[n]` float32: `1 / (masked count of the patch's image)` per masked patch.
    pub masks_weight: Tensor,
    /// `n`, the number of masked patches.
    pub n_masked_patches: i64,
    /// Rows of the padded masked-token buffers: `Σ int(N · probs[i+1])` over the masked
    /// images; always ≥ `n_masked_patches`.
    pub upperbound: i64,
}

impl CollatedMasks {
    /// `n_masked_patches` as the reference's `[1]` int64 tensor.
    pub fn n_masked_patches_tensor(&self) -> Tensor {
        Tensor::from_slice(&[self.n_masked_patches])
    }
}

/// float32 `torch.linspace(start, end, steps)` on the CPU. Computed by libtorch itself: its
/// kernel mixes forward and backward stepping and vector-width-dependent roundings, and the
/// reference's probabilities (hence `upperbound`) are exactly that kernel's output.
pub fn linspace_f32(start: f64, end: f64, steps: usize) -> Vec<f32> {
    let t = Tensor::linspace(start, end, steps as i64, (Kind::Float, tch::Device::Cpu));
    Vec::<f32>::try_from(&t).expect("float32 vector")
}

/// Masks for `n_images` global-crop images (`2 × batch`, crop-major) as the reference collate:
/// `int(n_images · p)` images get masks with ratios stratified over
/// `linspace(min, max, masked + 1)` (image `i` draws its target uniformly in
/// `[probs[i], probs[i+1]]`), the rest get empty masks, and the list is shuffled.
pub fn collate_masks<R: Rng + ?Sized>(
    n_images: usize,
    generator: &MaskGenerator,
    cfg: &MaskCollateConfig,
    rng: &mut R,
) -> Result<CollatedMasks, MaskingError> {
    let (lo, hi) = cfg.mask_ratio_min_max;
    if !(0.0..=1.0).contains(&lo) || !(lo..=1.0).contains(&hi) {
        return Err(invalid(
            "ibot.maskRatioMinMax",
            format!("need 0 ≤ min ≤ max ≤ 1, got [{lo}, {hi}]"),
        ));
    }
    let p = cfg.mask_sample_probability;
    if !(0.0..=1.0).contains(&p) {
        return Err(invalid(
            "ibot.maskSampleProbability",
            format!("must be in [0, 1], got {p}"),
        ));
    }
    let n_tokens = generator.num_patches();
    let n_masked_images = (n_images as f64 * p) as usize;
    let probs = linspace_f32(lo, hi, n_masked_images + 1);
    let n_f = n_tokens as f32;
    let mut masks: Vec<Vec<bool>> = Vec::with_capacity(n_images);
    let mut upperbound = 0i64;
    for i in 0..n_masked_images {
        let (prob_min, prob_max) = (probs[i], probs[i + 1]);
        // float32 as in the reference (0-dim float tensors times Python numbers).
        let ratio = prob_min + (prob_max - prob_min) * rng.random::<f64>() as f32;
        let target = (n_f * ratio) as usize;
        masks.push(generator.generate(target, rng));
        upperbound += (n_f * prob_max) as i64;
    }
    masks.resize(n_images, vec![false; n_tokens]);
    masks.shuffle(rng);

    let flat: Vec<bool> = masks.iter().flatten().copied().collect();
    let mut indices = Vec::new();
    let mut weights = Vec::new();
    for (row, mask) in masks.iter().enumerate() {
        let count = mask.iter().filter(|&&m| m).count();
        let weight = 1.0f32 / count.max(1) as f32;
        for (col, _) in mask.iter().enumerate().filter(|(_, m)| **m) {
            indices.push((row * n_tokens + col) as i64);
            weights.push(weight);
        }
    }
    let n_masked_patches = indices.len() as i64;
    Ok(CollatedMasks {
        masks: Tensor::from_slice(&flat).view([n_images as i64, n_tokens as i64]),
        mask_indices_list: Tensor::from_slice(&indices).to_kind(Kind::Int64),
        masks_weight: Tensor::from_slice(&weights),
        n_masked_patches,
        upperbound,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn count(m: &[bool]) -> usize {
        m.iter().filter(|&&b| b).count()
    }

    #[test]
    fn generator_never_exceeds_its_target_and_usually_reaches_it() {
        let g = MaskGenerator::new(16, 16, 128.0).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let mut hits = 0;
        for target in [0usize, 5, 30, 77, 128] {
            for _ in 0..50 {
                let m = g.generate(target, &mut rng);
                assert!(count(&m) <= target);
                hits += usize::from(count(&m) == target);
            }
        }
        assert!(hits > 200, "{hits} of 250 reached the target");
        assert_eq!(count(&g.generate(0, &mut rng)), 0);
    }

    #[test]
    fn same_seed_gives_the_same_masks() {
        let g = MaskGenerator::new(16, 16, 128.0).unwrap();
        let cfg = MaskCollateConfig::default();
        let a = collate_masks(8, &g, &cfg, &mut ChaCha8Rng::seed_from_u64(3)).unwrap();
        let b = collate_masks(8, &g, &cfg, &mut ChaCha8Rng::seed_from_u64(3)).unwrap();
        assert!(a.masks.equal(&b.masks));
        assert_eq!(a.n_masked_patches, b.n_masked_patches);
    }

    #[test]
    fn official_global_crop_generator_caps_blocks_at_half_the_grid() {
        let g = MaskGenerator::for_global_crops(224, 14).unwrap();
        assert_eq!(g.shape(), (16, 16));
        assert_eq!(g.max_num_patches, 128.0);
        // Python: 0.5 * 518 // 14 * 518 // 14 = 666.0, not 37²/2.
        assert_eq!(
            MaskGenerator::for_global_crops(518, 14)
                .unwrap()
                .max_num_patches,
            666.0
        );
        assert!(MaskGenerator::for_global_crops(10, 14).is_err());
    }

    #[test]
    fn collation_masks_half_the_images_with_consistent_bookkeeping() {
        let g = MaskGenerator::new(16, 16, 128.0).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let c = collate_masks(8, &g, &MaskCollateConfig::default(), &mut rng).unwrap();
        assert_eq!(c.masks.size(), vec![8, 256]);
        let per_row: Vec<i64> =
            Vec::try_from(&c.masks.sum_dim_intlist(&[1i64][..], false, Kind::Int64)).unwrap();
        assert_eq!(per_row.iter().filter(|&&n| n > 0).count(), 4);
        assert_eq!(per_row.iter().sum::<i64>(), c.n_masked_patches);
        // linspace(0.1, 0.5, 5)[1..] · 256, truncated: 51 + 76 + 102 + 128.
        assert_eq!(c.upperbound, 357);
        assert!(c.upperbound >= c.n_masked_patches);
        let idx: Vec<i64> = Vec::try_from(&c.mask_indices_list).unwrap();
        let flat: Vec<bool> = Vec::try_from(&c.masks.flatten(0, -1)).unwrap();
        assert!(idx.iter().all(|&i| flat[i as usize]));
        assert_eq!(idx.len() as i64, c.n_masked_patches);
        let w: Vec<f32> = Vec::try_from(&c.masks_weight).unwrap();
        for (&i, &wi) in idx.iter().zip(&w) {
            let row = (i / 256) as usize;
            assert_eq!(wi, 1.0 / per_row[row] as f32);
        }
        assert_eq!(c.n_masked_patches_tensor().size(), vec![1]);
    }

    #[test]
    fn linspace_hits_both_endpoints() {
        let p = linspace_f32(0.1, 0.5, 5);
        assert_eq!(p[0], 0.1f32);
        assert_eq!(p[4], 0.5f32);
        assert!(p.windows(2).all(|w| w[0] < w[1]));
        assert!(linspace_f32(0.0, 1.0, 0).is_empty());
        assert_eq!(linspace_f32(0.2, 1.0, 1), vec![0.2f32]);
    }

    #[test]
    fn invalid_settings_name_their_field() {
        let g = MaskGenerator::new(4, 4, 8.0).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let cfg = MaskCollateConfig {
            mask_ratio_min_max: (0.6, 0.2),
            ..Default::default()
        };
        let err = collate_masks(4, &g, &cfg, &mut rng).unwrap_err();
        assert_eq!(err.field, "ibot.maskRatioMinMax");
        let cfg = MaskCollateConfig {
            mask_sample_probability: 1.5,
            ..Default::default()
        };
        assert!(collate_masks(4, &g, &cfg, &mut rng).is_err());
        assert!(MaskGenerator::new(0, 4, 8.0).is_err());
        assert!(MaskGenerator::with_options(4, 4, 4, 8.0, -1.0, None).is_err());
    }
}

/// Statistical parity with the reference generator and collation (fixture `masking`): the
/// same statistics computed over the same number of draws, compared within five standard
/// errors; the deterministic parts (probabilities, upper bound, masked-image count) exactly.
/// Seeded, so the outcome is reproducible.
#[cfg(test)]
mod parity {
    use super::*;
    use crate::parity_fixture::Fixture;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;
    use serde_json::Value;

    const SEED: u64 = 0x5EED_0D1A;
    /// Allowed distance in standard errors.
    const Z: f64 = 5.0;

    fn f(v: &Value, key: &str) -> f64 {
        v[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{key} is not a number"))
    }

    fn mean_std(xs: &[f64]) -> (f64, f64) {
        let n = xs.len() as f64;
        let mean = xs.iter().sum::<f64>() / n;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
        (mean, var.sqrt())
    }

    /// Number of 4-connected components of masked patches.
    fn blocks_4conn(mask: &[bool], h: usize, w: usize) -> usize {
        let mut seen = vec![false; mask.len()];
        let mut blocks = 0;
        for start in 0..mask.len() {
            if !mask[start] || seen[start] {
                continue;
            }
            blocks += 1;
            let mut stack = vec![start];
            seen[start] = true;
            while let Some(k) = stack.pop() {
                let (i, j) = (k / w, k % w);
                let mut push = |ni: usize, nj: usize| {
                    let nk = ni * w + nj;
                    if mask[nk] && !seen[nk] {
                        seen[nk] = true;
                        stack.push(nk);
                    }
                };
                if i > 0 {
                    push(i - 1, j);
                }
                if i + 1 < h {
                    push(i + 1, j);
                }
                if j > 0 {
                    push(i, j - 1);
                }
                if j + 1 < w {
                    push(i, j + 1);
                }
            }
        }
        blocks
    }

    fn assert_within(what: &str, ours: f64, reference: f64, se: f64) {
        let tol = Z * se + 1e-9;
        assert!(
            (ours - reference).abs() <= tol,
            "{what}: ours {ours} vs reference {reference} (allowed ±{tol:.4})"
        );
    }

    fn generator(fx: &Fixture) -> MaskGenerator {
        let g = fx.at("/config/mask_generator");
        let size = g["input_size"].as_array().unwrap();
        MaskGenerator::with_options(
            size[0].as_u64().unwrap() as usize,
            size[1].as_u64().unwrap() as usize,
            g["min_num_patches"].as_u64().unwrap() as usize,
            f(g, "max_num_patches"),
            f(g, "min_aspect"),
            Some(f(g, "max_aspect")),
        )
        .unwrap()
    }

    #[test]
    fn block_mask_statistics_match_the_reference_generator() {
        let fx = Fixture::load("masking");
        let gen_ = generator(&fx);
        let (h, w) = gen_.shape();
        let n = fx.i64_at("/config/mask_generator/samples_per_target") as usize;
        let mut rng = ChaCha8Rng::seed_from_u64(SEED);
        let targets = fx.at("/expect/mask_generator").as_object().unwrap();
        assert!(!targets.is_empty());
        for (target, want) in targets {
            let target: usize = target.parse().expect("numeric target");
            let mut counts = Vec::with_capacity(n);
            let mut blocks = Vec::with_capacity(n);
            for _ in 0..n {
                let m = gen_.generate(target, &mut rng);
                counts.push(m.iter().filter(|&&b| b).count() as f64);
                blocks.push(blocks_4conn(&m, h, w) as f64);
            }
            let (mean, std) = mean_std(&counts);
            let what = |s: &str| format!("target {target}: {s}");
            let se = ((std.powi(2) + f(want, "std").powi(2)) / n as f64).sqrt();
            assert_within(&what("mean masked"), mean, f(want, "mean"), se);
            let max = counts.iter().cloned().fold(0.0, f64::max);
            assert!(max <= target as f64, "{}", what("never above target"));
            assert_eq!(max, f(want, "max"), "{}", what("max masked"));
            let hit = counts.iter().filter(|&&c| c == target as f64).count() as f64 / n as f64;
            let p = f(want, "fraction_equal_target");
            let se = ((hit * (1.0 - hit) + p * (1.0 - p)) / n as f64).sqrt();
            assert_within(&what("fraction reaching target"), hit, p, se);
            let (mean_blocks, std_blocks) = mean_std(&blocks);
            let se = std_blocks * (2.0 / n as f64).sqrt();
            assert_within(
                &what("mean 4-connected blocks"),
                mean_blocks,
                f(want, "mean_blocks_4conn"),
                se,
            );
            let max_blocks = blocks.iter().cloned().fold(0.0, f64::max);
            assert!(
                (max_blocks - f(want, "max_blocks_4conn")).abs() <= 2.0,
                "{}",
                what("max blocks")
            );
        }
    }

    #[test]
    fn batch_collation_statistics_match_the_reference_collate() {
        let fx = Fixture::load("masking");
        let c = fx.at("/config/collate");
        let g = generator(&fx);
        let n_tokens = c["n_tokens"].as_u64().unwrap() as usize;
        assert_eq!(g.num_patches(), n_tokens, "generator grid vs n_tokens");
        let g = MaskGenerator::with_options(
            g.height,
            g.width,
            g.min_num_patches,
            f(c, "max_num_patches"),
            g.log_aspect_ratio.0.exp(),
            Some(g.log_aspect_ratio.1.exp()),
        )
        .unwrap();
        let ratio = c["mask_ratio_min_max"].as_array().unwrap();
        let cfg = MaskCollateConfig {
            mask_ratio_min_max: (ratio[0].as_f64().unwrap(), ratio[1].as_f64().unwrap()),
            mask_sample_probability: f(c, "mask_probability"),
        };
        let n_images = c["n_images"].as_u64().unwrap() as usize;
        let collations = c["collations"].as_u64().unwrap() as usize;
        let det = fx.at("/expect/collate/deterministic");
        let n_masked_images = det["n_samples_masked"].as_u64().unwrap() as usize;

        // Deterministic parts: probabilities and upper bound.
        let probs: Vec<f64> = det["probs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let ours: Vec<f64> = linspace_f32(
            cfg.mask_ratio_min_max.0,
            cfg.mask_ratio_min_max.1,
            n_masked_images + 1,
        )
        .into_iter()
        .map(f64::from)
        .collect();
        assert_eq!(ours, probs, "stratified mask-ratio boundaries");
        let upperbounds: Vec<i64> = det["upperbound"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();

        let mut rng = ChaCha8Rng::seed_from_u64(SEED);
        let mut unmasked = 0usize;
        let mut fractions = Vec::new();
        let mut per_batch = Vec::new();
        let mut sorted_rows: Vec<Vec<f64>> = Vec::new();
        for _ in 0..collations {
            let out = collate_masks(n_images, &g, &cfg, &mut rng).unwrap();
            assert!(
                upperbounds.contains(&out.upperbound),
                "upperbound {}",
                out.upperbound
            );
            assert!(out.upperbound >= out.n_masked_patches);
            let counts: Vec<i64> =
                Vec::try_from(&out.masks.sum_dim_intlist(&[1i64][..], false, Kind::Int64)).unwrap();
            assert_eq!(counts.iter().filter(|&&k| k > 0).count(), n_masked_images);
            unmasked += counts.iter().filter(|&&k| k == 0).count();
            let mut row: Vec<f64> = counts.iter().map(|&k| k as f64 / n_tokens as f64).collect();
            fractions.extend(row.iter().copied().filter(|&x| x > 0.0));
            row.sort_by(f64::total_cmp);
            sorted_rows.push(row);
            per_batch.push(out.n_masked_patches as f64);
        }

        let exp = fx.at("/expect/collate");
        let total = (collations * n_images) as f64;
        let frac_unmasked = unmasked as f64 / total;
        let p = f(exp, "fraction_of_images_unmasked_mean");
        assert_within(
            "unmasked fraction",
            frac_unmasked,
            p,
            (2.0 * p * (1.0 - p) / total).sqrt(),
        );

        let m = &exp["masked_fraction_of_masked_images"];
        let n = fractions.len() as f64;
        assert_eq!(n, f(m, "n"), "number of masked images");
        let (mean, std) = mean_std(&fractions);
        assert_within(
            "masked fraction mean",
            mean,
            f(m, "mean"),
            ((std.powi(2) + f(m, "std").powi(2)) / n).sqrt(),
        );
        assert_within(
            "masked fraction std",
            std,
            f(m, "std"),
            std * (1.0 / n).sqrt(),
        );
        for (q, x) in [0.1, 0.5, 0.9]
            .iter()
            .zip(m["quantiles_10_50_90"].as_array().unwrap())
        {
            let x = x.as_f64().unwrap();
            let below = fractions.iter().filter(|&&v| v < x).count() as f64 / n;
            let at_or_below = fractions.iter().filter(|&&v| v <= x).count() as f64 / n;
            let tol = Z * (2.0 * q * (1.0 - q) / n).sqrt();
            assert!(
                below - tol <= *q && *q <= at_or_below + tol,
                "quantile {q}: reference value {x} sits at our CDF [{below}, {at_or_below}]"
            );
        }
        let edges: Vec<f64> = m["hist_edges"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let want_counts: Vec<f64> = m["hist_counts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        for (i, want) in want_counts.iter().enumerate() {
            let (lo, hi) = (edges[i], edges[i + 1]);
            let last = i + 2 == edges.len();
            let got = fractions
                .iter()
                .filter(|&&v| v >= lo && (v < hi || (last && v <= hi)))
                .count() as f64;
            assert_within(
                &format!("histogram bin [{lo}, {hi})"),
                got,
                *want,
                (got + want).sqrt().max(1.0),
            );
        }

        let b = &exp["n_masked_patches_per_batch"];
        let (mean, std) = mean_std(&per_batch);
        assert_within(
            "masked patches per batch",
            mean,
            f(b, "mean"),
            std * (2.0 / collations as f64).sqrt() + 0.2,
        );
        let spread = f(b, "max") - f(b, "min");
        let (lo, hi) = per_batch
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, z), &x| (a.min(x), z.max(x)));
        assert!(
            lo >= f(b, "min") - spread && hi <= f(b, "max") + spread,
            "per-batch range [{lo}, {hi}]"
        );

        let want_sorted = exp["sorted_masked_fraction_mean"].as_array().unwrap();
        assert_eq!(want_sorted.len(), n_images);
        for (i, want) in want_sorted.iter().enumerate() {
            let col: Vec<f64> = sorted_rows.iter().map(|r| r[i]).collect();
            let (mean, std) = mean_std(&col);
            let se = std * (2.0 / collations as f64).sqrt() + 0.5 / n_tokens as f64;
            assert_within(
                &format!("sorted masked fraction #{i}"),
                mean,
                want.as_f64().unwrap(),
                se,
            );
        }
    }
}
