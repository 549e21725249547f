//! Ingest settings, from flags or the environment.

use std::time::Duration;

use clap::Args;
use kalon_kafka::consumer::Membership;
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
    /// How this process takes its partitions. `auto` (the default): every
    /// partition itself when the broker is tansu (the local stack: one
    /// replica, and tansu 0.6's coordinator never hands a crashed member's
    /// partitions over), the consumer group everywhere else (real Kafka,
    /// several replicas). `group` or `assign-all` to choose yourself; never
    /// run two replicas with `assign-all`.
    #[arg(
        long,
        env = "KALON_INGEST_MEMBERSHIP",
        value_enum,
        default_value_t = Membership::Auto
    )]
    pub membership: Membership,
    /// Shorthand for `--membership assign-all` (kept for existing setups).
    #[arg(long, env = "KALON_INGEST_ASSIGN_ALL", conflicts_with = "membership")]
    pub assign_all: bool,
    /// Readiness fails when events wait and the group's committed offsets
    /// have not moved for this many seconds.
    #[arg(long, env = "KALON_INGEST_STALL_AFTER_S", default_value_t = 60)]
    pub stall_after_s: u64,
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
            membership: Membership::Auto,
            assign_all: false,
            stall_after_s: 60,
            batch_max: 2000,
            linger_ms: 50,
            writers: 4,
            max_backoff_ms: 5000,
        }
    }

    pub fn kafka(&self) -> KafkaSettings {
        KafkaSettings::new(&self.brokers, &self.topic_prefix)
    }

    /// The membership asked for (`--assign-all` included).
    pub fn membership(&self) -> Membership {
        self.membership.or_assign_all(self.assign_all)
    }

    pub fn linger(&self) -> Duration {
        Duration::from_millis(self.linger_ms)
    }

    pub(crate) fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.batch_max >= 1, "batch_max must be at least 1");
        anyhow::ensure!(self.writers >= 1, "writers must be at least 1");
        anyhow::ensure!(self.stall_after_s >= 1, "stall_after_s must be at least 1");
        anyhow::ensure!(!self.brokers.trim().is_empty(), "no Kafka brokers given");
        Ok(())
    }
}
