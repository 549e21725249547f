//! Model versions in service and the canary split between them.
//!
//! A [`Routing`] is immutable: a deployment change builds a new one (reusing
//! every version already loaded) and swaps it in whole. Requests in flight
//! keep the `Arc` of the routing they started with, so an old version is
//! drained, not cut off, and no request ever sees half a change.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use kalon_encoder::{EncoderOptions, Manifest, TextEncoder};
use sqlx::PgPool;

use crate::index::{IndexParams, VectorIndex};
use kalon_registry::artifact;
use kalon_registry::lifecycle::State;
use kalon_registry::store::{self, Deployment};

/// One model version loaded for serving: its text tower and the index of
/// the catalog's image embeddings under that version.
pub struct Served {
    pub version: String,
    /// Where its encoder came from (`dir:<path>` or `sha256:<hash>`): a
    /// deployment whose source changed is loaded again.
    pub source: String,
    /// The local directory the encoder was loaded from (an artifact's
    /// verified copy in the model cache).
    pub encoder_dir: String,
    pub text: TextEncoder,
    pub index: VectorIndex,
    /// Image id of each index row.
    pub ids: Vec<String>,
}

impl std::fmt::Debug for Served {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Served")
            .field("version", &self.version)
            .field("source", &self.source)
            .field("encoder_dir", &self.encoder_dir)
            .field("images", &self.ids.len())
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Its artifact would not fetch or verify (a hash mismatch among them):
    /// the version is refused.
    #[error("materializing the encoder of {version}: {source}")]
    Artifact {
        version: String,
        source: kalon_registry::artifact::ArtifactError,
    },
    #[error("loading the encoder of {version} from {dir}: {source}")]
    Encoder {
        version: String,
        dir: String,
        source: kalon_encoder::EncoderError,
    },
    #[error("reading the embeddings of {version}: {source}")]
    Embeddings {
        version: String,
        source: store::LoadError,
    },
    #[error("version {version} has no embeddings: run `kalonctl index --model-version {version}`")]
    Empty { version: String },
    #[error("the text tower of {version} is {text}-d, its image embeddings {image}-d")]
    Dim {
        version: String,
        text: usize,
        image: usize,
    },
    #[error("building the index of {version}: {source}")]
    Index {
        version: String,
        source: crate::index::IndexError,
    },
    #[error("reading deployments: {0}")]
    Db(#[from] sqlx::Error),
    #[error("index build task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

impl Served {
    /// Materializes a deployed version's encoder (an artifact is fetched
    /// into `cache` and verified, on every load), loads its text tower and
    /// builds its index from Postgres.
    pub async fn load(
        pool: &PgPool,
        deployment: &Deployment,
        cache: &Path,
        options: &EncoderOptions,
        params: IndexParams,
    ) -> Result<Served, LoadError> {
        let version = deployment.model_version.as_str();
        let source = deployment.source().ok_or_else(|| LoadError::Artifact {
            version: version.to_owned(),
            source: artifact::ArtifactError::NoEncoder {
                version: version.to_owned(),
                detail: "neither an encoder directory nor an artifact".into(),
            },
        })?;
        let dir: PathBuf = artifact::materialize_source(
            version,
            &source,
            deployment.embedding_dim as usize,
            cache,
        )
        .await
        .map_err(|source| LoadError::Artifact {
            version: version.to_owned(),
            source,
        })?;
        let encoder_dir = dir.display().to_string();
        let encoder_error = |source| LoadError::Encoder {
            version: version.to_owned(),
            dir: encoder_dir.clone(),
            source,
        };
        let dir = dir.as_path();
        let manifest = Manifest::load(dir).map_err(encoder_error)?;
        let text = TextEncoder::load(dir, &manifest, options).map_err(encoder_error)?;
        let dim = manifest.embedding_dim;
        let stored = store::load_embeddings(pool, version, dim)
            .await
            .map_err(|source| LoadError::Embeddings {
                version: version.to_owned(),
                source,
            })?;
        if stored.ids.is_empty() {
            return Err(LoadError::Empty {
                version: version.to_owned(),
            });
        }
        if text.dim() != dim {
            return Err(LoadError::Dim {
                version: version.to_owned(),
                text: text.dim(),
                image: dim,
            });
        }
        let index =
            tokio::task::spawn_blocking(move || VectorIndex::build(dim, stored.data, params))
                .await?
                .map_err(|source| LoadError::Index {
                    version: version.to_owned(),
                    source,
                })?;
        Ok(Served {
            version: version.to_owned(),
            source: source.to_string(),
            encoder_dir,
            text,
            index,
            ids: stored.ids,
        })
    }
}

/// A version with its variant name and traffic weight.
#[derive(Debug, Clone)]
pub struct Variant {
    pub name: String,
    pub weight: f64,
    pub served: Arc<Served>,
    /// The share of this variant's requests answered with a team-draft
    /// interleaving of its ranking and the promoted version's, in [0, 1]
    /// (the canary controller sets it on a candidate; 0 elsewhere).
    pub interleave: f64,
    /// The version's lifecycle state when the routing was built.
    pub state: State,
}

/// The versions in service and their weights.
#[derive(Debug, Clone, Default)]
pub struct Routing {
    /// In variant-name order, so every replica splits the same way.
    pub variants: Vec<Variant>,
}

impl Routing {
    pub fn total_weight(&self) -> f64 {
        self.variants.iter().map(|v| v.weight).sum()
    }

    /// Whether any version takes traffic.
    pub fn is_ready(&self) -> bool {
        self.total_weight() > 0.0
    }

    /// The variant for a routing key (session, else user, else request id):
    /// the key's stable hash, as a point in [0, 1), falls into one variant's
    /// share of the cumulative weights. The same key gets the same variant
    /// as long as the weights stay; `None` when nothing takes traffic.
    pub fn assign(&self, key: &str) -> Option<&Variant> {
        let total = self.total_weight();
        if total <= 0.0 {
            return None;
        }
        let point = unit_hash(key) * total;
        let mut acc = 0.0;
        let mut last = None;
        for variant in self.variants.iter().filter(|v| v.weight > 0.0) {
            acc += variant.weight;
            last = Some(variant);
            if point < acc {
                return Some(variant);
            }
        }
        last
    }

    /// A loaded version by name (weight 0 included).
    pub fn served(&self, version: &str) -> Option<&Arc<Served>> {
        self.variant_of(version).map(|v| &v.served)
    }

    /// The variant serving a loaded version (weight 0 included).
    pub fn variant_of(&self, version: &str) -> Option<&Variant> {
        self.variants.iter().find(|v| v.served.version == version)
    }

    /// The stable version to interleave `variant`'s ranking with for the
    /// request `request_id`, if this request gets an interleaved page: the
    /// variant interleaves (a share above 0), a promoted version other than
    /// its own is loaded (at any weight), and the request id's hash falls
    /// within the share. The decision is a pure function of the request id,
    /// salted so it is independent of the exploration swap's.
    pub fn interleave_with(&self, variant: &Variant, request_id: &str) -> Option<&Variant> {
        if variant.interleave <= 0.0 {
            return None;
        }
        let stable = self
            .variants
            .iter()
            .find(|v| v.state == State::Promoted && v.served.version != variant.served.version)?;
        (unit(salted_hash(request_id, INTERLEAVE_SALT)) < variant.interleave).then_some(stable)
    }

    /// The routing `deployments` describe, reusing every version of `self`
    /// already loaded from the same source; only new versions are loaded
    /// (artifacts fetched into `cache`). On any error, a refused artifact
    /// among them, the caller keeps serving `self`.
    pub async fn rebuild(
        &self,
        pool: &PgPool,
        deployments: &[Deployment],
        cache: &Path,
        options: &EncoderOptions,
        params: IndexParams,
    ) -> Result<Routing, LoadError> {
        let mut loaded: HashMap<&str, Arc<Served>> = HashMap::new();
        for v in &self.variants {
            loaded.insert(v.served.version.as_str(), v.served.clone());
        }
        let mut variants = Vec::with_capacity(deployments.len());
        for d in deployments {
            let source = d.source().map(|s| s.to_string());
            let served = match loaded.get(d.model_version.as_str()) {
                Some(served) if Some(&served.source) == source.as_ref() => served.clone(),
                _ => {
                    tracing::info!(version = %d.model_version, source = source.as_deref().unwrap_or("none"), "loading model version");
                    let served = Served::load(pool, d, cache, options, params).await?;
                    tracing::info!(
                        version = %d.model_version,
                        images = served.ids.len(),
                        approximate = served.index.is_approximate(),
                        "model version loaded"
                    );
                    Arc::new(served)
                }
            };
            variants.push(Variant {
                name: d.variant.clone(),
                weight: d.weight,
                served,
                interleave: d.interleave,
                state: d.state,
            });
        }
        variants.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Routing { variants })
    }
}

/// The routing in force, swapped whole on every change.
#[derive(Debug, Default)]
pub struct Live(RwLock<Arc<Routing>>);

impl Live {
    pub fn new(routing: Routing) -> Self {
        Live(RwLock::new(Arc::new(routing)))
    }

    /// The routing to serve one request with (held for the whole request).
    pub fn current(&self) -> Arc<Routing> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn replace(&self, routing: Routing) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(routing);
    }
}

/// Salt of the decision whether a request is interleaved.
const INTERLEAVE_SALT: u64 = 0x1e7e_a5ed_0000_0001;
/// Salt of the seed of an interleaved request's team-draft coins.
const DRAFT_SALT: u64 = 0x1e7e_a5ed_0000_0002;

/// FNV-1a of the key, finished with splitmix64 so nearby keys spread, as a
/// fraction in [0, 1). Stable across processes, versions and platforms.
pub fn unit_hash(key: &str) -> f64 {
    unit(salted_hash(key, 0))
}

/// FNV-1a of the key xor `salt`, finished with splitmix64: with salt 0 the
/// hash [`unit_hash`] and `kalon_events::explore` use, with another salt an
/// independent draw from the same key.
fn salted_hash(key: &str, salt: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= salt;
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The top 53 bits of a hash as a fraction in [0, 1).
fn unit(h: u64) -> f64 {
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// The seed of the team-draft coins of the request `request_id`, so the
/// same request always drafts the same page.
pub fn draft_seed(request_id: &str) -> u64 {
    salted_hash(request_id, DRAFT_SALT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_hash_is_stable_and_uniform() {
        // fixed values: a change here would re-shuffle every user's variant
        assert_eq!(unit_hash("session-1"), unit_hash("session-1"));
        assert_ne!(unit_hash("session-1"), unit_hash("session-2"));
        let n = 100_000;
        let mut buckets = [0u32; 10];
        for i in 0..n {
            let x = unit_hash(&format!("s{i}"));
            assert!((0.0..1.0).contains(&x));
            buckets[(x * 10.0) as usize] += 1;
        }
        for b in buckets {
            let share = f64::from(b) / n as f64;
            assert!((share - 0.1).abs() < 0.005, "bucket share {share}");
        }
    }

    #[test]
    fn the_interleave_draw_is_independent_of_the_exploration_draw() {
        // salt 0 is exactly the exploration swap's draw (and unit_hash)
        let explore = kalon_events::explore::Exploration::new(0.5, 10).unwrap();
        let n = 20_000;
        let mut both = 0;
        let mut interleaved = 0;
        for i in 0..n {
            let id = format!("0190b2c4-{i:04x}-7000-8000-000000000000");
            let explored = explore.swap_for(&id, 10).is_some();
            assert_eq!(explored, unit_hash(&id) < 0.5);
            let inter = unit(salted_hash(&id, INTERLEAVE_SALT)) < 0.5;
            interleaved += u32::from(inter);
            both += u32::from(inter && explored);
        }
        let share = f64::from(interleaved) / f64::from(n);
        assert!((share - 0.5).abs() < 0.02, "interleaved share {share}");
        let joint = f64::from(both) / f64::from(n);
        assert!((joint - 0.25).abs() < 0.02, "joint share {joint}");
        assert_ne!(draft_seed("r1"), draft_seed("r2"));
        assert_eq!(draft_seed("r1"), draft_seed("r1"));
    }
}
