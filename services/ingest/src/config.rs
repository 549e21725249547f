//! Ingest settings, from flags or the environment.

use std::time::Duration;

use clap::Args;
use kalon_kafka::KafkaSettings;

/// How ingest connects and batches. Every flag also reads an environment
/// variable, so containers are configured without a command line.
#[derive(Debug, Clone, Args)]
pub struct IngestConfig {
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
    /// Consumer group id.
    #[arg(
        long = "group",
        env = "KALON_INGEST_GROUP",
        default_value = "kalon-ingest"
    )]
    pub group_id: String,
    /// Static group membership (`group.instance.id`): a restarted process
    /// with the same id takes its partitions back at once instead of waiting
    /// for a rebalance. Give each replica its own stable id (pod or host
    /// name); two live processes must never share one.
    #[arg(long, env = "KALON_INGEST_INSTANCE_ID")]
    pub instance_id: Option<String>,
    /// Consume every partition of the event topics without joining the
    /// group (offsets are still committed under `--group`). For a single
    /// replica, and for brokers whose group coordinator cannot be trusted
    /// with crashed members (tansu 0.6). Never run two replicas this way.
    #[arg(long, env = "KALON_INGEST_ASSIGN_ALL")]
    pub assign_all: bool,
    /// Most events written in one transaction.
    #[arg(long, env = "KALON_INGEST_BATCH_MAX", default_value_t = 2000)]
    pub batch_max: usize,
    /// Longest wait for a batch to fill, in milliseconds.
    #[arg(long, env = "KALON_INGEST_LINGER_MS", default_value_t = 50)]
    pub linger_ms: u64,
    /// Batches written concurrently (each on its own connection); offsets
    /// are still committed in order.
    #[arg(long, env = "KALON_INGEST_WRITERS", default_value_t = 4)]
    pub writers: usize,
    /// Cap on the pause between retries of a failing write, in milliseconds.
    #[arg(long, env = "KALON_INGEST_MAX_BACKOFF_MS", default_value_t = 5000)]
    pub max_backoff_ms: u64,
}

impl IngestConfig {
    /// Settings for a given database, broker and topic prefix, with the
    /// default batching (used by tests and `kalonctl`).
    pub fn new(database_url: &str, brokers: &str, topic_prefix: &str) -> Self {
        IngestConfig {
            database_url: database_url.to_owned(),
            brokers: brokers.to_owned(),
            topic_prefix: topic_prefix.to_owned(),
            group_id: format!("{topic_prefix}kalon-ingest"),
            instance_id: None,
            assign_all: false,
            batch_max: 2000,
            linger_ms: 50,
            writers: 4,
            max_backoff_ms: 5000,
        }
    }

    pub fn kafka(&self) -> KafkaSettings {
        KafkaSettings::new(&self.brokers, &self.topic_prefix)
    }

    pub fn linger(&self) -> Duration {
        Duration::from_millis(self.linger_ms)
    }

    pub(crate) fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.batch_max >= 1, "batch_max must be at least 1");
        anyhow::ensure!(self.writers >= 1, "writers must be at least 1");
        anyhow::ensure!(!self.brokers.trim().is_empty(), "no Kafka brokers given");
        Ok(())
    }
}
