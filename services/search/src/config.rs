//! Search settings, from flags or the environment.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;
use kalon_events::explore::Exploration;
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
    /// Share of requests, in [0, 1], whose answer has one adjacent pair
    /// (k, k+1), k uniform in 1..min(depth, n)-1, swapped before it is
    /// shown; the impression records the model's rank of the two moved
    /// results (`model_rank`), the randomised intervention from which the
    /// examination propensity per rank is estimated
    /// (`kalon_align::propensity`). Decided per request from its id. 0 (the
    /// default) shows the model's order unchanged; a few percent is enough
    /// on busy traffic.
    #[arg(
        long,
        env = "KALON_SEARCH_EXPLORE_RATE",
        default_value_t = 0.0,
        value_parser = parse_rate
    )]
    pub explore_rate: f64,
    /// Deepest rank an exploration swap reaches (the swapped pair is at
    /// most (depth-1, depth)); at least 2.
    #[arg(
        long,
        env = "KALON_SEARCH_EXPLORE_DEPTH",
        default_value_t = 10,
        value_parser = clap::value_parser!(u32).range(2..)
    )]
    pub explore_depth: u32,
}

fn parse_rate(text: &str) -> Result<f64, String> {
    let rate: f64 = text
        .parse()
        .map_err(|e| format!("{text:?} is not a number: {e}"))?;
    Exploration::new(rate, 2).map(|e| e.rate)
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

    /// The exploration settings (checked when the flags were parsed; a
    /// config built in code is checked here).
    pub fn exploration(&self) -> anyhow::Result<Exploration> {
        Exploration::new(self.explore_rate, self.explore_depth).map_err(anyhow::Error::msg)
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
                "--explore-rate KALON_SEARCH_EXPLORE_RATE",
                "--explore-depth KALON_SEARCH_EXPLORE_DEPTH",
            ]
        );
    }

    #[test]
    fn new_keeps_the_defaults_and_debug_hides_the_password() {
        let config = SearchConfig::new("postgres://kalon:hunter2@db/kalon", "k:9092", "t.");
        assert_eq!(config.kafka.settings().topic("x"), "t.x");
        assert_eq!(config.listen.port(), 8080);
        assert_eq!(config.index_params().ef_search, 256);
        assert_eq!(config.exploration().unwrap(), Exploration::default());
        let printed = format!("{config:?}");
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(
            printed.contains("postgres://kalon:***@db/kalon"),
            "{printed}"
        );
    }

    #[test]
    fn the_explore_rate_is_a_share_and_the_depth_at_least_two() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            search: SearchConfig,
        }
        let parse = |args: &[&str]| {
            Cli::try_parse_from(["kalon-search"].iter().chain(args)).map(|c| c.search)
        };
        let config = parse(&["--explore-rate", "0.05", "--explore-depth", "6"]).unwrap();
        assert_eq!(
            config.exploration().unwrap(),
            Exploration {
                rate: 0.05,
                depth: 6
            }
        );
        for wrong in [
            &["--explore-rate", "1.5"][..],
            &["--explore-rate", "-0.1"],
            &["--explore-rate", "NaN"],
            &["--explore-rate", "often"],
            &["--explore-depth", "1"],
        ] {
            assert!(parse(wrong).is_err(), "{wrong:?} accepted");
        }
        let mut built = SearchConfig::new("postgres://db/kalon", "k:9092", "t.");
        built.explore_rate = 2.0;
        assert!(built.exploration().is_err());
    }
}
