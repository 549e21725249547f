//! Kalon's simulated world, deterministic given a seed.
//!
//! No pretrained CLIP weights and no LLM can be fetched on the machines Kalon
//! is built on, so the product ships a world (in the spirit of RecSim) that
//! exercises the real code paths:
//! - [`catalog`]: procedural images (real PNG files) with content (subject,
//!   colour, scene) and aesthetics, low-level (colourfulness, blur, noise,
//!   exposure, contrast) and high-level (palette harmony, composition,
//!   style) that low-level metrics cannot see;
//! - [`text`]: web-like captions that describe content and only noisily
//!   mention aesthetics, and query sets for training and held-out evaluation;
//! - [`oracle`]: the hidden human-aesthetic preference, query-dependent, with
//!   annotator noise, which labels HPIR-style items, and simulated users
//!   (position-biased clicks, occasional ratings).
//!
//! Everything is a pure function of the seed: the same seed gives
//! byte-identical images, captions, queries and labels.

pub mod catalog;
pub mod export;
pub mod oracle;
pub mod render;
pub mod text;

pub use catalog::{Catalog, Colour, ImageMeta, Scene, Style, Subject};
pub use export::{export, Exported, WorldSpec};
pub use oracle::{oracle_pairs, HpirItem, Oracle, OraclePair};
pub use text::{Query, QuerySet};

use rand::rngs::StdRng;
use rand::SeedableRng;

/// A sub-stream of randomness for one purpose, independent of the others so
/// that adding draws to one part of the world never shifts another.
pub fn stream(seed: u64, purpose: &str) -> StdRng {
    // FNV-1a over the purpose, mixed with the seed (SplitMix64 finaliser)
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in purpose.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    let mut z = seed ^ h;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    StdRng::seed_from_u64(z ^ (z >> 31))
}

/// A standard normal draw (Box-Muller).
pub fn normal(rng: &mut impl rand::Rng) -> f64 {
    let u1: f64 = rng.random_range(f64::EPSILON..1.0);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

pub use oracle::{Label, Users};
