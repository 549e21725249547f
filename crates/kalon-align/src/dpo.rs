//! D_po construction: rephrase a query, retrieve the top K training images,
//! order them by relevance and the aesthetic teacher, and turn the matrix
//! into preference pairs (docs/ALGORITHM.md); and the other sources' pairs
//! (clicks, ratings, judgments) added to the same training set.

use std::collections::HashMap;

use kalon_encoder::image::RgbImage;
use kalon_encoder::{Embeddings, Encoder};

use crate::algorithm::{dpo_matrix, dpo_pairs, DpoSpec};
use crate::rephrase::{PromptVariant, Rephraser};
use crate::scorer::{normalise, AestheticScorer, Candidate};

use crate::dataset::Embedded;

pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Indices of the `k` rows of `images[..limit]` most similar to `text`.
fn top_k(text: &[f32], images: &Embeddings, limit: usize, k: usize) -> Vec<usize> {
    let mut scored: Vec<(f32, usize)> = (0..limit).map(|i| (dot(text, images.row(i)), i)).collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0));
    scored.into_iter().take(k).map(|(_, i)| i).collect()
}

/// One D_po pair as indices: query row, winner image, loser image.
#[derive(Debug, Clone, Copy)]
pub struct IndexedPair {
    pub query: usize,
    pub winner: usize,
    pub loser: usize,
    pub weight: f32,
}

/// D_po for `queries`: rephrase, retrieve top K for the rephrasing among the
/// training images, order by relevance to the original query, take every
/// `stride`-th into a `u x v` matrix with rows sorted by `scorer`, pairs by
/// the product order. Returns the pairs and the original queries' embeddings.
pub fn build_dpo(
    data: &Embedded,
    encoder: &Encoder,
    queries: &[String],
    rephraser: &dyn Rephraser,
    variant: PromptVariant,
    scorer: &dyn AestheticScorer,
    spec: &DpoSpec,
) -> anyhow::Result<(Vec<IndexedPair>, Embeddings)> {
    spec.validate()?;
    let rephrased = queries
        .iter()
        .map(|q| rephraser.rephrase(q, variant))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let original = encoder.text.embed_texts(queries)?;
    let enriched = encoder.text.embed_texts(&rephrased)?;
    let mut pairs = Vec::new();
    for (q, query) in queries.iter().enumerate() {
        let rows = dpo_for_query(data, query, original.row(q), enriched.row(q), scorer, spec)?;
        pairs.extend(rows.into_iter().map(|(winner, loser)| IndexedPair {
            query: q,
            winner,
            loser,
            weight: 1.0,
        }));
    }
    Ok((pairs, original))
}

/// D_po for one query whose rephrasing is embedded already: retrieve the
/// top K training images for the rephrasing, order them by relevance to
/// the ORIGINAL query, take every `stride`-th into a `u x v` matrix whose
/// rows `scorer` orders by beauty, and return the product order's pairs as
/// (winner, loser) image rows of `data`. [`build_dpo`] runs it for the
/// offline construction; the preference builder for live queries.
pub fn dpo_for_query(
    data: &Embedded,
    query: &str,
    original: &[f32],
    rephrased: &[f32],
    scorer: &dyn AestheticScorer,
    spec: &DpoSpec,
) -> anyhow::Result<Vec<(usize, usize)>> {
    spec.validate()?;
    let candidates = top_k(rephrased, &data.images, data.train, spec.k);
    // order of semantic relevance to the ORIGINAL query
    let mut ranked = candidates.clone();
    ranked.sort_by(|a, b| {
        dot(original, data.images.row(*b)).total_cmp(&dot(original, data.images.row(*a)))
    });
    // the scorer sees only the u x v candidates D_po takes, one
    // semantic band (row) per call: rows are sorted within themselves
    let taken: Vec<usize> = (0..ranked.len())
        .take(spec.k)
        .step_by(spec.stride)
        .take(spec.u * spec.v)
        .collect();
    anyhow::ensure!(
        taken.len() == spec.u * spec.v,
        "only {} candidates for a {}x{} D_po matrix (k {}, stride {}): the catalog is too small",
        taken.len(),
        spec.u,
        spec.v,
        spec.k,
        spec.stride
    );
    let mut scores = vec![0.0; ranked.len()];
    for band in taken.chunks(spec.v) {
        let images: Vec<RgbImage> = band.iter().map(|&c| data.image(ranked[c])).collect();
        let candidates: Vec<Candidate> = band
            .iter()
            .zip(&images)
            .map(|(&c, image)| Candidate {
                id: &data.pairs.ids[ranked[c]],
                image,
            })
            .collect();
        let mut band_scores = scorer.score(query, &candidates)?;
        anyhow::ensure!(
            band_scores.len() == band.len() && band_scores.iter().all(|s| s.is_finite()),
            "scorer {} gave {} scores for {} images, or a non-finite one",
            scorer.name(),
            band_scores.len(),
            band.len()
        );
        normalise(&mut band_scores);
        for (&c, s) in band.iter().zip(band_scores) {
            scores[c] = s;
        }
    }
    let local: Vec<usize> = (0..ranked.len()).collect();
    let matrix = dpo_matrix(&local, &scores, spec);
    Ok(dpo_pairs(&matrix)
        .into_iter()
        .map(|(w, l)| (ranked[w], ranked[l]))
        .collect())
}

/// Adds preference pairs of any source (clicks, ratings, LMM judgments;
/// see [`crate::feedback`]) to a training set's `pairs` and `queries`: each
/// pair is validated, its query embedded by `encoder`, its images looked up
/// among the training images. Returns how many pairs were skipped because
/// an image is not a training image of this world.
pub fn add_pairs(
    data: &Embedded,
    encoder: &Encoder,
    extra: &[crate::PreferencePair],
    pairs: &mut Vec<IndexedPair>,
    queries: &mut Embeddings,
) -> anyhow::Result<usize> {
    let mut texts: Vec<&str> = Vec::new();
    let mut query_row: HashMap<&str, usize> = HashMap::new();
    let mut skipped = 0;
    let mut indexed = Vec::new();
    for (i, pair) in extra.iter().enumerate() {
        pair.validate()
            .map_err(|e| anyhow::anyhow!("preference pair {}: {e}", i + 1))?;
        let image = |id: &str| data.index.get(id).copied().filter(|&r| r < data.train);
        let (Some(winner), Some(loser)) = (image(&pair.winner), image(&pair.loser)) else {
            skipped += 1;
            continue;
        };
        let next = queries.len() + texts.len();
        let query = *query_row.entry(pair.query.as_str()).or_insert_with(|| {
            texts.push(pair.query.as_str());
            next
        });
        indexed.push(IndexedPair {
            query,
            winner,
            loser,
            weight: pair.weight as f32,
        });
    }
    if !texts.is_empty() {
        let embedded = encoder.text.embed_texts(&texts)?;
        anyhow::ensure!(
            embedded.dim == queries.dim || queries.is_empty(),
            "query embeddings of dimension {} and {} cannot be mixed",
            embedded.dim,
            queries.dim
        );
        queries.dim = embedded.dim;
        queries.data.extend(embedded.data);
    }
    pairs.extend(indexed);
    Ok(skipped)
}
