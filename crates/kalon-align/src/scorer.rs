//! Aesthetic scorers behind one trait.
//!
//! [`LowLevelScorer`] measures what simple image statistics can see:
//! Hasler-Suesstrunk colourfulness, sharpness as the variance of the
//! Laplacian, exposure (distance of mean luminance from mid-grey) and
//! contrast (standard deviation of luminance). It cannot see harmony,
//! composition or style; that gap is what the paper's LMM judgments and
//! people's clicks fill. Scores are compared within one query's candidates,
//! so [`normalise`] turns them into z-scores per query.

use kalon_encoder::image::RgbImage;

/// One image to score: its catalog id and its pixels.
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'a> {
    pub id: &'a str,
    pub image: &'a RgbImage,
}

/// Scores a query's candidate images; higher is more beautiful.
pub trait AestheticScorer: Send + Sync {
    fn name(&self) -> &str;
    /// Raw scores, one per candidate, comparable within one call only
    /// (a judge that ranks gives relative scores).
    fn score(&self, query: &str, candidates: &[Candidate<'_>]) -> anyhow::Result<Vec<f64>>;
}

/// Z-scores in place (all zero when the scores do not vary).
pub fn normalise(scores: &mut [f64]) {
    let n = scores.len() as f64;
    if scores.is_empty() {
        return;
    }
    let mean = scores.iter().sum::<f64>() / n;
    let sd = (scores.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / n).sqrt();
    for s in scores.iter_mut() {
        *s = if sd > 1e-12 { (*s - mean) / sd } else { 0.0 };
    }
}

/// Low-level measures of one image.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LowLevel {
    /// Hasler-Suesstrunk `sigma_rgyb + 0.3 mu_rgyb` on 0..255 values.
    pub colourfulness: f64,
    /// Variance of the 4-neighbour Laplacian of luminance (0..1 scale).
    pub sharpness: f64,
    /// 1 at mean luminance 0.5, 0 at black or white.
    pub exposure: f64,
    /// Standard deviation of luminance (0..1 scale).
    pub contrast: f64,
    /// Immerkaer's fast estimate of the noise standard deviation (0..1 scale).
    pub noise: f64,
}

fn mean_sd(values: impl Iterator<Item = f64> + Clone) -> (f64, f64) {
    let (n, sum) = values
        .clone()
        .fold((0.0, 0.0), |(n, s), v| (n + 1.0, s + v));
    let mean = sum / n;
    let var = values.map(|v| (v - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

/// Measures one image.
pub fn low_level(image: &RgbImage) -> LowLevel {
    let px = || image.pixels().map(|p| p.0.map(f64::from));
    let (mu_rg, sd_rg) = mean_sd(px().map(|[r, g, _]| r - g));
    let (mu_yb, sd_yb) = mean_sd(px().map(|[r, g, b]| 0.5 * (r + g) - b));
    let colourfulness =
        (sd_rg.powi(2) + sd_yb.powi(2)).sqrt() + 0.3 * (mu_rg.powi(2) + mu_yb.powi(2)).sqrt();
    let (w, h) = image.dimensions();
    let luma: Vec<f64> = px()
        .map(|[r, g, b]| (0.299 * r + 0.587 * g + 0.114 * b) / 255.0)
        .collect();
    let at = |x: u32, y: u32| luma[(y * w + x) as usize];
    // sharpness on the 2x2-averaged image: edges survive, pixel noise
    // averages out (noise is measured on its own below)
    let (hw, hh) = (w / 2, h / 2);
    let half: Vec<f64> = (0..hh)
        .flat_map(|y| (0..hw).map(move |x| (x, y)))
        .map(|(x, y)| {
            (at(2 * x, 2 * y)
                + at(2 * x + 1, 2 * y)
                + at(2 * x, 2 * y + 1)
                + at(2 * x + 1, 2 * y + 1))
                / 4.0
        })
        .collect();
    let hat = |x: u32, y: u32| half[(y * hw + x) as usize];
    let mut laplacian = Vec::new();
    for y in 1..hh.saturating_sub(1) {
        for x in 1..hw.saturating_sub(1) {
            laplacian.push(
                hat(x - 1, y) + hat(x + 1, y) + hat(x, y - 1) + hat(x, y + 1) - 4.0 * hat(x, y),
            );
        }
    }
    // Immerkaer (1996): sigma = sqrt(pi / 2) / (6 (W-2)(H-2)) * sum |I * M|,
    // M = [1 -2 1; -2 4 -2; 1 -2 1]
    let mut abs_sum = 0.0;
    for y in 1..h.saturating_sub(1) {
        for x in 1..w.saturating_sub(1) {
            let m = at(x - 1, y - 1) + at(x + 1, y - 1) + at(x - 1, y + 1) + at(x + 1, y + 1)
                - 2.0 * (at(x, y - 1) + at(x - 1, y) + at(x + 1, y) + at(x, y + 1))
                + 4.0 * at(x, y);
            abs_sum += m.abs();
        }
    }
    let inner = (f64::from(w.saturating_sub(2)) * f64::from(h.saturating_sub(2))).max(1.0);
    let (_, sd_lap) = mean_sd(laplacian.iter().copied());
    let (mean_luma, sd_luma) = mean_sd(luma.iter().copied());
    LowLevel {
        colourfulness,
        sharpness: if laplacian.is_empty() {
            0.0
        } else {
            sd_lap.powi(2)
        },
        exposure: 1.0 - 2.0 * (mean_luma - 0.5).abs(),
        contrast: sd_luma,
        noise: (std::f64::consts::PI / 2.0).sqrt() * abs_sum / (6.0 * inner),
    }
}

/// A weighted sum of the low-level measures (each brought to a comparable
/// range first).
#[derive(Debug, Clone)]
pub struct LowLevelScorer {
    pub weights: LowLevel,
}

impl Default for LowLevelScorer {
    fn default() -> Self {
        LowLevelScorer {
            weights: LowLevel {
                colourfulness: 1.0,
                sharpness: 1.0,
                exposure: 1.0,
                contrast: 1.0,
                noise: 1.0,
            },
        }
    }
}

impl AestheticScorer for LowLevelScorer {
    fn name(&self) -> &str {
        "low-level"
    }

    fn score(&self, _query: &str, candidates: &[Candidate<'_>]) -> anyhow::Result<Vec<f64>> {
        let w = &self.weights;
        Ok(candidates
            .iter()
            .map(|candidate| {
                let m = low_level(candidate.image);
                // colourfulness ~0..150, sharpness ~0..0.1 (log), exposure 0..1, contrast 0..0.5
                w.colourfulness * m.colourfulness / 100.0
                    + w.sharpness * (1.0 + 1e3 * m.sharpness).ln() / 5.0
                    + w.exposure * m.exposure
                    + w.contrast * m.contrast * 4.0
                    - w.noise * m.noise * 20.0
            })
            .collect())
    }
}

/// A user's aesthetic model: the encoder's image tower, then an ONNX score
/// head on its embeddings (see `kalon_encoder::ScoreHead`).
pub struct ModelScorer {
    encoder: kalon_encoder::Encoder,
    head: kalon_encoder::ScoreHead,
}

impl ModelScorer {
    /// The image tower of the encoder in `model_dir` and the head in `head`.
    pub fn load(
        model_dir: &std::path::Path,
        head: &std::path::Path,
        options: &kalon_encoder::EncoderOptions,
    ) -> anyhow::Result<Self> {
        let encoder = kalon_encoder::Encoder::load(model_dir, options)?;
        let head = kalon_encoder::ScoreHead::load(head, encoder.image.dim(), options)?;
        Ok(ModelScorer { encoder, head })
    }
}

impl AestheticScorer for ModelScorer {
    fn name(&self) -> &str {
        "aesthetic-model"
    }

    fn score(&self, _query: &str, candidates: &[Candidate<'_>]) -> anyhow::Result<Vec<f64>> {
        let images: Vec<RgbImage> = candidates.iter().map(|c| c.image.clone()).collect();
        let embeddings = self.encoder.image.embed_images(&images)?;
        Ok(self
            .head
            .score(&embeddings)?
            .into_iter()
            .map(f64::from)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kalon_encoder::image::Rgb;

    fn checker(size: u32, a: [u8; 3], b: [u8; 3]) -> RgbImage {
        RgbImage::from_fn(size, size, |x, y| {
            if (x / 2 + y / 2) % 2 == 0 {
                Rgb(a)
            } else {
                Rgb(b)
            }
        })
    }

    #[test]
    fn measures_follow_their_definitions() {
        // grey: no colour, no edges, mid exposure, no contrast
        let grey = RgbImage::from_pixel(16, 16, Rgb([128, 128, 128]));
        let m = low_level(&grey);
        assert_eq!(m.colourfulness, 0.0);
        assert!(m.sharpness < 1e-20, "{m:?}");
        assert!(m.exposure > 0.99 && m.contrast < 1e-12, "{m:?}");
        // pure red: rg = 255, yb = 127.5, no spread -> 0.3 * sqrt(255^2 + 127.5^2)
        let red = low_level(&RgbImage::from_pixel(8, 8, Rgb([255, 0, 0])));
        assert!(
            (red.colourfulness - 0.3 * (255f64.powi(2) + 127.5f64.powi(2)).sqrt()).abs() < 1e-9
        );
        // black is badly exposed
        assert_eq!(low_level(&RgbImage::new(8, 8)).exposure, 0.0);
        // a fine checkerboard is sharp and contrasty; its blurred copy less so
        let sharp = checker(32, [230, 230, 230], [25, 25, 25]);
        let blurred = kalon_encoder::image::imageops::blur(&sharp, 1.5);
        let (s, b) = (low_level(&sharp), low_level(&blurred));
        assert!(s.sharpness > 10.0 * b.sharpness, "{s:?} vs {b:?}");
        assert!(s.contrast > b.contrast);
        // Immerkaer's estimate recovers the noise of a flat grey image
        // (uniform noise of +-0.15 has standard deviation 0.15 / sqrt(3))
        let mut state = 12345u64;
        let noisy = RgbImage::from_fn(64, 64, |_, _| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let u = (state >> 33) as f64 / (1u64 << 31) as f64; // 0..1
            let v = (128.0 + 255.0 * 0.15 * (2.0 * u - 1.0)).round() as u8;
            Rgb([v, v, v])
        });
        let n = low_level(&noisy).noise;
        let want = 0.15 / 3f64.sqrt();
        assert!((n - want).abs() < 0.15 * want, "noise {n} vs {want}");
        assert!(low_level(&grey).noise < 1e-9);
    }

    #[test]
    fn the_scorer_prefers_colourful_sharp_well_exposed_images_and_normalises() {
        let scorer = LowLevelScorer::default();
        let good = checker(32, [220, 60, 40], [40, 90, 200]);
        let dull =
            kalon_encoder::image::imageops::blur(&checker(32, [90, 90, 90], [60, 60, 60]), 2.0);
        let dark = RgbImage::from_pixel(32, 32, Rgb([10, 5, 5]));
        let candidates: Vec<Candidate> = [&good, &dull, &dark]
            .into_iter()
            .map(|image| Candidate { id: "x", image })
            .collect();
        let mut scores = scorer.score("any", &candidates).unwrap();
        assert!(scores[0] > scores[1] && scores[0] > scores[2], "{scores:?}");
        normalise(&mut scores);
        let mean: f64 = scores.iter().sum::<f64>() / 3.0;
        let var: f64 = scores.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / 3.0;
        assert!(mean.abs() < 1e-12 && (var - 1.0).abs() < 1e-9);
        let mut flat = vec![2.0, 2.0];
        normalise(&mut flat);
        assert_eq!(flat, vec![0.0, 0.0]);
    }
}
