//! Enricher settings, from flags or the environment. The LLM endpoint is
//! configured by `KALON_LLM_*` (see `kalon_llm::LlmConfig::from_env`).

use std::time::Duration;

use clap::Args;
use kalon_kafka::consumer::Membership;
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
    /// How the impression reader takes its partitions: `auto` (every
    /// partition itself on tansu, the local stack's single-replica broker,
    /// whose coordinator never hands a crashed member's partitions over;
    /// the group everywhere else), `group` or `assign-all`.
    #[arg(
        long,
        env = "KALON_ENRICHER_MEMBERSHIP",
        value_enum,
        default_value_t = Membership::Auto
    )]
    pub membership: Membership,
    /// Shorthand for `--membership assign-all` (kept for existing setups).
    #[arg(long, env = "KALON_ENRICHER_ASSIGN_ALL", conflicts_with = "membership")]
    pub assign_all: bool,
    /// Readiness fails when impressions wait and the group's committed
    /// offsets have not moved for this many seconds.
    #[arg(long, env = "KALON_ENRICHER_STALL_AFTER_S", default_value_t = 60)]
    pub stall_after_s: u64,
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
            membership: Membership::Auto,
            assign_all: false,
            stall_after_s: 60,
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

    /// The membership asked for (`--assign-all` included).
    pub fn membership(&self) -> Membership {
        self.membership.or_assign_all(self.assign_all)
    }

    pub fn ttl(&self) -> Duration {
        Duration::from_secs(self.ttl_s)
    }

    pub(crate) fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(!self.variants.is_empty(), "no prompt variants to ask for");
        anyhow::ensure!(self.workers >= 1, "workers must be at least 1");
        anyhow::ensure!(self.lease_s >= 1, "the lease must be at least 1 s");
        anyhow::ensure!(self.stall_after_s >= 1, "stall_after_s must be at least 1");
        anyhow::ensure!(!self.brokers.trim().is_empty(), "no Kafka brokers given");
        Ok(())
    }
}
