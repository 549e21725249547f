//! Enricher settings, from flags or the environment. The LLM endpoint is
//! configured by `KALON_LLM_*` (see `kalon_llm::LlmConfig::from_env`).

use std::time::Duration;

use clap::Args;
use kalon_kafka::KafkaSettings;
use kalon_llm::PromptVariant;

#[derive(Debug, Clone, Args)]
pub struct EnricherConfig {
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
    /// Consumer group of the impression reader (its own: the enricher never
    /// holds back ingest's group).
    #[arg(
        long = "group",
        env = "KALON_ENRICHER_GROUP",
        default_value = "kalon-enricher"
    )]
    pub group_id: String,
    /// Read every partition of the impression topic without joining the
    /// group (offsets still committed under --group); for one replica.
    #[arg(long, env = "KALON_ENRICHER_ASSIGN_ALL")]
    pub assign_all: bool,
    /// Prompt variants to ask for, comma-separated.
    #[arg(
        long,
        env = "KALON_ENRICH_VARIANTS",
        value_delimiter = ',',
        default_value = "detail,k-list,kw-dict,repeat,reorg"
    )]
    pub variants: Vec<PromptVariant>,
    /// A query rephrased within this many seconds is not asked again.
    #[arg(long, env = "KALON_ENRICH_TTL_S", default_value_t = 7 * 24 * 3600)]
    pub ttl_s: u64,
    /// Queries worked on at once (the LLM client's own limits still apply).
    #[arg(long, env = "KALON_ENRICH_WORKERS", default_value_t = 8)]
    pub workers: usize,
    /// How long a claimed query stays a worker's without a renewal (a live
    /// worker renews it every third of this): a dead worker's queries are
    /// taken over after it.
    #[arg(long, env = "KALON_ENRICH_LEASE_S", default_value_t = 300)]
    pub lease_s: u64,
    /// Longest pause before a query whose LLM calls failed is tried again.
    #[arg(long, env = "KALON_ENRICH_MAX_BACKOFF_MS", default_value_t = 60_000)]
    pub max_backoff_ms: u64,
    /// How often idle workers look for due queries.
    #[arg(long, env = "KALON_ENRICH_POLL_MS", default_value_t = 200)]
    pub poll_ms: u64,
}

impl EnricherConfig {
    /// Defaults for a database, broker and topic prefix (tests, kalonctl).
    pub fn new(database_url: &str, brokers: &str, topic_prefix: &str) -> Self {
        EnricherConfig {
            database_url: database_url.to_owned(),
            brokers: brokers.to_owned(),
            topic_prefix: topic_prefix.to_owned(),
            group_id: format!("{topic_prefix}kalon-enricher"),
            assign_all: false,
            variants: PromptVariant::ALL[1..].to_vec(),
            ttl_s: 7 * 24 * 3600,
            workers: 8,
            lease_s: 300,
            max_backoff_ms: 60_000,
            poll_ms: 200,
        }
    }

    pub fn kafka(&self) -> KafkaSettings {
        KafkaSettings::new(&self.brokers, &self.topic_prefix)
    }

    pub fn ttl(&self) -> Duration {
        Duration::from_secs(self.ttl_s)
    }

    pub(crate) fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(!self.variants.is_empty(), "no prompt variants to ask for");
        anyhow::ensure!(self.workers >= 1, "workers must be at least 1");
        anyhow::ensure!(self.lease_s >= 1, "the lease must be at least 1 s");
        anyhow::ensure!(!self.brokers.trim().is_empty(), "no Kafka brokers given");
        Ok(())
    }
}
