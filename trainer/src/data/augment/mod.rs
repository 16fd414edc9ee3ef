//! DINOv2's multi-crop augmentation (`dinov2/data/augmentations.py`) on the PIL path: every
//! step works on RGB u8 like Pillow, and only the final normalisation produces float32.

pub mod blur;
pub mod color;
pub mod crop;
pub mod normalize;
pub mod resize;

#[cfg(test)]
mod parity_tests;

use image::RgbImage;
use rand::Rng;
use rand::seq::SliceRandom;

pub use crop::random_resized_crop_box;
pub use normalize::{IMAGENET_MEAN, IMAGENET_STD, Normalizer};
pub use resize::{CropBox, resized_crop};

use super::DataError;
use crop::uniform;

/// `ColorJitter(brightness, contrast, saturation, hue)` applied with probability `p`.
#[derive(Debug, Clone, PartialEq)]
pub struct ColorJitterConfig {
    pub brightness: f32,
    pub contrast: f32,
    pub saturation: f32,
    pub hue: f32,
    pub p: f32,
}

/// The per-crop extras after colour jitter: Gaussian blur and solarisation probabilities.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CropExtras {
    pub blur_p: f32,
    pub solarize_p: f32,
}

/// All parameters of the multi-crop augmentation. `Default` is the official DINOv2 recipe.
#[derive(Debug, Clone, PartialEq)]
pub struct MultiCropConfig {
    pub global_crops_size: u32,
    pub local_crops_size: u32,
    pub local_crops_number: usize,
    pub global_crops_scale: (f32, f32),
    pub local_crops_scale: (f32, f32),
    /// Aspect-ratio range of RandomResizedCrop.
    pub ratio: (f32, f32),
    pub hflip_p: f32,
    pub color_jitter: ColorJitterConfig,
    pub grayscale_p: f32,
    pub blur_kernel_size: usize,
    pub blur_sigma: (f32, f32),
    pub global1: CropExtras,
    pub global2: CropExtras,
    pub local: CropExtras,
    pub solarize_threshold: u8,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Default for MultiCropConfig {
    fn default() -> Self {
        Self {
            global_crops_size: 224,
            local_crops_size: 96,
            local_crops_number: 8,
            global_crops_scale: (0.32, 1.0),
            local_crops_scale: (0.05, 0.32),
            ratio: (3.0 / 4.0, 4.0 / 3.0),
            hflip_p: 0.5,
            color_jitter: ColorJitterConfig {
                brightness: 0.4,
                contrast: 0.4,
                saturation: 0.2,
                hue: 0.1,
                p: 0.8,
            },
            grayscale_p: 0.2,
            blur_kernel_size: 9,
            blur_sigma: (0.1, 2.0),
            // The *effective* probabilities of the released models. DINOv2 writes
            // GaussianBlur(p=1.0) / (p=0.1) / (p=0.5), but its GaussianBlur hands `1 - p` to
            // torchvision's RandomApply, which applies with the probability it is given
            // (dinov2/data/transforms.py; confirmed in facebookresearch/dinov3#286 and the
            // behaviour-preserving fix dinov3#342). So global crop 1 is never blurred, global
            // crop 2 is blurred 90% of the time, local crops half of the time.
            global1: CropExtras {
                blur_p: 0.0,
                solarize_p: 0.0,
            },
            global2: CropExtras {
                blur_p: 0.9,
                solarize_p: 0.2,
            },
            local: CropExtras {
                blur_p: 0.5,
                solarize_p: 0.0,
            },
            solarize_threshold: 128,
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
        }
    }
}

impl MultiCropConfig {
    /// Checks every field, naming it (in the config's camelCase) and the fix.
    pub fn validate(&self) -> Result<(), DataError> {
        let bad =
            |field: &'static str, message: String| Err(DataError::InvalidConfig { field, message });
        if self.global_crops_size < 8 {
            return bad(
                "crops.globalCropsSize",
                format!("must be >= 8, got {}", self.global_crops_size),
            );
        }
        if self.local_crops_number > 0 && self.local_crops_size < 8 {
            return bad(
                "crops.localCropsSize",
                format!("must be >= 8, got {}", self.local_crops_size),
            );
        }
        for (field, (lo, hi)) in [
            ("crops.globalCropsScale", self.global_crops_scale),
            ("crops.localCropsScale", self.local_crops_scale),
        ] {
            if !(lo > 0.0 && lo <= hi && hi <= 1.0) {
                return bad(
                    field,
                    format!("must satisfy 0 < min <= max <= 1, got [{lo}, {hi}]"),
                );
            }
        }
        if !(self.ratio.0 > 0.0 && self.ratio.0 <= self.ratio.1) {
            return bad(
                "crops.ratio",
                format!(
                    "must satisfy 0 < min <= max, got [{}, {}]",
                    self.ratio.0, self.ratio.1
                ),
            );
        }
        let cj = &self.color_jitter;
        for (field, v, max) in [
            ("crops.colorJitter.brightness", cj.brightness, f32::INFINITY),
            ("crops.colorJitter.contrast", cj.contrast, f32::INFINITY),
            ("crops.colorJitter.saturation", cj.saturation, f32::INFINITY),
            ("crops.colorJitter.hue", cj.hue, 0.5),
        ] {
            if !(0.0..=max).contains(&v) {
                return bad(field, format!("must be in [0, {max}], got {v}"));
            }
        }
        for (field, p) in [
            ("crops.hflipP", self.hflip_p),
            ("crops.colorJitter.p", cj.p),
            ("crops.grayscaleP", self.grayscale_p),
            ("crops.global1.blurP", self.global1.blur_p),
            ("crops.global1.solarizeP", self.global1.solarize_p),
            ("crops.global2.blurP", self.global2.blur_p),
            ("crops.global2.solarizeP", self.global2.solarize_p),
            ("crops.local.blurP", self.local.blur_p),
            ("crops.local.solarizeP", self.local.solarize_p),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return bad(
                    field,
                    format!("is a probability, must be in [0, 1], got {p}"),
                );
            }
        }
        if self.blur_kernel_size.is_multiple_of(2) {
            return bad(
                "crops.blurKernelSize",
                format!("must be odd, got {}", self.blur_kernel_size),
            );
        }
        let (lo, hi) = self.blur_sigma;
        if !(lo > 0.0 && lo <= hi) {
            return bad(
                "crops.blurSigma",
                format!("must satisfy 0 < min <= max, got [{lo}, {hi}]"),
            );
        }
        if self.std.iter().any(|&s| s <= 0.0) {
            return bad("crops.std", format!("must be > 0, got {:?}", self.std));
        }
        Ok(())
    }

    pub fn global_len(&self) -> usize {
        3 * (self.global_crops_size as usize).pow(2)
    }

    pub fn local_len(&self) -> usize {
        3 * (self.local_crops_size as usize).pow(2)
    }
}

/// The multi-crop transform of one image, writing normalised CHW float32 crops.
#[derive(Debug, Clone)]
pub struct MultiCrop {
    cfg: MultiCropConfig,
    normalizer: Normalizer,
}

impl MultiCrop {
    pub fn new(cfg: MultiCropConfig) -> Result<Self, DataError> {
        cfg.validate()?;
        let normalizer = Normalizer::new(cfg.mean, cfg.std);
        Ok(Self { cfg, normalizer })
    }

    pub fn config(&self) -> &MultiCropConfig {
        &self.cfg
    }

    /// Draws all crops of `img` in the reference order (global 1, global 2, locals) into the
    /// given slots (`global_len()` / `local_len()` floats each).
    pub fn apply(
        &self,
        img: &RgbImage,
        rng: &mut impl Rng,
        global: [&mut [f32]; 2],
        local: &mut [&mut [f32]],
    ) {
        let c = &self.cfg;
        let [g1, g2] = global;
        self.crop(
            img,
            c.global_crops_size,
            c.global_crops_scale,
            c.global1,
            rng,
            g1,
        );
        self.crop(
            img,
            c.global_crops_size,
            c.global_crops_scale,
            c.global2,
            rng,
            g2,
        );
        for out in local.iter_mut() {
            self.crop(
                img,
                c.local_crops_size,
                c.local_crops_scale,
                c.local,
                rng,
                out,
            );
        }
    }

    fn crop(
        &self,
        img: &RgbImage,
        size: u32,
        scale: (f32, f32),
        extras: CropExtras,
        rng: &mut impl Rng,
        out: &mut [f32],
    ) {
        let c = &self.cfg;
        let b = random_resized_crop_box(img.width(), img.height(), scale, c.ratio, rng);
        let mut crop = resized_crop(img, b, size, size);
        if rng.random::<f32>() < c.hflip_p {
            color::hflip(&mut crop);
        }
        self.color_jitter(&mut crop, rng);
        if rng.random::<f32>() < c.grayscale_p {
            color::grayscale(&mut crop);
        }
        if rng.random::<f32>() < extras.blur_p {
            let sigma = uniform(rng, c.blur_sigma.0, c.blur_sigma.1);
            blur::blur_u8(&mut crop, &blur::gaussian_kernel(c.blur_kernel_size, sigma));
        }
        if rng.random::<f32>() < extras.solarize_p {
            color::solarize(&mut crop, c.solarize_threshold);
        }
        self.normalizer.write_chw(&crop, out);
    }

    /// torchvision `ColorJitter`: the four factors are drawn, then applied in a random order.
    fn color_jitter(&self, img: &mut RgbImage, rng: &mut impl Rng) {
        let cj = &self.cfg.color_jitter;
        if rng.random::<f32>() >= cj.p {
            return;
        }
        let mut order = [0usize, 1, 2, 3];
        order.shuffle(rng);
        // torchvision's `_check_input`: factors in [max(0, 1 - v), 1 + v].
        let brightness = uniform(rng, (1.0 - cj.brightness).max(0.0), 1.0 + cj.brightness);
        let contrast = uniform(rng, (1.0 - cj.contrast).max(0.0), 1.0 + cj.contrast);
        let saturation = uniform(rng, (1.0 - cj.saturation).max(0.0), 1.0 + cj.saturation);
        let hue = uniform(rng, -cj.hue, cj.hue);
        for op in order {
            match op {
                0 => color::adjust_brightness(img, brightness),
                1 => color::adjust_contrast(img, contrast),
                2 => color::adjust_saturation(img, saturation),
                _ if cj.hue > 0.0 => color::adjust_hue(img, hue),
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn test_image() -> RgbImage {
        RgbImage::from_fn(120, 90, |x, y| {
            image::Rgb([(x * 2) as u8, (y * 2) as u8, ((x + y) % 256) as u8])
        })
    }

    #[test]
    fn defaults_are_the_official_recipe() {
        let c = MultiCropConfig::default();
        assert_eq!(
            (
                c.global_crops_size,
                c.local_crops_size,
                c.local_crops_number
            ),
            (224, 96, 8)
        );
        assert_eq!(
            (c.global_crops_scale, c.local_crops_scale),
            ((0.32, 1.0), (0.05, 0.32))
        );
        assert_eq!(
            c.global2,
            CropExtras {
                blur_p: 0.9,
                solarize_p: 0.2
            }
        );
        c.validate().unwrap();
    }

    #[test]
    fn bad_fields_are_named_in_the_error() {
        let c = MultiCropConfig {
            local_crops_scale: (0.5, 0.2),
            ..Default::default()
        };
        let err = c.validate().unwrap_err();
        assert!(
            err.to_string().starts_with("crops.localCropsScale:"),
            "{err}"
        );
        assert!(err.is_permanent());
        let c = MultiCropConfig {
            global2: CropExtras {
                blur_p: 1.5,
                solarize_p: 0.2,
            },
            ..Default::default()
        };
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("crops.global2.blurP")
        );
    }

    #[test]
    fn the_same_seed_gives_the_same_crops_and_another_seed_different_ones() {
        let cfg = MultiCropConfig {
            global_crops_size: 32,
            local_crops_size: 16,
            local_crops_number: 2,
            ..Default::default()
        };
        let mc = MultiCrop::new(cfg.clone()).unwrap();
        let img = test_image();
        let run = |seed| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let (mut g1, mut g2) = (vec![0f32; cfg.global_len()], vec![0f32; cfg.global_len()]);
            let (mut l1, mut l2) = (vec![0f32; cfg.local_len()], vec![0f32; cfg.local_len()]);
            mc.apply(&img, &mut rng, [&mut g1, &mut g2], &mut [&mut l1, &mut l2]);
            [g1, g2, l1, l2].concat()
        };
        assert_eq!(run(5), run(5));
        assert_ne!(run(5), run(6));
        assert!(run(7).iter().all(|v| v.is_finite() && v.abs() < 3.0));
    }
}
