//! Enricher settings, from flags or the environment. The LLM endpoint is
//! configured by `KALON_LLM_*` (see `kalon_llm::LlmConfig::from_env`).

use std::time::Duration;

use clap::Args;
use kalon_llm::PromptVariant;
use kalon_service::{DatabaseArgs, KafkaArgs};

kalon_service::consumer_args! {
    /// How the impression reader takes its partitions (its own group: the
    /// enricher never holds back ingest's) and reports readiness
    /// (`--group`, ...; `KALON_ENRICHER_GROUP`, `KALON_ENRICHER_MEMBERSHIP`, ...).
    pub struct EnricherConsumer {
        env_prefix: "KALON_ENRICHER_",
        group: "kalon-enricher",
        health_addr: "127.0.0.1:9182",
    }
}

/// `Debug` hides the database password.
#[derive(Debug, Clone, Args)]
pub struct EnricherConfig {
    #[command(flatten)]
    pub database: DatabaseArgs,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub consumer: EnricherConsumer,
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
    /// Defaults for a database, broker and topic prefix, with the group
    /// `<prefix>kalon-enricher` (tests, kalonctl; the environment is not read).
    pub fn new(database_url: &str, brokers: &str, topic_prefix: &str) -> Self {
        kalon_service::defaults_at(database_url, brokers, topic_prefix)
    }

    pub fn ttl(&self) -> Duration {
        Duration::from_secs(self.ttl_s)
    }

    pub(crate) fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(!self.variants.is_empty(), "no prompt variants to ask for");
        anyhow::ensure!(self.workers >= 1, "workers must be at least 1");
        anyhow::ensure!(self.lease_s >= 1, "the lease must be at least 1 s");
        self.consumer.validate()?;
        self.kafka.validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn own_flags_and_environment_names_are_todays() {
        assert_eq!(
            kalon_service::own_flags::<EnricherConfig>(),
            [
                "--group KALON_ENRICHER_GROUP",
                "--membership KALON_ENRICHER_MEMBERSHIP",
                "--assign-all KALON_ENRICHER_ASSIGN_ALL",
                "--stall-after-s KALON_ENRICHER_STALL_AFTER_S",
                "--health-addr KALON_ENRICHER_HEALTH_ADDR",
                "--variants KALON_ENRICH_VARIANTS",
                "--ttl-s KALON_ENRICH_TTL_S",
                "--workers KALON_ENRICH_WORKERS",
                "--lease-s KALON_ENRICH_LEASE_S",
                "--max-backoff-ms KALON_ENRICH_MAX_BACKOFF_MS",
                "--poll-ms KALON_ENRICH_POLL_MS",
            ]
        );
    }

    #[test]
    fn new_keeps_the_defaults_and_debug_hides_the_password() {
        let config = EnricherConfig::new("postgres://kalon:hunter2@db/kalon", "k:9092", "t.");
        assert_eq!(config.consumer.group_id, "t.kalon-enricher");
        assert_eq!(config.consumer.health_addr.port(), 9182);
        assert_eq!(config.variants, PromptVariant::ALL[1..]);
        let printed = format!("{config:?}");
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(
            printed.contains("postgres://kalon:***@db/kalon"),
            "{printed}"
        );
        config.validate().unwrap();
    }

    /// What the process writes to its log.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_settings_main_logs_show_neither_the_password_nor_the_api_key() {
        let config = EnricherConfig::new("postgres://kalon:hunter2@db/kalon", "k:9092", "");
        let llm = kalon_llm::LlmConfig::from_lookup(|name| match name {
            "KALON_LLM_BASE_URL" => Some("http://127.0.0.1:1/v1".into()),
            "KALON_LLM_API_KEY" => Some("sk-never-logged".into()),
            _ => None,
        })
        .unwrap();
        // both of the formats kalon_telemetry writes (human, and json)
        for json in [false, true] {
            let captured = Captured::default();
            let writer = captured.clone();
            let builder = tracing_subscriber::fmt().with_writer(move || writer.clone());
            let log = || {
                // as main.rs logs them
                kalon_service::log_settings(&config);
                kalon_service::log_settings(&llm);
            };
            if json {
                tracing::subscriber::with_default(builder.json().finish(), log);
            } else {
                tracing::subscriber::with_default(builder.finish(), log);
            }
            let output = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
            assert!(output.contains("kalon:***@db"), "{output}");
            assert!(output.contains("[redacted]"), "{output}");
            assert!(!output.contains("hunter2"), "{output}");
            assert!(!output.contains("sk-never-logged"), "{output}");
        }
    }
}
