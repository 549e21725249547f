//! Preference builder settings, from flags or the environment
//! (`KALON_PREFERENCES_*`; the LMM teacher's endpoint from `KALON_LLM_*`).

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use kalon_align::algorithm::DpoSpec;
use kalon_llm::PromptVariant;
use kalon_service::{DatabaseArgs, KafkaArgs};

kalon_service::consumer_args! {
    /// How the reader of `query.rephrased.v1` and `lmm.judgment.v1` takes
    /// its partitions and reports readiness (`--group`, ...;
    /// `KALON_PREFERENCES_GROUP`, `KALON_PREFERENCES_MEMBERSHIP`, ...).
    pub struct PreferencesConsumer {
        env_prefix: "KALON_PREFERENCES_",
        group: "kalon-preferences",
        health_addr: "127.0.0.1:9184",
    }
}

/// What orders each live D_po row by beauty.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Teacher {
    /// The LMM judge over HTTP (`KALON_LLM_*`), ranking each row in both orders.
    Lmm,
    /// An ONNX score head on the serving encoder's image embeddings
    /// (`--aesthetic-model`).
    Model,
    /// Low-level image statistics (no model; a weak teacher, for trials).
    LowLevel,
}

/// D_po's sizes as the offline construction (`kalonctl train align`) uses them.
fn default_spec() -> DpoSpec {
    kalon_align::train::AlignConfig::default().spec
}

impl Teacher {
    /// As the flag spells it.
    pub fn name(self) -> &'static str {
        match self {
            Teacher::Lmm => "lmm",
            Teacher::Model => "model",
            Teacher::LowLevel => "low-level",
        }
    }
}

/// `Debug` hides the database password.
#[derive(Debug, Clone, Args)]
pub struct PreferencesConfig {
    #[command(flatten)]
    pub database: DatabaseArgs,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub consumer: PreferencesConsumer,
    /// A result list is closed for pair-building once neither its impression
    /// nor any of its clicks arrived for this long (a click that comes later
    /// still makes its pairs, in a later pass).
    #[arg(long, env = "KALON_PREFERENCES_QUIET_S", default_value_t = 1800)]
    pub quiet_s: u64,
    /// A click whose impression has not arrived after this long expires
    /// (counted as `impression_never_arrived`).
    #[arg(long, env = "KALON_PREFERENCES_EXPIRE_AFTER_S", default_value_t = 24 * 3600)]
    pub expire_after_s: u64,
    /// Clicks and ratings that occurred longer ago than this are not looked
    /// at any more (it bounds each pass's scan; keep it above the expiry).
    #[arg(long, env = "KALON_PREFERENCES_LOOKBACK_H", default_value_t = 72)]
    pub lookback_h: u64,
    /// How often a pass looks for closed lists, new ratings and due D_po work.
    #[arg(long, env = "KALON_PREFERENCES_POLL_MS", default_value_t = 2000)]
    pub poll_ms: u64,
    /// Result lists (or rated queries) written per transaction.
    #[arg(long, env = "KALON_PREFERENCES_BATCH", default_value_t = 5000)]
    pub batch: usize,
    /// The largest weight a click pair gets (the inverse propensity is capped).
    #[arg(
        long,
        env = "KALON_PREFERENCES_MAX_CLICK_WEIGHT",
        default_value_t = 10.0
    )]
    pub max_click_weight: f64,
    /// The prior examination curve `1/rank^eta`, used where the traffic has
    /// not yet estimated a rank.
    #[arg(long, env = "KALON_PREFERENCES_PRIOR_ETA", default_value_t = 0.8)]
    pub prior_eta: f64,
    /// Rating pairs need a mean star gap of at least this much.
    #[arg(long, env = "KALON_PREFERENCES_RATING_MIN_GAP", default_value_t = 1.0)]
    pub rating_min_gap: f64,
    /// At most this many rating pairs per query and aspect (widest gaps first).
    #[arg(
        long,
        env = "KALON_PREFERENCES_RATING_PAIRS_PER_QUERY",
        default_value_t = 1000
    )]
    pub rating_pairs_per_query: usize,
    /// How often position bias is estimated again from the traffic (0: never;
    /// the prior then weighs every click).
    #[arg(
        long,
        env = "KALON_PREFERENCES_PROPENSITY_EVERY_S",
        default_value_t = 600
    )]
    pub propensity_every_s: u64,
    /// The estimate reads the impressions and clicks of this many hours.
    #[arg(long, env = "KALON_PREFERENCES_PROPENSITY_WINDOW_H", default_value_t = 24 * 7)]
    pub propensity_window_h: u64,
    /// Ranks estimated (1..=depth).
    #[arg(long, env = "KALON_PREFERENCES_PROPENSITY_DEPTH", default_value_t = 10)]
    pub propensity_depth: u32,
    /// A rank is estimated only from at least this many (query, image)
    /// interventions; below it the prior stands.
    #[arg(
        long,
        env = "KALON_PREFERENCES_PROPENSITY_MIN_INTERVENTIONS",
        default_value_t = 30
    )]
    pub propensity_min_interventions: u64,
    /// Build D_po from the enricher's rephrasings (needs the catalog's
    /// dataset folder and a teacher). `--dpo false` builds only clicks,
    /// ratings and judgments; rephrasings then wait in the queue.
    #[arg(long, env = "KALON_PREFERENCES_DPO", default_value_t = true, action = clap::ArgAction::Set)]
    pub dpo: bool,
    /// The catalog as a dataset folder (its images are what the teacher sees).
    #[arg(long, env = "KALON_PREFERENCES_DATASET", default_value = "world")]
    pub dataset: PathBuf,
    /// Rephrasing variants D_po is built from (those the enricher asks for).
    #[arg(
        long,
        env = "KALON_PREFERENCES_DPO_VARIANTS",
        value_delimiter = ',',
        default_value = "detail"
    )]
    pub dpo_variants: Vec<PromptVariant>,
    /// D_po's teacher; default `lmm` when `KALON_LLM_BASE_URL` is set,
    /// `low-level` otherwise (said at start).
    #[arg(long, env = "KALON_PREFERENCES_TEACHER", value_enum)]
    pub teacher: Option<Teacher>,
    /// The `model` teacher's ONNX score head.
    #[arg(long, env = "KALON_PREFERENCES_AESTHETIC_MODEL")]
    pub aesthetic_model: Option<PathBuf>,
    /// Where the LMM fetches images (BASE/<id>.png); without it they are
    /// sent inline from the dataset folder.
    #[arg(long, env = "KALON_PREFERENCES_IMAGE_BASE_URL")]
    pub image_base_url: Option<String>,
    /// D_po's matrix: top K for the rephrasing, every `stride`-th into
    /// `u` semantic rows of `v` images (docs/ALGORITHM.md).
    #[arg(long, env = "KALON_PREFERENCES_DPO_K", default_value_t = default_spec().k)]
    pub dpo_k: usize,
    #[arg(long, env = "KALON_PREFERENCES_DPO_U", default_value_t = default_spec().u)]
    pub dpo_u: usize,
    #[arg(long, env = "KALON_PREFERENCES_DPO_V", default_value_t = default_spec().v)]
    pub dpo_v: usize,
    #[arg(long, env = "KALON_PREFERENCES_DPO_STRIDE", default_value_t = default_spec().stride)]
    pub dpo_stride: usize,
    /// Longest pause before a query whose teacher failed is tried again.
    #[arg(
        long,
        env = "KALON_PREFERENCES_MAX_BACKOFF_MS",
        default_value_t = 300_000
    )]
    pub max_backoff_ms: u64,
    /// A rephrased query whose D_po failed this many times is set aside
    /// (`refused`, with the reason; set its state back to `pending` to try
    /// again). With the backoff's cap that is about 8 hours of a dead teacher.
    #[arg(
        long,
        env = "KALON_PREFERENCES_DPO_MAX_ATTEMPTS",
        default_value_t = 100
    )]
    pub dpo_max_attempts: i32,
    /// How long a claimed D_po query stays this process's without a renewal
    /// (a live worker renews it every third of this; a crashed builder's
    /// claims are taken over after it).
    #[arg(long, env = "KALON_PREFERENCES_LEASE_S", default_value_t = 300)]
    pub lease_s: u64,
    /// Where the serving version's encoder is fetched (default
    /// `$KALON_CACHE_DIR/models`).
    #[arg(long, env = "KALON_PREFERENCES_MODEL_CACHE")]
    pub model_cache: Option<PathBuf>,
}

impl PreferencesConfig {
    /// Defaults for a database, broker, topic prefix and dataset (tests,
    /// kalonctl; the environment is not read).
    pub fn new(database_url: &str, brokers: &str, topic_prefix: &str, dataset: &str) -> Self {
        let mut config: PreferencesConfig =
            kalon_service::defaults_at(database_url, brokers, topic_prefix);
        config.dataset = PathBuf::from(dataset);
        config
    }

    pub fn poll(&self) -> Duration {
        Duration::from_millis(self.poll_ms)
    }

    pub fn quiet(&self) -> chrono::Duration {
        chrono::Duration::seconds(self.quiet_s as i64)
    }

    pub fn expire_after(&self) -> chrono::Duration {
        chrono::Duration::seconds(self.expire_after_s as i64)
    }

    pub fn lookback(&self) -> chrono::Duration {
        chrono::Duration::hours(self.lookback_h as i64)
    }

    pub fn prior(&self) -> kalon_align::feedback::Propensity {
        kalon_align::feedback::Propensity {
            eta: self.prior_eta,
            max_weight: self.max_click_weight,
        }
    }

    pub fn rating_rules(&self) -> crate::ratings::RatingRules {
        crate::ratings::RatingRules {
            min_gap: self.rating_min_gap,
            per_query: self.rating_pairs_per_query,
        }
    }

    pub fn spec(&self) -> DpoSpec {
        DpoSpec {
            k: self.dpo_k,
            u: self.dpo_u,
            v: self.dpo_v,
            stride: self.dpo_stride,
        }
    }

    /// The teacher asked for, or the default for this environment.
    pub fn teacher(&self) -> Teacher {
        self.teacher.unwrap_or_else(|| {
            if std::env::var("KALON_LLM_BASE_URL").is_ok_and(|url| !url.is_empty()) {
                Teacher::Lmm
            } else {
                Teacher::LowLevel
            }
        })
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.poll_ms >= 10, "--poll-ms must be at least 10");
        anyhow::ensure!(self.batch >= 1, "--batch must be at least 1");
        anyhow::ensure!(self.lease_s >= 3, "--lease-s must be at least 3");
        anyhow::ensure!(
            self.dpo_max_attempts >= 1,
            "--dpo-max-attempts must be at least 1"
        );
        anyhow::ensure!(
            self.expire_after_s >= self.quiet_s,
            "--expire-after-s ({}) must be at least --quiet-s ({}): a click cannot expire before its list closes",
            self.expire_after_s,
            self.quiet_s
        );
        anyhow::ensure!(
            self.lookback_h * 3600 > self.expire_after_s,
            "--lookback-h ({} h) must reach past --expire-after-s ({} s), or clicks would be forgotten before they expire",
            self.lookback_h,
            self.expire_after_s
        );
        anyhow::ensure!(
            self.max_click_weight.is_finite() && self.max_click_weight >= 1.0,
            "--max-click-weight must be a number >= 1"
        );
        anyhow::ensure!(
            self.prior_eta.is_finite() && self.prior_eta >= 0.0,
            "--prior-eta must be a number >= 0"
        );
        anyhow::ensure!(
            (2..=100).contains(&self.propensity_depth),
            "--propensity-depth must be between 2 and 100"
        );
        if self.dpo {
            self.spec().validate()?;
            anyhow::ensure!(
                !self.dpo_variants.is_empty(),
                "--dpo-variants names no variant"
            );
            anyhow::ensure!(
                self.dataset.join("images").is_dir(),
                "--dataset {}: no images/ folder there; point it at the catalog's dataset folder (kalonctl sim world writes one), or run with --dpo false",
                self.dataset.display()
            );
            if self.teacher() == Teacher::Model {
                anyhow::ensure!(
                    self.aesthetic_model.as_ref().is_some_and(|m| m.is_file()),
                    "--teacher model needs --aesthetic-model FILE.onnx (an existing file)"
                );
            }
        }
        self.consumer.validate()?;
        self.kafka.validate()?;
        Ok(())
    }
}
