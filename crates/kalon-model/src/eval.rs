//! Retrieval metrics.

use kalon_encoder::Embeddings;
use serde::Serialize;

/// Recall@k of text-to-image retrieval where text `i` belongs to image `i`:
/// the share of texts whose image ranks among the `k` most similar images.
pub fn recall_at(texts: &Embeddings, images: &Embeddings, ks: &[usize]) -> Vec<f64> {
    assert_eq!(texts.len(), images.len(), "one image per text");
    assert_eq!(texts.dim, images.dim);
    let n = texts.len();
    let mut hits = vec![0usize; ks.len()];
    for (i, text) in texts.rows().enumerate() {
        let score = |image: &[f32]| -> f32 { text.iter().zip(image).map(|(a, b)| a * b).sum() };
        let own = score(images.row(i));
        // rank = images scoring strictly higher than the right one
        let rank = images.rows().filter(|image| score(image) > own).count();
        for (hit, &k) in hits.iter_mut().zip(ks) {
            if rank < k {
                *hit += 1;
            }
        }
    }
    hits.iter().map(|&h| h as f64 / n.max(1) as f64).collect()
}

/// Held-out retrieval figures, as `kalonctl eval retrieval` prints them.
#[derive(Debug, Clone, Serialize)]
pub struct RetrievalReport {
    pub seed: u64,
    pub pairs: usize,
    pub recall_at_1: f64,
    pub recall_at_5: f64,
    pub recall_at_10: f64,
    /// Recall@k of a random ranking: k / pairs.
    pub chance_at_1: f64,
    pub chance_at_5: f64,
    pub chance_at_10: f64,
}

impl RetrievalReport {
    pub fn new(seed: u64, texts: &Embeddings, images: &Embeddings) -> Self {
        let r = recall_at(texts, images, &[1, 5, 10]);
        let n = texts.len() as f64;
        RetrievalReport {
            seed,
            pairs: texts.len(),
            recall_at_1: r[0],
            recall_at_5: r[1],
            recall_at_10: r[2],
            chance_at_1: (1.0 / n).min(1.0),
            chance_at_5: (5.0 / n).min(1.0),
            chance_at_10: (10.0 / n).min(1.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recall_counts_ranks() {
        // image rows: e0, e1, e2; text 0 is exactly image 0, text 1 is
        // closest to image 2 then image 1, text 2 closest to image 0, 2nd 2
        let images = Embeddings {
            dim: 3,
            data: vec![1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0],
        };
        let texts = Embeddings {
            dim: 3,
            data: vec![1.0, 0.0, 0.0, 0.0, 0.6, 0.8, 0.8, 0.0, 0.6],
        };
        assert_eq!(
            recall_at(&texts, &images, &[1, 2, 3]),
            vec![1.0 / 3.0, 1.0, 1.0]
        );
    }
}
