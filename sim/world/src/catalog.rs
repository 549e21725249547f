//! The image catalog: what each image shows and how it looks.

use rand::Rng;
use serde::{Deserialize, Serialize};

macro_rules! named_enum {
    ($(#[$m:meta])* $name:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(rename_all = "lowercase")]
        pub enum $name { $($variant),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The word captions and queries use.
            pub fn word(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }

            fn pick(rng: &mut impl Rng) -> $name {
                Self::ALL[rng.random_range(0..Self::ALL.len())]
            }
        }
    };
}

named_enum!(
    /// What the image shows.
    Subject { Cat => "cat", Dog => "dog", Bird => "bird", Flower => "flower", Car => "car", Boat => "boat", House => "house", Tree => "tree" }
);
named_enum!(
    /// The subject's colour.
    Colour { Red => "red", Orange => "orange", Yellow => "yellow", Green => "green", Blue => "blue", Purple => "purple", White => "white", Black => "black" }
);
named_enum!(
    /// Where it is.
    Scene { Beach => "beach", Forest => "forest", City => "city", Snow => "snow", Desert => "desert", Studio => "studio" }
);
named_enum!(
    /// The photographic style, a high-level aesthetic property.
    Style { Plain => "plain", Minimal => "minimal", Vintage => "vintage", Neon => "neon", Pastel => "pastel", Moody => "moody" }
);

impl Colour {
    /// Hue in degrees, saturation and value of the colour.
    pub fn hsv(self) -> (f64, f64, f64) {
        match self {
            Colour::Red => (0.0, 0.85, 0.85),
            Colour::Orange => (30.0, 0.85, 0.9),
            Colour::Yellow => (55.0, 0.85, 0.95),
            Colour::Green => (120.0, 0.7, 0.7),
            Colour::Blue => (220.0, 0.75, 0.8),
            Colour::Purple => (280.0, 0.6, 0.7),
            Colour::White => (0.0, 0.0, 0.95),
            Colour::Black => (0.0, 0.0, 0.12),
        }
    }
}

/// Everything the world knows about one image. The aesthetic fields are the
/// ground truth the oracle sees; Kalon's models only ever see pixels and
/// captions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageMeta {
    pub id: String,
    pub subject: Subject,
    pub colour: Colour,
    pub scene: Scene,
    pub style: Style,
    /// Saturation multiplier of the whole image, 0 (grey) .. 1 (full).
    pub colourfulness: f64,
    /// Blur radius in pixels, 0 (sharp) .. 3.
    pub blur: f64,
    /// Standard deviation of pixel noise, 0 .. 0.15 (of full scale).
    pub noise: f64,
    /// Exposure offset in stops, -1.5 .. 1.5 (0 is correct).
    pub exposure: f64,
    /// Contrast multiplier, 0.5 .. 1.5 (1 is neutral).
    pub contrast: f64,
    /// Palette harmony, 0 (clashing background) .. 1 (harmonious).
    pub harmony: f64,
    /// Composition, 0 (subject cut at an edge) .. 1 (on a rule-of-thirds point).
    pub composition: f64,
}

impl ImageMeta {
    /// Low-level quality in [0, 1]: what simple image metrics can see.
    pub fn low_level_quality(&self) -> f64 {
        let sharp = 1.0 - self.blur / 3.0;
        let clean = 1.0 - self.noise / 0.15;
        let exposed = 1.0 - (self.exposure.abs() / 1.5);
        let contrast = 1.0 - ((self.contrast - 1.0).abs() / 0.5);
        (0.3 * sharp + 0.25 * clean + 0.25 * exposed + 0.1 * contrast + 0.1 * self.colourfulness)
            .clamp(0.0, 1.0)
    }
}

/// The whole catalog of a world.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Catalog {
    pub seed: u64,
    pub images: Vec<ImageMeta>,
}

/// Beta-like draw in [0, 1] skewed toward `mean` (average of `k` uniforms).
fn around(rng: &mut impl Rng, mean: f64, k: usize) -> f64 {
    let sum: f64 = (0..k).map(|_| rng.random::<f64>()).sum();
    let centred = sum / k as f64 - 0.5;
    (mean + centred).clamp(0.0, 1.0)
}

impl Catalog {
    /// `n` images for `seed`. Aesthetic qualities are drawn independently of
    /// content, so every query has both beautiful and poor matches.
    pub fn generate(seed: u64, n: usize) -> Catalog {
        let mut rng = crate::stream(seed, "catalog");
        let images = (0..n)
            .map(|i| {
                let mut meta = ImageMeta {
                    id: format!("img-{i:07}"),
                    subject: Subject::pick(&mut rng),
                    colour: Colour::pick(&mut rng),
                    scene: Scene::pick(&mut rng),
                    style: Style::pick(&mut rng),
                    colourfulness: around(&mut rng, 0.7, 2),
                    blur: 3.0 * rng.random::<f64>().powi(2),
                    noise: 0.15 * rng.random::<f64>().powi(2),
                    exposure: 1.5 * (2.0 * rng.random::<f64>() - 1.0).powi(3),
                    contrast: 1.0 + 0.5 * (2.0 * rng.random::<f64>() - 1.0),
                    harmony: rng.random(),
                    composition: rng.random(),
                };
                meta.contrast = meta.contrast.clamp(0.5, 1.5);
                meta
            })
            .collect();
        Catalog { seed, images }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_catalog_and_different_seeds_differ() {
        assert_eq!(Catalog::generate(3, 500), Catalog::generate(3, 500));
        assert_ne!(
            Catalog::generate(3, 500).images,
            Catalog::generate(4, 500).images
        );
    }

    #[test]
    fn every_subject_and_style_appears_and_qualities_stay_in_range() {
        let catalog = Catalog::generate(1, 2_000);
        for subject in Subject::ALL {
            assert!(catalog.images.iter().any(|m| m.subject == *subject));
        }
        for style in Style::ALL {
            assert!(catalog.images.iter().any(|m| m.style == *style));
        }
        for m in &catalog.images {
            assert!((0.0..=3.0).contains(&m.blur));
            assert!((0.0..=0.15).contains(&m.noise));
            assert!((-1.5..=1.5).contains(&m.exposure));
            assert!((0.5..=1.5).contains(&m.contrast));
            assert!((0.0..=1.0).contains(&m.low_level_quality()));
        }
    }
}
