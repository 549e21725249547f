//! Search settings, from flags or the environment.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;
use kalon_service::{DatabaseArgs, KafkaArgs};

use crate::api::Limits;
use crate::index::IndexParams;

/// `Debug` hides the database password.
#[derive(Debug, Clone, Args)]
pub struct SearchConfig {
    #[command(flatten)]
    pub database: DatabaseArgs,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// Address to listen on.
    #[arg(long, env = "KALON_SEARCH_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Folder of the catalog's `<image id>.png` files served at
    /// /v1/images/{id} (a world's `images/` folder).
    #[arg(long, env = "KALON_SEARCH_IMAGES")]
    pub images: Option<PathBuf>,
    /// Prefix of the image URLs in answers; empty gives relative paths.
    #[arg(long, env = "KALON_SEARCH_PUBLIC_URL", default_value = "")]
    pub public_url: String,
    /// Longest query, in characters.
    #[arg(long, env = "KALON_SEARCH_MAX_QUERY_CHARS", default_value_t = 512)]
    pub max_query_chars: usize,
    /// Largest k a request may ask for.
    #[arg(long, env = "KALON_SEARCH_MAX_K", default_value_t = 100)]
    pub max_k: u32,
    /// Largest request body, in bytes.
    #[arg(long, env = "KALON_SEARCH_MAX_BODY_BYTES", default_value_t = 16 * 1024)]
    pub max_body_bytes: usize,
    /// Impressions buffered while the broker is slow or away; beyond this
    /// they are dropped (and counted), never waited for.
    #[arg(
        long,
        env = "KALON_SEARCH_IMPRESSION_BUFFER",
        default_value_t = 100_000
    )]
    pub impression_buffer: usize,
    /// How long an event may wait for the broker before it counts as lost
    /// (impressions) or the client gets 503 (feedback).
    #[arg(long, env = "KALON_SEARCH_KAFKA_TIMEOUT_MS", default_value_t = 10_000)]
    pub kafka_timeout_ms: u64,
    /// Re-read the deployments this often even without an event.
    #[arg(long, env = "KALON_SEARCH_RELOAD_S", default_value_t = 30)]
    pub reload_every_s: u64,
    /// Corpora smaller than this are searched exactly, larger ones by HNSW.
    #[arg(long, env = "KALON_SEARCH_EXACT_BELOW", default_value_t = 5_000)]
    pub exact_below: usize,
    /// HNSW candidate list while searching (higher: better recall, slower).
    #[arg(long, env = "KALON_SEARCH_EF", default_value_t = 256)]
    pub ef_search: usize,
    /// HNSW links per node (M; higher: better recall, more memory, slower build).
    #[arg(long, env = "KALON_SEARCH_HNSW_M", default_value_t = 16)]
    pub hnsw_m: usize,
    /// HNSW candidate list while building (efConstruction).
    #[arg(long, env = "KALON_SEARCH_EF_CONSTRUCTION", default_value_t = 100)]
    pub ef_construction: usize,
    /// Where model artifacts fetched from the artifact store are kept
    /// (verified on every load) [default: $KALON_CACHE_DIR/models, else
    /// ~/.cache/kalon/models].
    #[arg(long, env = "KALON_SEARCH_MODEL_CACHE")]
    pub model_cache: Option<PathBuf>,
}

impl SearchConfig {
    /// Defaults for a database, broker and topic prefix (tests, kalonctl;
    /// the environment is not read).
    pub fn new(database_url: &str, brokers: &str, topic_prefix: &str) -> Self {
        kalon_service::defaults_at(database_url, brokers, topic_prefix)
    }

    pub fn limits(&self) -> Limits {
        Limits {
            max_query_chars: self.max_query_chars,
            max_k: self.max_k,
            max_body_bytes: self.max_body_bytes,
            ..Limits::default()
        }
    }

    pub fn index_params(&self) -> IndexParams {
        IndexParams {
            exact_below: self.exact_below,
            ef_search: self.ef_search,
            max_connections: self.hnsw_m,
            ef_construction: self.ef_construction,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_and_environment_names_are_todays() {
        let flags = kalon_service::flags_and_env::<SearchConfig>();
        // after --database-url, --brokers and --topic-prefix (kalon_service's
        // groups, tested there; `new` passes them)
        assert_eq!(
            flags[3..],
            [
                "--listen KALON_SEARCH_LISTEN",
                "--images KALON_SEARCH_IMAGES",
                "--public-url KALON_SEARCH_PUBLIC_URL",
                "--max-query-chars KALON_SEARCH_MAX_QUERY_CHARS",
                "--max-k KALON_SEARCH_MAX_K",
                "--max-body-bytes KALON_SEARCH_MAX_BODY_BYTES",
                "--impression-buffer KALON_SEARCH_IMPRESSION_BUFFER",
                "--kafka-timeout-ms KALON_SEARCH_KAFKA_TIMEOUT_MS",
                "--reload-every-s KALON_SEARCH_RELOAD_S",
                "--exact-below KALON_SEARCH_EXACT_BELOW",
                "--ef-search KALON_SEARCH_EF",
                "--hnsw-m KALON_SEARCH_HNSW_M",
                "--ef-construction KALON_SEARCH_EF_CONSTRUCTION",
                "--model-cache KALON_SEARCH_MODEL_CACHE",
            ]
        );
    }

    #[test]
    fn new_keeps_the_defaults_and_debug_hides_the_password() {
        let config = SearchConfig::new("postgres://kalon:hunter2@db/kalon", "k:9092", "t.");
        assert_eq!(config.kafka.settings().topic("x"), "t.x");
        assert_eq!(config.listen.port(), 8080);
        assert_eq!(config.index_params().ef_search, 256);
        let printed = format!("{config:?}");
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(
            printed.contains("postgres://kalon:***@db/kalon"),
            "{printed}"
        );
    }
}
