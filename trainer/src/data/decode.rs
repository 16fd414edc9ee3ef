//! Decoding encoded image bytes to RGB u8.
//!
//! JPEG goes straight to zune-jpeg (the decoder `image` itself uses) so that strict mode can be
//! switched on: without it a truncated JPEG decodes "successfully" with grey rows, where Pillow
//! (the reference loader) raises. The decoder was chosen by measurement, see
//! `bench/loader/README.md`. PNG and WebP go through `image`.

use image::RgbImage;
use zune_core::bytestream::ZCursor;
use zune_core::colorspace::ColorSpace;
use zune_core::options::DecoderOptions;
use zune_jpeg::JpegDecoder;

use super::DataError;

/// Largest side accepted; protects the workers from decompression bombs.
const MAX_SIDE: usize = 1 << 15;

/// Decodes `bytes` (JPEG, PNG or WebP, detected by content) into an RGB image, like Pillow's
/// `Image.open(..).convert("RGB")`. `what` names the image in the error.
pub fn decode_rgb(bytes: &[u8], what: &str) -> Result<RgbImage, DataError> {
    let corrupt = |reason: String| DataError::Corrupt {
        what: what.to_string(),
        reason,
    };
    if bytes.starts_with(&[0xFF, 0xD8]) {
        return decode_jpeg(bytes).map_err(corrupt);
    }
    let img = image::load_from_memory(bytes).map_err(|e| corrupt(e.to_string()))?;
    Ok(img.into_rgb8())
}

fn decode_jpeg(bytes: &[u8]) -> Result<RgbImage, String> {
    let options = DecoderOptions::default()
        .set_strict_mode(true)
        .set_max_width(MAX_SIDE)
        .set_max_height(MAX_SIDE)
        .jpeg_set_out_colorspace(ColorSpace::RGB);
    let mut decoder = JpegDecoder::new_with_options(ZCursor::new(bytes), options);
    let pixels = decoder.decode().map_err(|e| format!("{e:?}"))?;
    let info = decoder.info().ok_or("JPEG without a frame header")?;
    let (w, h) = (u32::from(info.width), u32::from(info.height));
    RgbImage::from_raw(w, h, pixels)
        .ok_or_else(|| format!("JPEG decoded to a wrong size for {w}x{h}"))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use image::{ImageFormat, Rgb};
    use std::io::Cursor;

    /// A smooth test picture, encoded in `format`.
    pub(crate) fn encoded(w: u32, h: u32, format: ImageFormat) -> Vec<u8> {
        let img = RgbImage::from_fn(w, h, |x, y| {
            Rgb([(x * 7) as u8, (y * 5) as u8, ((x + y) * 3) as u8])
        });
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, format).unwrap();
        out.into_inner()
    }

    #[test]
    fn jpeg_png_and_webp_decode_to_rgb_of_the_right_size() {
        for format in [ImageFormat::Jpeg, ImageFormat::Png, ImageFormat::WebP] {
            let img = decode_rgb(&encoded(40, 30, format), "x").unwrap();
            assert_eq!(img.dimensions(), (40, 30), "{format:?}");
            // Lossy JPEG stays close to the source pixel.
            let p = img.get_pixel(10, 10);
            assert!((i32::from(p[0]) - 70).abs() <= 3, "{format:?}: {p:?}");
        }
    }

    #[test]
    fn a_truncated_jpeg_is_reported_corrupt() {
        let bytes = encoded(64, 64, ImageFormat::Jpeg);
        let cut = &bytes[..bytes.len() / 2];
        let err = decode_rgb(cut, "cut.jpg").unwrap_err();
        assert!(
            matches!(err, DataError::Corrupt { ref what, .. } if what == "cut.jpg"),
            "{err}"
        );
    }

    #[test]
    fn a_non_image_file_is_reported_corrupt() {
        let err = decode_rgb(b"hello, I am a text file", "notes.jpg").unwrap_err();
        assert!(matches!(err, DataError::Corrupt { .. }));
        assert!(decode_rgb(&[], "empty.png").is_err());
    }
}
