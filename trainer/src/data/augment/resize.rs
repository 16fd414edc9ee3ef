//! Pillow's bicubic resampling, bit for bit.
//!
//! The reference pipeline resizes PIL images, and a float antialiased bicubic that rounds once
//! differs from Pillow by up to 18 levels (see the augmentation fixture), so the algorithm of
//! Pillow's `Resample.c` is reproduced: two separable passes (horizontal, then vertical), the
//! kernel support widened by the scale when downscaling, per-pixel normalised weights in 22-bit
//! fixed point, rounding and clamping to u8 after each pass.

use image::RgbImage;

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// A crop box in source pixels: `image[top..top+height, left..left+width]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CropBox {
    pub top: u32,
    pub left: u32,
    pub height: u32,
    pub width: u32,
}

/// Fixed-point filter taps of one axis: for output `i`, `count[i]` taps starting at source
/// position `first[i]`, stored at `taps[i * ksize..]`.
struct Coeffs {
    first: Vec<usize>,
    count: Vec<usize>,
    ksize: usize,
    taps: Vec<i32>,
}

fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

fn coeffs(in_size: usize, out_size: usize) -> Coeffs {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let inv = 1.0 / filterscale;
    let mut c = Coeffs {
        first: Vec::with_capacity(out_size),
        count: Vec::with_capacity(out_size),
        ksize,
        taps: vec![0; out_size * ksize],
    };
    let mut w = vec![0.0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        // `as` truncates toward zero, like the C `(int)` cast it mirrors.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = xmax - xmin;
        let mut sum = 0.0;
        for (x, wx) in w.iter_mut().enumerate().take(n) {
            *wx = bicubic(((x + xmin) as f64 - center + 0.5) * inv);
            sum += *wx;
        }
        for (x, &wx) in w.iter().enumerate().take(n) {
            let v = if sum != 0.0 { wx / sum } else { wx };
            let fixed = v * f64::from(1u32 << PRECISION_BITS);
            c.taps[xx * ksize + x] = if v < 0.0 {
                (fixed - 0.5) as i32
            } else {
                (fixed + 0.5) as i32
            };
        }
        c.first.push(xmin);
        c.count.push(n);
    }
    c
}

#[inline]
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Crops `src` to `crop` and resizes it to `out_w`×`out_h` exactly as
/// `img.crop(box).resize((out_w, out_h), Image.BICUBIC)` in Pillow. Pixels outside the crop
/// never contribute (the crop happens first in the reference).
pub fn resized_crop(src: &RgbImage, crop: CropBox, out_w: u32, out_h: u32) -> RgbImage {
    let stride = src.width() as usize * 3;
    let raw = src.as_raw();
    let (cw, ch) = (crop.width as usize, crop.height as usize);
    let (ow, oh) = (out_w as usize, out_h as usize);
    let (x0, y0) = (crop.left as usize, crop.top as usize);
    let vert = coeffs(ch, oh);
    // Only the crop rows the vertical pass reads go through the horizontal pass, as in Pillow.
    let row_first = vert.first[0];
    let row_last = vert.first[oh - 1] + vert.count[oh - 1];
    let row_len = ow * 3;
    let mut mid = vec![0u8; (row_last - row_first) * row_len];
    let half = 1i32 << (PRECISION_BITS - 1);
    let horiz = (cw != ow).then(|| coeffs(cw, ow));
    for (r, out) in mid.chunks_exact_mut(row_len).enumerate() {
        let line = &raw[(y0 + row_first + r) * stride + x0 * 3..];
        let Some(h) = &horiz else {
            out.copy_from_slice(&line[..row_len]);
            continue;
        };
        for xx in 0..ow {
            let taps = &h.taps[xx * h.ksize..xx * h.ksize + h.count[xx]];
            let px = &line[h.first[xx] * 3..];
            let (mut a0, mut a1, mut a2) = (half, half, half);
            for (t, &k) in taps.iter().enumerate() {
                a0 += i32::from(px[t * 3]) * k;
                a1 += i32::from(px[t * 3 + 1]) * k;
                a2 += i32::from(px[t * 3 + 2]) * k;
            }
            out[xx * 3] = clip8(a0);
            out[xx * 3 + 1] = clip8(a1);
            out[xx * 3 + 2] = clip8(a2);
        }
    }
    if ch == oh {
        // No vertical pass: with equal heights the rows used are exactly the crop's rows.
        return RgbImage::from_raw(out_w, out_h, mid).expect("buffer sized from the output");
    }
    let mut out = vec![0u8; oh * row_len];
    let mut acc = vec![0i32; row_len];
    for (yy, out_row) in out.chunks_exact_mut(row_len).enumerate() {
        acc.fill(half);
        let first = vert.first[yy] - row_first;
        let taps = &vert.taps[yy * vert.ksize..yy * vert.ksize + vert.count[yy]];
        for (t, &k) in taps.iter().enumerate() {
            let row = &mid[(first + t) * row_len..(first + t + 1) * row_len];
            for (a, &p) in acc.iter_mut().zip(row) {
                *a += i32::from(p) * k;
            }
        }
        for (o, &a) in out_row.iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
    RgbImage::from_raw(out_w, out_h, out).expect("buffer sized from the output")
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    #[test]
    fn resizing_to_the_same_size_is_the_identity() {
        let img = RgbImage::from_fn(13, 9, |x, y| {
            Rgb([(x * 19) as u8, (y * 28) as u8, (x * y) as u8])
        });
        let same = resized_crop(
            &img,
            CropBox {
                top: 0,
                left: 0,
                height: 9,
                width: 13,
            },
            13,
            9,
        );
        assert_eq!(same, img);
    }

    #[test]
    fn a_constant_image_stays_constant_up_and_down() {
        let img = RgbImage::from_pixel(50, 40, Rgb([200, 3, 77]));
        for (w, h) in [(7, 5), (224, 224), (50, 13)] {
            let out = resized_crop(
                &img,
                CropBox {
                    top: 5,
                    left: 4,
                    height: 30,
                    width: 41,
                },
                w,
                h,
            );
            assert!(out.pixels().all(|p| p.0 == [200, 3, 77]), "{w}x{h}");
        }
    }

    #[test]
    fn fixed_point_taps_of_each_output_pixel_sum_to_one() {
        for (i, o) in [(200, 224), (90, 98), (1000, 96), (28, 224)] {
            let c = coeffs(i, o);
            for xx in 0..o {
                let s: i32 = c.taps[xx * c.ksize..xx * c.ksize + c.count[xx]]
                    .iter()
                    .sum();
                assert!(
                    (s - (1 << PRECISION_BITS)).abs() <= c.count[xx] as i32,
                    "{i}->{o} at {xx}: {s}"
                );
            }
        }
    }
}
