//! The hidden human oracle and simulated users.
//!
//! Kalon's models never see these scores; they are what the simulated people
//! feel, and what HPIR-style labels, clicks and ratings are drawn from.

use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::catalog::{Catalog, ImageMeta, Style};
use crate::text::{Query, Split};

/// People's aesthetic taste, query-dependent.
#[derive(Debug, Clone)]
pub struct Oracle {
    /// How sharply annotators tell two rows apart (larger: noisier labels).
    pub temperature: f64,
}

impl Default for Oracle {
    fn default() -> Self {
        Oracle { temperature: 0.05 }
    }
}

/// Taste for each style when the query asks for none.
fn default_taste(style: Style) -> f64 {
    match style {
        Style::Plain => 0.45,
        Style::Minimal => 0.7,
        Style::Vintage => 0.6,
        Style::Neon => 0.35,
        Style::Pastel => 0.6,
        Style::Moody => 0.5,
    }
}

impl Oracle {
    /// How beautiful people find `image` as an answer to `query`, in [0, 1]:
    /// low-level quality, palette harmony and composition, and the style,
    /// which counts most when the query carries a style intent.
    pub fn aesthetic(&self, query: &Query, image: &ImageMeta) -> f64 {
        let style = match query.style_intent {
            Some(intent) => f64::from(image.style == intent),
            None => default_taste(image.style),
        };
        let style_weight = if query.style_intent.is_some() {
            0.35
        } else {
            0.15
        };
        let rest = 1.0 - style_weight;
        rest * (0.45 * image.low_level_quality() + 0.3 * image.harmony + 0.25 * image.composition)
            + style_weight * style
    }

    /// An annotator panel's choice between two rows: each of `annotators`
    /// (odd) prefers A with probability sigmoid((a - b) / temperature); the
    /// label is the majority and the confidence the majority's share.
    pub fn judge(&self, a: f64, b: f64, annotators: usize, rng: &mut impl Rng) -> Label {
        let p = 1.0 / (1.0 + (-(a - b) / self.temperature).exp());
        let votes_a = (0..annotators).filter(|_| rng.random_bool(p)).count();
        let a_wins = votes_a * 2 > annotators;
        let majority = if a_wins {
            votes_a
        } else {
            annotators - votes_a
        };
        Label {
            choice: if a_wins { Choice::A } else { Choice::B },
            confidence: majority as f64 / annotators as f64,
        }
    }
}

pub use kalon_dataset::{Choice, HpirItem, Label};

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    sum / n.max(1) as f64
}

/// `per_query` labelled items for each evaluation query. Rows are drawn
/// mostly from relevant images (as two retrieval systems would return), with
/// some irrelevant ones so accuracy can differ too.
pub fn hpir_items(
    catalog: &Catalog,
    queries: &[Query],
    oracle: &Oracle,
    per_query: usize,
) -> Vec<HpirItem> {
    let mut rng = crate::stream(catalog.seed, "hpir");
    let mut items = Vec::new();
    for query in queries.iter().filter(|q| q.split == Split::Eval) {
        let relevant: Vec<&ImageMeta> = catalog
            .images
            .iter()
            .filter(|m| query.relevance(m) > 0.0)
            .collect();
        if relevant.len() < 10 {
            continue;
        }
        for _ in 0..per_query {
            let row = |rng: &mut rand::rngs::StdRng| -> Vec<&ImageMeta> {
                (0..5)
                    .map(|_| {
                        if rng.random_bool(0.85) {
                            relevant[rng.random_range(0..relevant.len())]
                        } else {
                            &catalog.images[rng.random_range(0..catalog.images.len())]
                        }
                    })
                    .collect()
            };
            let (a, b) = (row(&mut rng), row(&mut rng));
            let relevance = |r: &[&ImageMeta]| mean(r.iter().map(|m| query.relevance(m)));
            let beauty = |r: &[&ImageMeta]| mean(r.iter().map(|m| oracle.aesthetic(query, m)));
            let panel = 2 * rng.random_range(1..=4) + 1;
            items.push(HpirItem {
                query: query.text.clone(),
                row_a: a.iter().map(|m| m.id.clone()).collect(),
                row_b: b.iter().map(|m| m.id.clone()).collect(),
                accuracy: oracle.judge(relevance(&a), relevance(&b), panel, &mut rng),
                aesthetic: oracle.judge(beauty(&a), beauty(&b), panel, &mut rng),
            });
        }
    }
    items
}

/// Simulated people looking at a result list.
#[derive(Debug, Clone)]
pub struct Users {
    /// Probability of examining rank r is `1 / r^position_bias`.
    pub position_bias: f64,
    /// Probability that a click is followed by a star rating.
    pub rating_rate: f64,
}

impl Default for Users {
    fn default() -> Self {
        Users {
            position_bias: 0.8,
            rating_rate: 0.05,
        }
    }
}

/// What one person did with a result list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Session {
    /// 1-based ranks clicked.
    pub clicks: Vec<u32>,
    /// (rank, stars 1-5) for the clicks that were rated.
    pub ratings: Vec<(u32, u8)>,
}

impl Users {
    /// Position-biased clicks: a result is examined with a probability
    /// falling with its rank, and clicked if examined with a probability
    /// rising with relevance and the oracle's aesthetic.
    pub fn browse(
        &self,
        query: &Query,
        results: &[&ImageMeta],
        oracle: &Oracle,
        rng: &mut impl Rng,
    ) -> Session {
        let mut session = Session {
            clicks: Vec::new(),
            ratings: Vec::new(),
        };
        for (i, image) in results.iter().enumerate() {
            let rank = i as u32 + 1;
            let examine = 1.0 / f64::from(rank).powf(self.position_bias);
            let beauty = oracle.aesthetic(query, image);
            let attract = query.relevance(image) * (0.2 + 0.8 * beauty);
            if rng.random_bool(examine) && rng.random_bool(attract.clamp(0.0, 1.0)) {
                session.clicks.push(rank);
                if rng.random_bool(self.rating_rate) {
                    let stars = (1.0 + 4.0 * beauty + 0.5 * crate::normal(rng))
                        .round()
                        .clamp(1.0, 5.0);
                    session.ratings.push((rank, stars as u8));
                }
            }
        }
        session
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::QuerySet;

    #[test]
    fn labels_are_deterministic_and_confidences_in_range() {
        let catalog = Catalog::generate(8, 3_000);
        let queries = QuerySet::generate(8, 150).queries;
        let oracle = Oracle::default();
        let items = hpir_items(&catalog, &queries, &oracle, 1);
        assert_eq!(items, hpir_items(&catalog, &queries, &oracle, 1));
        assert!(items.len() >= 140, "{} items", items.len());
        for item in &items {
            for label in [item.accuracy, item.aesthetic] {
                assert!(label.confidence > 0.5 && label.confidence <= 1.0);
            }
        }
    }

    #[test]
    fn annotator_noise_has_the_intended_statistics() {
        let oracle = Oracle::default();
        let mut rng = crate::stream(1, "test");
        // equal rows: a coin flip, with low confidence on average
        let ties: Vec<Label> = (0..4_000)
            .map(|_| oracle.judge(0.5, 0.5, 7, &mut rng))
            .collect();
        let a_share = ties.iter().filter(|l| l.choice == Choice::A).count() as f64 / 4_000.0;
        assert!((0.46..0.54).contains(&a_share), "{a_share}");
        let tie_confidence = mean(ties.iter().map(|l| l.confidence));
        // a clear difference: the majority is right and confident
        let clear: Vec<Label> = (0..4_000)
            .map(|_| oracle.judge(0.7, 0.5, 7, &mut rng))
            .collect();
        let right = clear.iter().filter(|l| l.choice == Choice::A).count() as f64 / 4_000.0;
        let clear_confidence = mean(clear.iter().map(|l| l.confidence));
        assert!(right > 0.99, "{right}");
        assert!(
            clear_confidence > tie_confidence + 0.2,
            "{clear_confidence} vs {tie_confidence}"
        );
        // a small difference: right more often than not, but not always
        let small = (0..4_000)
            .filter(|_| oracle.judge(0.52, 0.5, 7, &mut rng).choice == Choice::A)
            .count() as f64
            / 4_000.0;
        assert!((0.55..0.9).contains(&small), "{small}");
    }

    #[test]
    fn style_intent_moves_the_oracle_and_clicks_fall_with_rank() {
        let catalog = Catalog::generate(9, 2_000);
        let queries = QuerySet::generate(9, 150).queries;
        let oracle = Oracle::default();
        let query = queries
            .iter()
            .find(|q| {
                q.style_intent == Some(Style::Neon) && q.colour.is_none() && q.scene.is_none()
            })
            .unwrap();
        let mut neon = catalog
            .images
            .iter()
            .find(|m| m.subject == query.subject)
            .unwrap()
            .clone();
        neon.style = Style::Neon;
        let mut plain = neon.clone();
        plain.style = Style::Plain;
        assert!(oracle.aesthetic(query, &neon) > oracle.aesthetic(query, &plain) + 0.3);

        let users = Users::default();
        let relevant: Vec<&ImageMeta> = catalog
            .images
            .iter()
            .filter(|m| m.subject == query.subject)
            .take(10)
            .collect();
        let mut rng = crate::stream(9, "sessions");
        let mut per_rank = [0u32; 10];
        for _ in 0..5_000 {
            for rank in users.browse(query, &relevant, &oracle, &mut rng).clicks {
                per_rank[rank as usize - 1] += 1;
            }
        }
        assert!(
            per_rank[0] > per_rank[4] && per_rank[4] > per_rank[9],
            "{per_rank:?}"
        );
    }
}

/// A preference the world's people hold: for `query`, `better` is more
/// beautiful than `worse` (by at least the gap asked for).
#[derive(Debug, Clone, PartialEq)]
pub struct OraclePair {
    pub query: String,
    pub better: String,
    pub worse: String,
}

/// `n` preferences over random images of the world of `world_seed` and
/// `images`, for its training queries (evaluation queries stay held out):
/// what perfectly informed feedback would say. Tests and benchmarks of the
/// trainer fill the pairs table with these (inverted, a deliberately bad
/// signal). The same seeds give the same pairs.
pub fn oracle_pairs(
    world_seed: u64,
    images: usize,
    n: usize,
    min_gap: f64,
    seed: u64,
) -> Vec<OraclePair> {
    let catalog = Catalog::generate(world_seed, images);
    let queries: Vec<Query> = crate::text::QuerySet::generate(world_seed, 160)
        .queries
        .into_iter()
        .filter(|q| q.split == Split::Train)
        .collect();
    let oracle = Oracle::default();
    let mut rng = crate::stream(seed, "oracle-pairs");
    let mut pairs = Vec::with_capacity(n);
    if catalog.images.len() < 2 || queries.is_empty() {
        return pairs;
    }
    while pairs.len() < n {
        let query = &queries[rng.random_range(0..queries.len())];
        let a = &catalog.images[rng.random_range(0..catalog.images.len())];
        let b = &catalog.images[rng.random_range(0..catalog.images.len())];
        let (beauty_a, beauty_b) = (oracle.aesthetic(query, a), oracle.aesthetic(query, b));
        if a.id == b.id || (beauty_a - beauty_b).abs() < min_gap {
            continue;
        }
        let (better, worse) = if beauty_a > beauty_b { (a, b) } else { (b, a) };
        pairs.push(OraclePair {
            query: query.text.clone(),
            better: better.id.clone(),
            worse: worse.id.clone(),
        });
    }
    pairs
}
