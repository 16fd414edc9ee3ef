//! Gaussian blur as torchvision's `gaussian_blur`: float32 kernel
//! `exp(-0.5 (x/σ)²)` normalised, reflect padding, result rounded half-to-even back to u8.
//!
//! The reference convolves with the 2-D outer-product kernel; this applies the same kernel
//! separably (rows, then columns), which is ~10× cheaper and equal up to float32 summation
//! order (below 1e-6 on [0, 1] data, at most ±1 after rounding to u8).

use image::RgbImage;

/// torchvision's `_get_gaussian_kernel1d` in float32.
pub fn gaussian_kernel(size: usize, sigma: f32) -> Vec<f32> {
    let half = (size - 1) as f32 * 0.5;
    let pdf: Vec<f32> = (0..size)
        .map(|i| {
            let x = (-half + i as f32) / sigma;
            (-0.5 * x * x).exp()
        })
        .collect();
    let sum: f32 = pdf.iter().sum();
    pdf.into_iter().map(|p| p / sum).collect()
}

/// Index of a reflected (not edge-repeated) position: -1 -> 1, n -> n - 2.
#[inline]
fn reflect(i: isize, n: usize) -> usize {
    let n = n as isize;
    if n == 1 {
        return 0;
    }
    let period = 2 * (n - 1);
    let m = i.rem_euclid(period);
    (if m < n { m } else { period - m }) as usize
}

/// Blurs an interleaved `h`×`w`×`c` float image.
pub fn blur_f32(data: &[f32], w: usize, h: usize, c: usize, kernel: &[f32]) -> Vec<f32> {
    let r = (kernel.len() / 2) as isize;
    let row_len = w * c;
    // Horizontal pass. Interior columns accumulate one tap at a time over the whole row
    // (contiguous, vectorisable); the `r` columns at each border use reflected indices. Both
    // sum the taps in the same order.
    let ri = r as usize;
    let (lo, hi) = if w > 2 * ri { (ri, w - ri) } else { (w, w) };
    let mut tmp = vec![0f32; data.len()];
    for (src, dst) in data
        .chunks_exact(row_len)
        .zip(tmp.chunks_exact_mut(row_len))
    {
        for (t, &k) in kernel.iter().enumerate().filter(|_| lo < hi) {
            let interior = &mut dst[lo * c..hi * c];
            let shifted = &src[(lo + t - ri) * c..(hi + t - ri) * c];
            for (o, &v) in interior.iter_mut().zip(shifted) {
                *o += k * v;
            }
        }
        for x in (0..lo).chain(hi.max(lo)..w) {
            for ch in 0..c {
                let mut acc = 0f32;
                for (t, &k) in kernel.iter().enumerate() {
                    acc += k * src[reflect(x as isize + t as isize - r, w) * c + ch];
                }
                dst[x * c + ch] = acc;
            }
        }
    }
    // Vertical pass, a whole row at a time for locality.
    let mut out = vec![0f32; data.len()];
    for (y, dst) in out.chunks_exact_mut(row_len).enumerate() {
        for (t, &k) in kernel.iter().enumerate() {
            let sy = reflect(y as isize + t as isize - r, h);
            for (o, &v) in dst.iter_mut().zip(&tmp[sy * row_len..(sy + 1) * row_len]) {
                *o += k * v;
            }
        }
    }
    out
}

/// Blurs an RGB u8 image in place, rounding half to even like `torch.round`.
pub fn blur_u8(img: &mut RgbImage, kernel: &[f32]) {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let data: Vec<f32> = img.iter().map(|&v| f32::from(v)).collect();
    let out = blur_f32(&data, w, h, 3, kernel);
    for (d, v) in img.iter_mut().zip(out) {
        *d = v.round_ties_even().clamp(0.0, 255.0) as u8;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_is_normalised_and_symmetric() {
        let k = gaussian_kernel(9, 1.3);
        assert!((k.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        for i in 0..4 {
            assert_eq!(k[i], k[8 - i]);
        }
        assert!(k[4] > k[3]);
    }

    #[test]
    fn reflect_padding_mirrors_without_repeating_the_edge() {
        assert_eq!(reflect(-1, 5), 1);
        assert_eq!(reflect(-4, 5), 4);
        assert_eq!(reflect(5, 5), 3);
        assert_eq!(reflect(8, 5), 0);
        assert_eq!(reflect(-3, 2), 1);
    }

    #[test]
    fn blurring_a_constant_image_changes_nothing() {
        // Also smaller than the kernel, where torchvision would refuse to pad.
        for (w, h) in [(12, 7), (3, 2)] {
            let mut img = RgbImage::from_pixel(w, h, image::Rgb([9, 130, 255]));
            blur_u8(&mut img, &gaussian_kernel(9, 2.0));
            assert!(img.pixels().all(|p| p.0 == [9, 130, 255]), "{w}x{h}");
        }
    }
}
