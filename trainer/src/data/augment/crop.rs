//! torchvision's `RandomResizedCrop.get_params`.

use rand::Rng;

use super::resize::CropBox;

/// Samples a crop of relative area in `scale` and aspect ratio (log-uniform) in `ratio`;
/// 10 attempts, then the centre crop clamped to the ratio range — torchvision's algorithm.
pub fn random_resized_crop_box(
    width: u32,
    height: u32,
    scale: (f32, f32),
    ratio: (f32, f32),
    rng: &mut impl Rng,
) -> CropBox {
    let area = f64::from(width) * f64::from(height);
    let (log_lo, log_hi) = (ratio.0.ln(), ratio.1.ln());
    for _ in 0..10 {
        let target_area = area * f64::from(uniform(rng, scale.0, scale.1));
        let aspect = f64::from(uniform(rng, log_lo, log_hi).exp());
        // Python's round() rounds half to even.
        let w = (target_area * aspect).sqrt().round_ties_even() as i64;
        let h = (target_area / aspect).sqrt().round_ties_even() as i64;
        if 0 < w && w <= i64::from(width) && 0 < h && h <= i64::from(height) {
            let top = rng.random_range(0..=height - h as u32);
            let left = rng.random_range(0..=width - w as u32);
            return CropBox {
                top,
                left,
                height: h as u32,
                width: w as u32,
            };
        }
    }
    let in_ratio = f64::from(width) / f64::from(height);
    let (w, h) = if in_ratio < f64::from(ratio.0) {
        (
            width,
            ((f64::from(width) / f64::from(ratio.0)).round_ties_even() as u32).max(1),
        )
    } else if in_ratio > f64::from(ratio.1) {
        (
            ((f64::from(height) * f64::from(ratio.1)).round_ties_even() as u32).max(1),
            height,
        )
    } else {
        (width, height)
    };
    CropBox {
        top: (height - h) / 2,
        left: (width - w) / 2,
        height: h,
        width: w,
    }
}

/// `torch.empty(1).uniform_(lo, hi)` in float32.
pub(crate) fn uniform(rng: &mut impl Rng, lo: f32, hi: f32) -> f32 {
    lo + (hi - lo) * rng.random::<f32>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn sampled_crops_lie_inside_the_image_with_the_requested_area_and_ratio() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for _ in 0..2000 {
            let b =
                random_resized_crop_box(300, 200, (0.05, 0.32), (3.0 / 4.0, 4.0 / 3.0), &mut rng);
            assert!(b.left + b.width <= 300 && b.top + b.height <= 200, "{b:?}");
            let frac = f64::from(b.width * b.height) / 60_000.0;
            assert!((0.04..0.34).contains(&frac), "{b:?} area {frac}");
            let r = f64::from(b.width) / f64::from(b.height);
            assert!((0.7..1.4).contains(&r), "{b:?} ratio {r}");
        }
    }

    #[test]
    fn impossible_requests_fall_back_to_the_clamped_centre_crop() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        // A 1000x10 strip can never hold a crop of ratio <= 4/3 covering >= 90% of it.
        let b = random_resized_crop_box(1000, 10, (0.9, 1.0), (3.0 / 4.0, 4.0 / 3.0), &mut rng);
        assert_eq!(
            b,
            CropBox {
                top: 0,
                left: 493,
                height: 10,
                width: 13
            }
        );
    }
}
