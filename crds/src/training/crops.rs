//! `training.crops`: multi-crop sizes and scales, and the photometric augmentation.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Multi-crop: two global crops and `localCropsNumber` local crops per image.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct CropsConfig {
    /// `[min, max]` area fraction of the random-resized global crops (official
    /// `crops.global_crops_scale`), 0 < min <= max <= 1.
    #[schemars(length(min = 2, max = 2))]
    pub global_crops_scale: [f64; 2],
    /// Local crops per image (official `crops.local_crops_number`); 0 disables them.
    pub local_crops_number: u32,
    /// `[min, max]` area fraction of the local crops (official `crops.local_crops_scale`),
    /// 0 < min <= max <= 1, each bound at most the matching global bound.
    #[schemars(length(min = 2, max = 2))]
    pub local_crops_scale: [f64; 2],
    /// Side of the global crops in pixels (official `crops.global_crops_size`); a multiple of
    /// `model.patchSize`.
    #[schemars(range(min = 1))]
    pub global_crops_size: u32,
    /// Side of the local crops in pixels (official `crops.local_crops_size`); a multiple of
    /// `model.patchSize`, at most `globalCropsSize`.
    #[schemars(range(min = 1))]
    pub local_crops_size: u32,
    /// Photometric augmentation (fixed in the official `DataAugmentationDINO`; same values here).
    pub augmentation: AugmentationConfig,
}

impl Default for CropsConfig {
    fn default() -> Self {
        Self {
            global_crops_scale: [0.32, 1.0],
            local_crops_number: 8,
            local_crops_scale: [0.05, 0.32],
            global_crops_size: 224,
            local_crops_size: 96,
            augmentation: AugmentationConfig::default(),
        }
    }
}

/// Photometric augmentation applied after cropping. Probabilities are in [0, 1].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct AugmentationConfig {
    /// Probability of a horizontal flip, every crop.
    #[schemars(range(min = 0.0, max = 1.0))]
    pub horizontal_flip_probability: f64,
    /// Probability of applying colour jitter, every crop.
    #[schemars(range(min = 0.0, max = 1.0))]
    pub color_jitter_probability: f64,
    /// Colour-jitter brightness strength.
    #[schemars(range(min = 0.0))]
    pub brightness: f64,
    /// Colour-jitter contrast strength.
    #[schemars(range(min = 0.0))]
    pub contrast: f64,
    /// Colour-jitter saturation strength.
    #[schemars(range(min = 0.0))]
    pub saturation: f64,
    /// Colour-jitter hue strength, in [0, 0.5].
    #[schemars(range(min = 0.0, max = 0.5))]
    pub hue: f64,
    /// Probability of converting to grayscale, every crop.
    #[schemars(range(min = 0.0, max = 1.0))]
    pub grayscale_probability: f64,
    /// Gaussian blur probability for the first global crop.
    #[schemars(range(min = 0.0, max = 1.0))]
    pub global1_blur_probability: f64,
    /// Gaussian blur probability for the second global crop.
    #[schemars(range(min = 0.0, max = 1.0))]
    pub global2_blur_probability: f64,
    /// Gaussian blur probability for each local crop.
    #[schemars(range(min = 0.0, max = 1.0))]
    pub local_blur_probability: f64,
    /// `[min, max]` sigma of the Gaussian blur (kernel size 9), 0 < min <= max.
    #[schemars(length(min = 2, max = 2))]
    pub blur_sigma: [f64; 2],
    /// Solarisation probability for the second global crop (threshold 128).
    #[schemars(range(min = 0.0, max = 1.0))]
    pub global2_solarize_probability: f64,
    /// Per-channel mean used to normalise images (ImageNet's, like the official code).
    #[schemars(length(min = 1, max = 4))]
    pub normalize_mean: Vec<f64>,
    /// Per-channel standard deviation used to normalise images; same length as
    /// `normalizeMean`, every value > 0.
    #[schemars(length(min = 1, max = 4))]
    pub normalize_std: Vec<f64>,
}

impl Default for AugmentationConfig {
    fn default() -> Self {
        Self {
            horizontal_flip_probability: 0.5,
            color_jitter_probability: 0.8,
            brightness: 0.4,
            contrast: 0.4,
            saturation: 0.2,
            hue: 0.1,
            grayscale_probability: 0.2,
            global1_blur_probability: 1.0,
            global2_blur_probability: 0.1,
            local_blur_probability: 0.5,
            blur_sigma: [0.1, 2.0],
            global2_solarize_probability: 0.2,
            normalize_mean: vec![0.485, 0.456, 0.406],
            normalize_std: vec![0.229, 0.224, 0.225],
        }
    }
}
