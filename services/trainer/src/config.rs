//! Trainer settings, from flags or the environment (`KALON_TRAINER_*`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use kalon_service::{DatabaseArgs, KafkaArgs};

use crate::gate::GateConfig;
use crate::schedule::Schedule;

/// `Debug` hides the database password.
#[derive(Debug, Clone, Args)]
pub struct TrainerConfig {
    #[command(flatten)]
    pub database: DatabaseArgs,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// When to consider training: a cron expression in UTC, with seconds
    /// (`sec min hour day month weekday`) or without (crontab's five fields).
    #[arg(long, env = "KALON_TRAINER_SCHEDULE", default_value = "0 0 3 * * *")]
    pub schedule: String,
    /// A scheduled tick trains only when at least this many pairs arrived
    /// since the last successful run's window (`kalonctl train now` does not
    /// wait for them).
    #[arg(long, env = "KALON_TRAINER_MIN_NEW_PAIRS", default_value_t = 1000)]
    pub min_new_pairs: u64,
    /// A scheduled tick does not train while an earlier candidate still
    /// awaits its verdict (a version that passed the gate, or a trained
    /// one indexed or in canary): the next run would have the same parent,
    /// and the canary judges one candidate at a time. `false`: train on
    /// every due tick regardless.
    #[arg(long, env = "KALON_TRAINER_WAIT_FOR_CANARY", default_value_t = true, action = clap::ArgAction::Set)]
    pub wait_for_canary: bool,
    /// A run with fewer usable pairs in its window is skipped, with the reason.
    #[arg(long, env = "KALON_TRAINER_MIN_PAIRS", default_value_t = 200)]
    pub min_pairs: usize,
    /// A run trains on the pairs created in this many hours before it starts.
    #[arg(long, env = "KALON_TRAINER_WINDOW_H", default_value_t = 24 * 30)]
    pub window_h: u64,
    /// The catalog as a dataset folder (images, captions, hpir.jsonl): the
    /// images pairs name, the captions that anchor training, and the
    /// held-out data the offline gate evaluates on.
    #[arg(long, env = "KALON_TRAINER_DATASET", default_value = "world")]
    pub dataset: PathBuf,
    /// Where artifacts go: `file:///abs/dir`, `s3://bucket/prefix`,
    /// `gs://...`, `az://...` (credentials from the usual environment).
    /// Default: `file://<work dir>/artifacts`.
    #[arg(long, env = "KALON_ARTIFACT_STORE")]
    pub artifact_store: Option<String>,
    /// Where runs write their encoders before upload.
    #[arg(long, env = "KALON_TRAINER_WORK_DIR", default_value = ".kalon/trainer")]
    pub work_dir: PathBuf,
    /// Optimisation steps per run.
    #[arg(long, env = "KALON_TRAINER_STEPS", default_value_t = 300)]
    pub steps: usize,
    #[arg(long, env = "KALON_TRAINER_LEARNING_RATE", default_value_t = 3e-3)]
    pub learning_rate: f64,
    #[arg(long, env = "KALON_TRAINER_SEED", default_value_t = 1)]
    pub seed: u64,
    /// A run that trains longer than this stops with nothing registered.
    #[arg(long, env = "KALON_TRAINER_TIME_BUDGET_S", default_value_t = 3600)]
    pub time_budget_s: u64,
    /// A trigger is attempted at most this many times (a killed run counts).
    #[arg(long, env = "KALON_TRAINER_MAX_ATTEMPTS", default_value_t = 3)]
    pub max_attempts: i32,
    /// How often the leader looks for due ticks and pending triggers, and
    /// a follower tries to become the leader.
    #[arg(long, env = "KALON_TRAINER_POLL_MS", default_value_t = 1000)]
    pub poll_ms: u64,
    /// A running run's heartbeat older than this belongs to a trainer that
    /// is gone: the leader marks it interrupted and tries its trigger again.
    #[arg(long, env = "KALON_TRAINER_STALE_AFTER_S", default_value_t = 30)]
    pub stale_after_s: u64,
    /// This replica's name in run records (default: host name and pid).
    #[arg(long, env = "KALON_TRAINER_INSTANCE_ID")]
    pub instance_id: Option<String>,
    /// /healthz and /readyz.
    #[arg(
        long,
        env = "KALON_TRAINER_HEALTH_ADDR",
        default_value = "127.0.0.1:9183"
    )]
    pub health_addr: SocketAddr,
    #[command(flatten)]
    pub gate: GateConfig,
}

impl TrainerConfig {
    /// Defaults for a database, broker, topic prefix and dataset (tests,
    /// kalonctl; the environment is not read).
    pub fn new(database_url: &str, brokers: &str, topic_prefix: &str, dataset: &str) -> Self {
        let mut config: TrainerConfig =
            kalon_service::defaults_at(database_url, brokers, topic_prefix);
        config.dataset = PathBuf::from(dataset);
        config
    }

    pub fn poll(&self) -> Duration {
        Duration::from_millis(self.poll_ms)
    }

    /// How often a live run beats: a third of `--stale-after-s`, at most 2 s.
    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis((self.stale_after_s * 1000 / 3).min(2000))
    }

    pub fn window(&self) -> chrono::Duration {
        chrono::Duration::hours(self.window_h as i64)
    }

    pub fn instance(&self) -> String {
        self.instance_id.clone().unwrap_or_else(|| {
            let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "trainer".into());
            format!("{host}-{}", std::process::id())
        })
    }

    pub fn artifact_store_url(&self) -> anyhow::Result<String> {
        match &self.artifact_store {
            Some(url) => Ok(url.clone()),
            None => {
                let dir = std::path::absolute(self.work_dir.join("artifacts"))?;
                Ok(format!("file://{}", dir.display()))
            }
        }
    }

    pub fn validate(&self) -> anyhow::Result<Schedule> {
        let schedule = Schedule::parse(&self.schedule)?;
        anyhow::ensure!(self.steps >= 1, "--steps must be at least 1");
        anyhow::ensure!(self.max_attempts >= 1, "--max-attempts must be at least 1");
        anyhow::ensure!(
            (1..=24 * 366 * 10).contains(&self.window_h),
            "--window-h must be between 1 and 87840 (ten years)"
        );
        anyhow::ensure!(self.poll_ms >= 10, "--poll-ms must be at least 10");
        anyhow::ensure!(
            self.stale_after_s >= 3,
            "--stale-after-s must be at least 3 (a live run beats every third of it, at most every 2 s)"
        );
        anyhow::ensure!(
            self.learning_rate.is_finite() && self.learning_rate > 0.0,
            "--learning-rate must be a positive number"
        );
        anyhow::ensure!(
            self.dataset.join("captions.jsonl").is_file(),
            "--dataset {}: no captions.jsonl there; point it at the catalog's dataset folder (kalonctl sim world writes one)",
            self.dataset.display()
        );
        anyhow::ensure!(
            self.dataset.join("hpir.jsonl").is_file(),
            "--dataset {}: no hpir.jsonl there (the offline gate's held-out items)",
            self.dataset.display()
        );
        self.gate.validate()?;
        self.kafka.validate()?;
        Ok(schedule)
    }

    /// The training settings of a run.
    pub fn align_config(&self) -> kalon_align::train::AlignConfig {
        kalon_align::train::AlignConfig {
            seed: self.seed,
            steps: self.steps,
            learning_rate: self.learning_rate,
            time_budget_s: Some(self.time_budget_s as f64),
            ..Default::default()
        }
    }
}
