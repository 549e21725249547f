//! Rendering an [`ImageMeta`] into pixels and a PNG file.
//!
//! Each property has a visible cause: the subject is a shape in its colour
//! placed by the composition score, the scene sets the background, the
//! harmony score picks an analogous or a clashing background tint, the
//! style grades the whole image, and the low-level qualities apply blur,
//! noise, exposure, contrast and saturation last, as a camera would.

use crate::catalog::{ImageMeta, Scene, Style, Subject};

/// An RGB image with channels in [0, 1].
pub struct Canvas {
    pub size: usize,
    pub pixels: Vec<[f32; 3]>,
}

fn hsv_to_rgb(h: f64, s: f64, v: f64) -> [f32; 3] {
    let h = h.rem_euclid(360.0) / 60.0;
    let c = v * s;
    let x = c * (1.0 - (h % 2.0 - 1.0).abs());
    let (r, g, b) = match h as u32 {
        0 => (c, x, 0.0),
        1 => (x, c, 0.0),
        2 => (0.0, c, x),
        3 => (0.0, x, c),
        4 => (x, 0.0, c),
        _ => (c, 0.0, x),
    };
    let m = v - c;
    [(r + m) as f32, (g + m) as f32, (b + m) as f32]
}

fn mix(a: [f32; 3], b: [f32; 3], t: f32) -> [f32; 3] {
    [
        a[0] + (b[0] - a[0]) * t,
        a[1] + (b[1] - a[1]) * t,
        a[2] + (b[2] - a[2]) * t,
    ]
}

fn scene_colours(scene: Scene) -> ([f32; 3], [f32; 3]) {
    match scene {
        Scene::Beach => ([0.55, 0.78, 0.95], [0.93, 0.84, 0.62]),
        Scene::Forest => ([0.35, 0.55, 0.35], [0.18, 0.35, 0.16]),
        Scene::City => ([0.62, 0.66, 0.72], [0.35, 0.36, 0.4]),
        Scene::Snow => ([0.8, 0.88, 0.96], [0.96, 0.97, 0.99]),
        Scene::Desert => ([0.95, 0.8, 0.55], [0.85, 0.6, 0.35]),
        Scene::Studio => ([0.5, 0.5, 0.5], [0.45, 0.45, 0.45]),
    }
}

/// Whether pixel (x, y), in units of the subject's radius around its centre,
/// belongs to the subject's shape.
fn inside(subject: Subject, x: f32, y: f32) -> bool {
    let circle = |cx: f32, cy: f32, r: f32| (x - cx).powi(2) + (y - cy).powi(2) <= r * r;
    let rect = |x0: f32, y0: f32, x1: f32, y1: f32| x >= x0 && x <= x1 && y >= y0 && y <= y1;
    // triangle pointing up with apex (0, top) and base at y = bottom
    let tri = |top: f32, bottom: f32, half: f32| {
        y >= top && y <= bottom && x.abs() <= half * (y - top) / (bottom - top)
    };
    match subject {
        Subject::Cat => {
            circle(0.0, 0.2, 0.7)
                || tri(-0.9, -0.3, 0.35) && (x - 0.35).abs() < 0.35
                || tri(-0.9, -0.3, 0.35) && (x + 0.35).abs() < 0.35
        }
        Subject::Dog => (x / 1.0).powi(2) + (y / 0.6).powi(2) <= 1.0 || circle(0.8, -0.5, 0.35),
        Subject::Bird => tri(-0.6, 0.4, 0.9) || circle(0.0, -0.5, 0.25),
        Subject::Flower => {
            circle(0.0, 0.0, 0.3)
                || (0..5).any(|k| {
                    let a = k as f32 * std::f32::consts::TAU / 5.0;
                    circle(0.6 * a.cos(), 0.6 * a.sin(), 0.35)
                })
        }
        Subject::Car => {
            rect(-1.0, -0.3, 1.0, 0.4)
                || rect(-0.5, -0.7, 0.5, -0.3)
                || circle(-0.6, 0.5, 0.25)
                || circle(0.6, 0.5, 0.25)
        }
        Subject::Boat => {
            (0.0..=0.5).contains(&y) && x.abs() <= 1.0 - y
                || rect(-0.05, -0.9, 0.05, 0.0)
                || tri(-0.9, -0.1, 0.6) && x > 0.0
        }
        Subject::House => rect(-0.7, -0.1, 0.7, 0.9) || tri(-0.9, -0.1, 0.9),
        Subject::Tree => circle(0.0, -0.3, 0.65) || rect(-0.15, 0.3, 0.15, 1.0),
    }
}

/// Renders the image at `size` x `size`. Pixel noise comes from a stream
/// of the world's `seed` and the image id, so it is deterministic.
pub fn render(meta: &ImageMeta, size: usize, seed: u64) -> Canvas {
    let n = size as f32;
    let (sky, ground) = scene_colours(meta.scene);
    let (hue, sat, val) = meta.colour.hsv();
    let subject_rgb = hsv_to_rgb(hue, sat, val);
    // harmonious: analogous tint; clashing: a loud tint 90-150 degrees away
    let tint_hue = if meta.harmony >= 0.5 {
        hue + 30.0 * (1.0 - meta.harmony)
    } else {
        hue + 90.0 + 120.0 * (0.5 - meta.harmony)
    };
    let tint = hsv_to_rgb(tint_hue, 0.35 + 0.6 * (1.0 - meta.harmony), 0.85);
    let tint_amount = 0.25 + 0.35 * (1.0 - meta.harmony as f32);

    // composition: from a rule-of-thirds point (1) to cut off at the edge (0)
    let c = meta.composition as f32;
    let (cx, cy) = (n * (0.33 + 0.62 * (1.0 - c)), n * (0.62 + 0.3 * (1.0 - c)));
    let radius = n * if meta.style == Style::Minimal {
        0.16
    } else {
        0.24
    };

    let mut pixels = Vec::with_capacity(size * size);
    for py in 0..size {
        let t = py as f32 / n;
        let base = if meta.style == Style::Minimal {
            sky
        } else {
            mix(sky, ground, (t * 1.6 - 0.4).clamp(0.0, 1.0))
        };
        let background = mix(base, tint, tint_amount);
        for px in 0..size {
            let (x, y) = (
                (px as f32 + 0.5 - cx) / radius,
                (py as f32 + 0.5 - cy) / radius,
            );
            pixels.push(if inside(meta.subject, x, y) {
                subject_rgb
            } else {
                background
            });
        }
    }
    let mut canvas = Canvas { size, pixels };
    grade(&mut canvas, meta.style);
    camera(&mut canvas, meta, seed);
    canvas
}

fn vignette(canvas: &mut Canvas, strength: f32) {
    let n = canvas.size as f32;
    for (i, p) in canvas.pixels.iter_mut().enumerate() {
        let (x, y) = (
            (i % canvas.size) as f32 / n - 0.5,
            (i / canvas.size) as f32 / n - 0.5,
        );
        let k = 1.0 - strength * (x * x + y * y) * 2.0;
        for c in p.iter_mut() {
            *c *= k;
        }
    }
}

/// The style's colour grade.
fn grade(canvas: &mut Canvas, style: Style) {
    match style {
        Style::Plain | Style::Minimal => {}
        Style::Vintage => {
            for p in canvas.pixels.iter_mut() {
                let l = 0.3 * p[0] + 0.59 * p[1] + 0.11 * p[2];
                *p = mix(*p, [l * 1.07 + 0.05, l * 0.95 + 0.02, l * 0.75], 0.7);
            }
            vignette(canvas, 0.6);
        }
        Style::Neon => {
            for p in canvas.pixels.iter_mut() {
                let l = 0.3 * p[0] + 0.59 * p[1] + 0.11 * p[2];
                // push saturation up and darken the mid-tones
                let s = p.map(|c| (l + (c - l) * 2.2).clamp(0.0, 1.0));
                *p = s.map(|c| c * c * 1.1);
            }
        }
        Style::Pastel => {
            for p in canvas.pixels.iter_mut() {
                *p = mix(*p, [1.0, 0.97, 0.98], 0.45);
            }
        }
        Style::Moody => {
            for p in canvas.pixels.iter_mut() {
                let l = 0.3 * p[0] + 0.59 * p[1] + 0.11 * p[2];
                *p = mix(*p, [l, l, l * 1.1], 0.5).map(|c| c * 0.55);
            }
            vignette(canvas, 0.8);
        }
    }
}

/// The low-level qualities, applied as a camera would: blur, exposure,
/// contrast, saturation, then sensor noise.
fn camera(canvas: &mut Canvas, meta: &ImageMeta, seed: u64) {
    let radius = meta.blur.round() as usize;
    if radius > 0 {
        box_blur(canvas, radius);
    }
    let gain = 2f32.powf(meta.exposure as f32);
    let contrast = meta.contrast as f32;
    let saturation = meta.colourfulness as f32;
    let mut rng = crate::stream(seed, &meta.id);
    let sigma = meta.noise;
    for p in canvas.pixels.iter_mut() {
        let l = 0.3 * p[0] + 0.59 * p[1] + 0.11 * p[2];
        for c in p.iter_mut() {
            let v = (l + (*c - l) * saturation) * gain;
            *c = ((v - 0.5) * contrast + 0.5 + (sigma * crate::normal(&mut rng)) as f32)
                .clamp(0.0, 1.0);
        }
    }
}

fn box_blur(canvas: &mut Canvas, radius: usize) {
    let size = canvas.size;
    let r = radius as isize;
    for horizontal in [true, false] {
        let source = canvas.pixels.clone();
        for y in 0..size {
            for x in 0..size {
                let mut sum = [0f32; 3];
                let mut count = 0f32;
                for d in -r..=r {
                    let (sx, sy) = if horizontal {
                        (x as isize + d, y as isize)
                    } else {
                        (x as isize, y as isize + d)
                    };
                    if sx >= 0 && sy >= 0 && (sx as usize) < size && (sy as usize) < size {
                        let p = source[sy as usize * size + sx as usize];
                        for c in 0..3 {
                            sum[c] += p[c];
                        }
                        count += 1.0;
                    }
                }
                canvas.pixels[y * size + x] = sum.map(|s| s / count);
            }
        }
    }
}

impl Canvas {
    /// 8-bit RGB bytes, row-major.
    pub fn to_rgb8(&self) -> Vec<u8> {
        self.pixels
            .iter()
            .flat_map(|p| p.map(|c| (c * 255.0 + 0.5) as u8))
            .collect()
    }

    /// The image as PNG file bytes.
    pub fn to_png(&self) -> anyhow::Result<Vec<u8>> {
        let mut out = Vec::new();
        {
            let mut encoder = png::Encoder::new(&mut out, self.size as u32, self.size as u32);
            encoder.set_color(png::ColorType::Rgb);
            encoder.set_depth(png::BitDepth::Eight);
            encoder.set_compression(png::Compression::Fast);
            let mut writer = encoder.write_header()?;
            writer.write_image_data(&self.to_rgb8())?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Catalog;

    #[test]
    fn rendering_is_deterministic_and_images_differ() {
        let catalog = Catalog::generate(5, 20);
        let a: Vec<Vec<u8>> = catalog
            .images
            .iter()
            .map(|m| render(m, 64, 5).to_png().unwrap())
            .collect();
        let b: Vec<Vec<u8>> = catalog
            .images
            .iter()
            .map(|m| render(m, 64, 5).to_png().unwrap())
            .collect();
        assert_eq!(a, b);
        let distinct: std::collections::HashSet<_> = a.iter().collect();
        assert_eq!(distinct.len(), a.len());
        assert_eq!(&a[0][..8], b"\x89PNG\r\n\x1a\n");
    }

    #[test]
    fn blur_and_noise_are_visible_in_pixels() {
        let mut meta = Catalog::generate(6, 1).images.remove(0);
        meta.blur = 0.0;
        meta.noise = 0.0;
        let sharp = render(&meta, 64, 1);
        meta.blur = 3.0;
        let blurred = render(&meta, 64, 1);
        let edges = |c: &Canvas| -> f32 {
            (1..c.size)
                .map(|x| (c.pixels[32 * c.size + x][1] - c.pixels[32 * c.size + x - 1][1]).abs())
                .sum()
        };
        assert!(
            edges(&blurred) < edges(&sharp),
            "blur lowers local contrast"
        );
        meta.blur = 0.0;
        meta.noise = 0.15;
        let noisy = render(&meta, 64, 1);
        assert!(
            edges(&noisy) > edges(&sharp),
            "noise raises pixel differences"
        );
    }
}
