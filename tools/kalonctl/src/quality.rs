//! Model versions of known quality for the canary's tests and benchmark
//! (`kalon-bench canary`):
//! image embeddings that put what the simulated people find attractive
//! (relevance and the oracle's beauty, as `sim/users` clicks) near the
//! queries that want it, and embeddings that know nothing.

use kalon_encoder::{EncoderOptions, Manifest, TextEncoder};
use kalon_registry::store;
use kalon_world::text::QuerySet;
use kalon_world::{Catalog, Oracle};
use rand::{Rng, SeedableRng};
use sqlx::PgPool;

/// How a version's image embeddings are made.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Quality {
    /// The base's embeddings pulled towards the sum of the world's query
    /// embeddings weighted by how attractive the image is to each:
    /// `normalise((1 - mix) * base + mix * oracle)`.
    Oracle { mix: f32 },
    /// Random unit vectors: a ranking that knows nothing.
    Random { seed: u64 },
}

/// Copies `base`'s registration (same encoder directory) as `version` and
/// stores image embeddings of `quality`. `world_seed` and the catalog size
/// are the world's the search serves.
pub async fn version_of_quality(
    pool: &PgPool,
    encoder_dir: &std::path::Path,
    base: &str,
    version: &str,
    world_seed: u64,
    quality: Quality,
) {
    let dim = 64;
    let stored = store::load_embeddings(pool, base, dim).await.unwrap();
    let ids = stored.ids.clone();
    let mut data = stored.data.clone();
    match quality {
        Quality::Oracle { mix } => {
            let manifest = Manifest::load(encoder_dir).unwrap();
            let text =
                TextEncoder::load(encoder_dir, &manifest, &EncoderOptions::default()).unwrap();
            let queries = QuerySet::generate(world_seed, 160);
            let texts: Vec<&str> = queries.queries.iter().map(|q| q.text.as_str()).collect();
            let embedded = text.embed_texts(&texts).unwrap();
            let catalog = Catalog::generate(world_seed, ids.len());
            let oracle = Oracle::default();
            let by_id: std::collections::HashMap<&str, _> =
                catalog.images.iter().map(|m| (m.id.as_str(), m)).collect();
            for (row, id) in data.chunks_exact_mut(dim).zip(&ids) {
                let meta = by_id[id.as_str()];
                let mut pull = vec![0f32; dim];
                for (q, t) in queries.queries.iter().zip(embedded.rows()) {
                    let w = (q.relevance(meta) * (0.2 + 0.8 * oracle.aesthetic(q, meta))) as f32;
                    for (p, x) in pull.iter_mut().zip(t) {
                        *p += w * x;
                    }
                }
                normalise(&mut pull);
                for (x, p) in row.iter_mut().zip(&pull) {
                    *x = (1.0 - mix) * *x + mix * p;
                }
                normalise(row);
            }
        }
        Quality::Random { seed } => {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            for row in data.chunks_exact_mut(dim) {
                for x in row.iter_mut() {
                    *x = rng.random_range(-1.0..1.0);
                }
                normalise(row);
            }
        }
    }
    store::register_version(pool, version, &encoder_dir.display().to_string(), None, dim)
        .await
        .unwrap();
    store::store_embeddings(pool, version, &ids, &data, dim)
        .await
        .unwrap();
    sqlx::query(
        "UPDATE model_versions SET images_indexed = $2, indexed_at = now(), state = 'indexed'
         WHERE version = $1",
    )
    .bind(version)
    .bind(ids.len() as i32)
    .execute(pool)
    .await
    .unwrap();
}

fn normalise(v: &mut [f32]) {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    for x in v {
        *x /= n;
    }
}
