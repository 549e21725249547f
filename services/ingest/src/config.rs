//! Ingest settings, from flags or the environment.

use std::time::Duration;

use clap::Args;
use kalon_service::{DatabaseArgs, KafkaArgs};

kalon_service::consumer_args! {
    /// How ingest takes the event topics' partitions and reports readiness
    /// (`--group`, `--membership`, `--assign-all`, `--stall-after-s`,
    /// `--health-addr`; `KALON_INGEST_GROUP`, `KALON_INGEST_MEMBERSHIP`, ...).
    pub struct IngestConsumer {
        env_prefix: "KALON_INGEST_",
        group: "kalon-ingest",
        health_addr: "127.0.0.1:9181",
    }
}

/// How ingest connects and batches. Every flag also reads an environment
/// variable, so containers are configured without a command line. `Debug`
/// hides the database password.
#[derive(Debug, Clone, Args)]
pub struct IngestConfig {
    #[command(flatten)]
    pub database: DatabaseArgs,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub consumer: IngestConsumer,
    /// Static group membership (`group.instance.id`): a restarted process
    /// with the same id takes its partitions back at once instead of waiting
    /// for a rebalance. Give each replica its own stable id (pod or host
    /// name); two live processes must never share one.
    #[arg(long, env = "KALON_INGEST_INSTANCE_ID")]
    pub instance_id: Option<String>,
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
    /// default batching and the group `<prefix>kalon-ingest` (used by tests
    /// and `kalonctl`; the environment is not read).
    pub fn new(database_url: &str, brokers: &str, topic_prefix: &str) -> Self {
        kalon_service::defaults_at(database_url, brokers, topic_prefix)
    }

    pub fn linger(&self) -> Duration {
        Duration::from_millis(self.linger_ms)
    }

    pub(crate) fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.batch_max >= 1, "batch_max must be at least 1");
        anyhow::ensure!(self.writers >= 1, "writers must be at least 1");
        self.kafka.validate()?;
        self.consumer.validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_flags_and_environment_names_are_todays() {
        assert_eq!(
            kalon_service::own_flags::<IngestConfig>(),
            [
                "--group KALON_INGEST_GROUP",
                "--membership KALON_INGEST_MEMBERSHIP",
                "--assign-all KALON_INGEST_ASSIGN_ALL",
                "--stall-after-s KALON_INGEST_STALL_AFTER_S",
                "--health-addr KALON_INGEST_HEALTH_ADDR",
                "--instance-id KALON_INGEST_INSTANCE_ID",
                "--batch-max KALON_INGEST_BATCH_MAX",
                "--linger-ms KALON_INGEST_LINGER_MS",
                "--writers KALON_INGEST_WRITERS",
                "--max-backoff-ms KALON_INGEST_MAX_BACKOFF_MS",
            ]
        );
    }

    #[test]
    fn new_keeps_the_defaults_and_debug_hides_the_password() {
        let config = IngestConfig::new("postgres://kalon:hunter2@db:5432/kalon", "k:9092", "t.");
        assert_eq!(config.consumer.group_id, "t.kalon-ingest");
        assert_eq!(config.consumer.health_addr.port(), 9181);
        assert_eq!((config.batch_max, config.writers), (2000, 4));
        assert_eq!(config.kafka.settings().topic("x"), "t.x");
        let printed = format!("{config:?}");
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(
            printed.contains("postgres://kalon:***@db:5432/kalon"),
            "{printed}"
        );
        config.validate().unwrap();
    }
}
