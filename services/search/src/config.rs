//! Search settings, from flags or the environment.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;

use crate::api::Limits;
use crate::index::IndexParams;

#[derive(Debug, Clone, Args)]
pub struct SearchConfig {
    /// Postgres URL.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/kalon"
    )]
    pub database_url: String,
    /// Kafka bootstrap servers.
    #[arg(long, env = "KALON_KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    pub brokers: String,
    /// Prefix of every topic name (empty in production).
    #[arg(long, env = "KALON_TOPIC_PREFIX", default_value = "")]
    pub topic_prefix: String,
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
}

impl SearchConfig {
    /// Defaults for a database, broker and topic prefix (tests, kalonctl).
    pub fn new(database_url: &str, brokers: &str, topic_prefix: &str) -> Self {
        use clap::Parser;
        #[derive(Parser)]
        struct Wrapper {
            #[command(flatten)]
            config: SearchConfig,
        }
        let mut config = Wrapper::parse_from(["kalon-search"]).config;
        config.database_url = database_url.to_owned();
        config.brokers = brokers.to_owned();
        config.topic_prefix = topic_prefix.to_owned();
        config
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
