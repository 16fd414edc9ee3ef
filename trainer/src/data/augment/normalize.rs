//! `ToTensor` + `Normalize(mean, std)`: HWC u8 to CHW f32, `(v / 255 - mean) / std` in float32.

use image::RgbImage;

pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Per-channel lookup tables of the 256 possible outputs, computed with exactly the float32
/// operations of the reference, so normalising is a table lookup.
#[derive(Debug, Clone)]
pub struct Normalizer {
    lut: [[f32; 256]; 3],
}

impl Normalizer {
    pub fn new(mean: [f32; 3], std: [f32; 3]) -> Self {
        let mut lut = [[0f32; 256]; 3];
        for (c, table) in lut.iter_mut().enumerate() {
            for (v, out) in table.iter_mut().enumerate() {
                *out = (v as f32 / 255.0 - mean[c]) / std[c];
            }
        }
        Self { lut }
    }

    /// Writes `img` as CHW into `out` (length `3 * h * w`).
    pub fn write_chw(&self, img: &RgbImage, out: &mut [f32]) {
        let plane = img.width() as usize * img.height() as usize;
        assert_eq!(out.len(), 3 * plane, "output slot has the wrong size");
        let (r, rest) = out.split_at_mut(plane);
        let (g, b) = rest.split_at_mut(plane);
        for (i, p) in img.chunks_exact(3).enumerate() {
            r[i] = self.lut[0][p[0] as usize];
            g[i] = self.lut[1][p[1] as usize];
            b[i] = self.lut[2][p[2] as usize];
        }
    }
}

impl Default for Normalizer {
    fn default() -> Self {
        Self::new(IMAGENET_MEAN, IMAGENET_STD)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalisation_writes_planes_in_chw_order() {
        let img = RgbImage::from_raw(2, 1, vec![0, 255, 128, 255, 0, 0]).unwrap();
        let mut out = vec![0f32; 6];
        Normalizer::default().write_chw(&img, &mut out);
        assert!((out[0] - (-0.485 / 0.229)).abs() < 1e-6);
        assert!((out[1] - (0.515 / 0.229)).abs() < 1e-5);
        assert!((out[2] - (0.544 / 0.224)).abs() < 1e-5);
        assert!((out[5] - (-0.406 / 0.225)).abs() < 1e-6);
    }
}
