//! From image files to the image tower's input.
//!
//! PNG or JPEG bytes are decoded to RGB, the shorter side is resized to the
//! tower's input size (bilinear) and the centre cropped to a square, then
//! each channel is scaled to [0, 1] and normalised with the manifest's mean
//! and standard deviation, laid out CHW. An image already at the input size
//! is not resampled, so the trainer (which renders pixels in memory) and
//! serving (which reads files) feed the tower the very same numbers.

use image::imageops::FilterType;
use image::{ImageFormat, RgbImage};

use crate::{EncoderError, ImageSpec, Result};

/// Decodes PNG or JPEG bytes (told apart by their signature).
pub fn decode(bytes: &[u8]) -> Result<RgbImage> {
    let format = image::guess_format(bytes)
        .map_err(|_| EncoderError::Image("not a PNG or JPEG file (unknown signature)".into()))?;
    if !matches!(format, ImageFormat::Png | ImageFormat::Jpeg) {
        return Err(EncoderError::Image(format!(
            "{format:?} is not supported; Kalon reads PNG and JPEG"
        )));
    }
    let image = image::load_from_memory_with_format(bytes, format)
        .map_err(|e| EncoderError::Image(format!("{format:?}: {e}")))?;
    Ok(image.into_rgb8())
}

/// Resizes the shorter side to `size` and crops the centre square.
pub fn fit(image: &RgbImage, size: u32) -> RgbImage {
    let (w, h) = image.dimensions();
    if w == size && h == size {
        return image.clone();
    }
    let scale = size as f64 / w.min(h) as f64;
    let (nw, nh) = (
        ((w as f64 * scale).round() as u32).max(size),
        ((h as f64 * scale).round() as u32).max(size),
    );
    let resized = image::imageops::resize(image, nw, nh, FilterType::Triangle);
    image::imageops::crop_imm(&resized, (nw - size) / 2, (nh - size) / 2, size, size).to_image()
}

/// Appends the normalised CHW tensor of an RGB8 buffer of `size`x`size`
/// pixels (row-major, 3 bytes per pixel) to `out`.
pub fn push_rgb8(rgb: &[u8], spec: &ImageSpec, out: &mut Vec<f32>) {
    let pixels = (spec.size * spec.size) as usize;
    debug_assert_eq!(rgb.len(), pixels * 3);
    out.reserve(pixels * 3);
    for c in 0..3 {
        let (mean, std) = (spec.mean[c], spec.std[c]);
        out.extend(
            rgb.chunks_exact(3)
                .map(|p| (p[c] as f32 / 255.0 - mean) / std),
        );
    }
}

/// Appends the tower input of one decoded image to `out`.
pub fn push_image(image: &RgbImage, spec: &ImageSpec, out: &mut Vec<f32>) {
    let fitted = fit(image, spec.size);
    push_rgb8(fitted.as_raw(), spec, out);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(size: u32) -> ImageSpec {
        ImageSpec {
            file: "image.onnx".into(),
            size,
            mean: [0.5, 0.25, 0.0],
            std: [0.5, 0.25, 1.0],
        }
    }

    #[test]
    fn png_and_jpeg_decode_and_other_bytes_are_refused() {
        let mut img = RgbImage::new(40, 20);
        for (x, _, p) in img.enumerate_pixels_mut() {
            *p = image::Rgb([(x * 6) as u8, 128, 255]);
        }
        for format in [ImageFormat::Png, ImageFormat::Jpeg] {
            let mut bytes = std::io::Cursor::new(Vec::new());
            img.write_to(&mut bytes, format).unwrap();
            let back = decode(bytes.get_ref()).unwrap();
            assert_eq!(back.dimensions(), (40, 20), "{format:?}");
        }
        let err = decode(b"GIF89a not really").unwrap_err().to_string();
        assert!(
            err.contains("PNG and JPEG") || err.contains("signature"),
            "{err}"
        );
        let err = decode(b"\x89PNG\r\n\x1a\n truncated")
            .unwrap_err()
            .to_string();
        assert!(err.contains("Png"), "{err}");
    }

    #[test]
    fn fit_crops_the_centre_and_keeps_exact_sizes_untouched() {
        let mut img = RgbImage::new(80, 40);
        for (x, _, p) in img.enumerate_pixels_mut() {
            // left quarter red, right quarter blue, middle green
            *p = match x {
                0..20 => image::Rgb([255, 0, 0]),
                60.. => image::Rgb([0, 0, 255]),
                _ => image::Rgb([0, 255, 0]),
            };
        }
        let out = fit(&img, 20);
        assert_eq!(out.dimensions(), (20, 20));
        // the centre crop of the half-size image is all green
        assert!(out
            .pixels()
            .all(|p| p.0[1] > 200 && p.0[0] < 60 && p.0[2] < 60));
        let same = fit(&out, 20);
        assert_eq!(same, out);
    }

    #[test]
    fn normalisation_is_per_channel_and_chw() {
        let rgb = [255u8, 0, 0, 0, 255, 0, 0, 0, 255, 255, 255, 255];
        let mut out = Vec::new();
        push_rgb8(&rgb, &spec(2), &mut out);
        assert_eq!(out.len(), 12);
        // red plane: (1 - 0.5) / 0.5 = 1, (0 - 0.5) / 0.5 = -1
        assert_eq!(&out[0..4], &[1.0, -1.0, -1.0, 1.0]);
        // green plane: (1 - 0.25) / 0.25 = 3, -1
        assert_eq!(&out[4..8], &[-1.0, 3.0, -1.0, 3.0]);
        // blue plane: unchanged scale
        assert_eq!(&out[8..12], &[0.0, 0.0, 1.0, 1.0]);
    }
}
