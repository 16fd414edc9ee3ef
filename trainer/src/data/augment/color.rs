//! Pixel-wise colour operations on RGB u8, reproducing the PIL path of torchvision
//! (`ImageEnhance`, `Image.blend`, Pillow's "L" and "HSV" conversions) including its float
//! types and truncations, so jittered crops have the reference's value distribution.

use image::RgbImage;

/// Pillow's luminance: `(19595 R + 38470 G + 7471 B + 0x8000) >> 16`.
#[inline]
pub fn luma(p: &[u8]) -> u8 {
    ((u32::from(p[0]) * 19595 + u32::from(p[1]) * 38470 + u32::from(p[2]) * 7471 + 0x8000) >> 16)
        as u8
}

/// `rgb_to_grayscale(img, num_output_channels=3)`: Pillow "L" replicated to three channels.
pub fn grayscale(img: &mut RgbImage) {
    for p in img.chunks_exact_mut(3) {
        let l = luma(p);
        p.fill(l);
    }
}

/// `ImageOps.solarize`: values at or above `threshold` are inverted.
pub fn solarize(img: &mut RgbImage, threshold: u8) {
    for v in img.iter_mut() {
        if *v >= threshold {
            *v = 255 - *v;
        }
    }
}

pub fn hflip(img: &mut RgbImage) {
    let w = img.width() as usize;
    for row in img.chunks_exact_mut(w * 3) {
        for x in 0..w / 2 {
            let (a, b) = (x * 3, (w - 1 - x) * 3);
            for c in 0..3 {
                row.swap(a + c, b + c);
            }
        }
    }
}

/// `Image.blend(degenerate, img, alpha)` in Pillow's f32 arithmetic: truncation inside [0, 1],
/// clamping outside.
#[inline]
fn blend(degenerate: u8, v: u8, alpha: f32) -> u8 {
    let t = f32::from(degenerate) + alpha * (i32::from(v) - i32::from(degenerate)) as f32;
    if (0.0..=1.0).contains(&alpha) {
        t as u8
    } else {
        t.clamp(0.0, 255.0) as u8
    }
}

/// `ImageEnhance.Brightness(img).enhance(factor)`.
pub fn adjust_brightness(img: &mut RgbImage, factor: f32) {
    if factor == 1.0 {
        return;
    }
    for v in img.iter_mut() {
        *v = blend(0, *v, factor);
    }
}

/// `ImageEnhance.Contrast(img).enhance(factor)`: blend with the rounded mean luminance.
pub fn adjust_contrast(img: &mut RgbImage, factor: f32) {
    if factor == 1.0 {
        return;
    }
    let sum: u64 = img.chunks_exact(3).map(|p| u64::from(luma(p))).sum();
    let n = u64::from(img.width()) * u64::from(img.height());
    let mean = (sum as f64 / n as f64 + 0.5) as u8;
    for v in img.iter_mut() {
        *v = blend(mean, *v, factor);
    }
}

/// `ImageEnhance.Color(img).enhance(factor)`: blend with the pixel's own luminance.
pub fn adjust_saturation(img: &mut RgbImage, factor: f32) {
    if factor == 1.0 {
        return;
    }
    for p in img.chunks_exact_mut(3) {
        let l = luma(p);
        for v in p.iter_mut() {
            *v = blend(l, *v, factor);
        }
    }
}

/// torchvision's PIL `adjust_hue`: to Pillow HSV, shift H by `int(hue * 255)` (wrapping), back.
pub fn adjust_hue(img: &mut RgbImage, hue: f32) {
    let shift = (f64::from(hue) * 255.0) as i32 as u8;
    if shift == 0 {
        // Pillow's HSV round trip is lossy, but torchvision would still perform it.
        for p in img.chunks_exact_mut(3) {
            let hsv = rgb_to_hsv(p[0], p[1], p[2]);
            p.copy_from_slice(&hsv_to_rgb(hsv[0], hsv[1], hsv[2]));
        }
        return;
    }
    for p in img.chunks_exact_mut(3) {
        let [h, s, v] = rgb_to_hsv(p[0], p[1], p[2]);
        p.copy_from_slice(&hsv_to_rgb(h.wrapping_add(shift), s, v));
    }
}

#[inline]
fn clip8(v: i32) -> u8 {
    v.clamp(0, 255) as u8
}

/// Pillow's `rgb2hsv_row` (mixed float/double arithmetic kept as in C).
pub fn rgb_to_hsv(r: u8, g: u8, b: u8) -> [u8; 3] {
    let maxc = r.max(g).max(b);
    let minc = r.min(g).min(b);
    if maxc == minc {
        return [0, 0, maxc];
    }
    let cr = f32::from(maxc - minc);
    let s = cr / f32::from(maxc);
    let rc = f32::from(maxc - r) / cr;
    let gc = f32::from(maxc - g) / cr;
    let bc = f32::from(maxc - b) / cr;
    let h: f32 = if r == maxc {
        bc - gc
    } else if g == maxc {
        (2.0 + f64::from(rc) - f64::from(bc)) as f32
    } else {
        (4.0 + f64::from(gc) - f64::from(rc)) as f32
    };
    let h = ((f64::from(h) / 6.0 + 1.0) % 1.0) as f32;
    [
        clip8((f64::from(h) * 255.0) as i32),
        clip8((f64::from(s) * 255.0) as i32),
        maxc,
    ]
}

/// Pillow's `hsv2rgb`.
pub fn hsv_to_rgb(h: u8, s: u8, v: u8) -> [u8; 3] {
    if s == 0 {
        return [v, v, v];
    }
    let hh = f64::from(f32::from(h)) * 6.0 / 255.0;
    let i = hh.floor() as i32;
    let f = (hh - f64::from(i as f32)) as f32;
    let fs = (f64::from(f32::from(s)) / 255.0) as f32;
    let vf = f64::from(f32::from(v));
    // C `round` rounds half away from zero, as `f64::round`.
    let p = clip8((vf * (1.0 - f64::from(fs))).round() as i32);
    let q = clip8((vf * (1.0 - f64::from(fs * f))).round() as i32);
    let t = clip8((vf * (1.0 - f64::from(fs) * (1.0 - f64::from(f)))).round() as i32);
    match i % 6 {
        0 => [v, t, p],
        1 => [q, v, p],
        2 => [p, v, t],
        3 => [p, q, v],
        4 => [t, p, v],
        _ => [v, p, q],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    #[test]
    fn grayscale_uses_pillow_luminance() {
        let mut img = RgbImage::from_pixel(1, 1, Rgb([255, 0, 0]));
        grayscale(&mut img);
        assert_eq!(img.get_pixel(0, 0).0, [76, 76, 76]);
    }

    #[test]
    fn solarize_inverts_from_the_threshold_up() {
        let mut img = RgbImage::from_raw(2, 1, vec![127, 128, 255, 0, 200, 10]).unwrap();
        solarize(&mut img, 128);
        assert_eq!(img.as_raw(), &[127, 127, 0, 0, 55, 10]);
    }

    #[test]
    fn brightness_truncates_when_darkening_and_clamps_when_brightening() {
        let mut img = RgbImage::from_raw(1, 1, vec![10, 101, 250]).unwrap();
        adjust_brightness(&mut img, 0.75);
        assert_eq!(img.as_raw(), &[7, 75, 187]);
        adjust_brightness(&mut img, 1.4);
        assert_eq!(img.as_raw(), &[9, 105, 255]);
    }

    #[test]
    fn zero_saturation_gives_the_luminance() {
        let mut img = RgbImage::from_pixel(2, 2, Rgb([30, 160, 90]));
        adjust_saturation(&mut img, 0.0);
        let l = luma(&[30, 160, 90]);
        assert!(img.pixels().all(|p| p.0 == [l, l, l]));
    }

    #[test]
    fn zero_contrast_gives_the_mean_gray() {
        let mut img = RgbImage::from_raw(2, 1, vec![0, 0, 0, 255, 255, 255]).unwrap();
        adjust_contrast(&mut img, 0.0);
        assert_eq!(img.as_raw(), &[128; 6]);
    }

    #[test]
    fn hsv_round_trip_keeps_primary_colours_and_hue_shift_rotates_them() {
        for rgb in [[255, 0, 0], [0, 255, 0], [0, 0, 255], [9, 9, 9]] {
            let [h, s, v] = rgb_to_hsv(rgb[0], rgb[1], rgb[2]);
            assert_eq!(hsv_to_rgb(h, s, v), rgb);
        }
        // A third of the hue circle turns red into (nearly) green.
        let mut img = RgbImage::from_pixel(1, 1, Rgb([255, 0, 0]));
        adjust_hue(&mut img, 1.0 / 3.0);
        let p = img.get_pixel(0, 0).0;
        assert!(p[1] == 255 && p[0] < 10 && p[2] == 0, "{p:?}");
    }

    #[test]
    fn hflip_mirrors_columns() {
        let mut img = RgbImage::from_raw(3, 1, vec![1, 2, 3, 4, 5, 6, 7, 8, 9]).unwrap();
        hflip(&mut img);
        assert_eq!(img.as_raw(), &[7, 8, 9, 4, 5, 6, 1, 2, 3]);
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// `testdata/pil_colour_reference.json` holds torchvision's PIL-path outputs (see the
    /// script beside it).
    #[test]
    fn colour_ops_match_torchvision_on_pil_exactly() {
        let text = include_str!("testdata/pil_colour_reference.json");
        let v: serde_json::Value = serde_json::from_str(text).unwrap();
        let (w, h) = (
            v["width"].as_u64().unwrap() as u32,
            v["height"].as_u64().unwrap() as u32,
        );
        let src = RgbImage::from_raw(w, h, hex(v["source"].as_str().unwrap())).unwrap();
        let mut failures = Vec::new();
        for op in v["ops"].as_array().unwrap() {
            let (name, factor) = (
                op["op"].as_str().unwrap(),
                op["factor"].as_f64().unwrap() as f32,
            );
            let mut img = src.clone();
            match name {
                "brightness" => adjust_brightness(&mut img, factor),
                "contrast" => adjust_contrast(&mut img, factor),
                "saturation" => adjust_saturation(&mut img, factor),
                "hue" => adjust_hue(&mut img, factor),
                other => panic!("unknown op {other}"),
            }
            let want = hex(op["out"].as_str().unwrap());
            let wrong = img.iter().zip(&want).filter(|(a, b)| a != b).count();
            if wrong > 0 {
                failures.push(format!("{name}({factor}): {wrong} values differ"));
            }
        }
        assert!(failures.is_empty(), "{failures:#?}");
    }
}
