//! Canary controller settings, from flags or the environment
//! (`KALON_CANARY_*`; the LMM judge's endpoint from `KALON_LLM_*`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use kalon_service::{DatabaseArgs, KafkaArgs, Secret};

kalon_service::consumer_args! {
    /// How the reader of `model.registered.v1` takes its partitions and
    /// reports readiness (`--group`, ...; `KALON_CANARY_GROUP`, ...).
    pub struct CanaryConsumer {
        env_prefix: "KALON_CANARY_",
        group: "kalon-canary",
        health_addr: "127.0.0.1:9185",
    }
}

/// The kinds of evidence a verdict may rest on; each works alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Evidence {
    /// User-level outcomes per arm, the session as unit (+ guardrails).
    Ab,
    /// Team-draft interleaving of both rankings on a share of the
    /// candidate's traffic.
    Interleaving,
    /// The order-consistent LMM judge on both versions' top-k rows for
    /// sampled live queries (needs `KALON_LLM_BASE_URL` and `--search-url`).
    Lmm,
}

impl Evidence {
    pub fn name(self) -> &'static str {
        match self {
            Evidence::Ab => "ab",
            Evidence::Interleaving => "interleaving",
            Evidence::Lmm => "lmm",
        }
    }
}

/// When the top step promotes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PromoteWhen {
    /// Some evidence shows the candidate significantly better.
    Significant,
    /// Shown no worse than the margin (significantly better included).
    NonInferior,
}

/// What ends a canary that used up its budget undecided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AtBudget {
    Rollback,
    Promote,
}

/// What a newer candidate does while one is in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnNewer {
    /// It waits until the running canary ends.
    Wait,
    /// The running canary is rolled back (recorded as superseded) and the
    /// newer one starts.
    Supersede,
}

/// A/B outcome the A/B evidence acts on (the others are reported).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Primary {
    /// Share of a session's searches with a click.
    Ctr,
    /// Clicks in the top 3 per search.
    Top3Clicks,
    /// Reciprocal rank of the first click (0 without one).
    ReciprocalRank,
}

impl Primary {
    pub fn metric(self) -> &'static str {
        match self {
            Primary::Ctr => "ctr",
            Primary::Top3Clicks => "top3_clicks",
            Primary::ReciprocalRank => "reciprocal_rank",
        }
    }
}

/// `Debug` hides the database password and the admin token.
#[derive(Debug, Clone, Args)]
pub struct CanaryConfig {
    #[command(flatten)]
    pub database: DatabaseArgs,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub consumer: CanaryConsumer,
    /// The candidate's share of traffic at each step, in order; after the
    /// last step comes promotion.
    #[arg(
        long,
        env = "KALON_CANARY_LADDER",
        value_delimiter = ',',
        default_value = "0.01,0.05,0.2,0.5"
    )]
    pub ladder: Vec<f64>,
    /// The variant name the stable (promoted) version serves under.
    #[arg(long, env = "KALON_CANARY_STABLE_VARIANT", default_value = "main")]
    pub stable_variant: String,
    /// The variant name the candidate serves under.
    #[arg(long, env = "KALON_CANARY_CANARY_VARIANT", default_value = "canary")]
    pub canary_variant: String,
    /// Evidence kinds the verdict uses (comma-separated).
    #[arg(
        long,
        env = "KALON_CANARY_EVIDENCE",
        value_delimiter = ',',
        default_value = "ab,interleaving"
    )]
    pub evidence: Vec<Evidence>,
    /// Share of the candidate's requests search answers with a team-draft
    /// interleaving of both rankings (with `interleaving` evidence).
    #[arg(long, env = "KALON_CANARY_INTERLEAVE", default_value_t = 0.5)]
    pub interleave: f64,
    /// The rule's level: false rollbacks at most alpha however often the
    /// controller looks, split evenly over the tests that can roll back
    /// (primary A/B metric, interleaving, LMM aesthetic and relevance, error
    /// rate, dropped impressions).
    #[arg(long, env = "KALON_CANARY_ALPHA", default_value_t = 0.05)]
    pub alpha: f64,
    /// Non-inferiority margin of the primary A/B metric, relative to the
    /// stable mean (0.05: at most 5% worse).
    #[arg(long, env = "KALON_CANARY_MARGIN", default_value_t = 0.05)]
    pub margin: f64,
    /// Non-inferiority margin of the interleaving and LMM preferences, in
    /// preference units (mean preference among decisive queries >= -margin).
    #[arg(long, env = "KALON_CANARY_PREFERENCE_MARGIN", default_value_t = 0.1)]
    pub preference_margin: f64,
    #[arg(long, env = "KALON_CANARY_PRIMARY", value_enum, default_value = "ctr")]
    pub primary: Primary,
    /// Sessions per arm before an A/B metric may decide anything.
    #[arg(long, env = "KALON_CANARY_MIN_SESSIONS", default_value_t = 200)]
    pub min_sessions: u64,
    /// Decisive queries before the interleaving preference may decide.
    #[arg(long, env = "KALON_CANARY_MIN_DECISIVE", default_value_t = 30)]
    pub min_decisive: u64,
    /// Least time at a step before advancing from it.
    #[arg(long, env = "KALON_CANARY_MIN_STEP_S", default_value_t = 300)]
    pub min_step_s: u64,
    /// Impressions younger than this are not counted yet (their clicks may
    /// still be on the way).
    #[arg(long, env = "KALON_CANARY_SETTLE_S", default_value_t = 10)]
    pub settle_s: u64,
    #[arg(
        long,
        env = "KALON_CANARY_PROMOTE_WHEN",
        value_enum,
        default_value = "non-inferior"
    )]
    pub promote_when: PromoteWhen,
    /// A canary undecided after this long ends in `--at-budget`.
    #[arg(long, env = "KALON_CANARY_BUDGET_S", default_value_t = 6 * 3600)]
    pub budget_s: u64,
    /// ... or after this many candidate sessions (0: no limit).
    #[arg(long, env = "KALON_CANARY_BUDGET_SESSIONS", default_value_t = 0)]
    pub budget_sessions: u64,
    #[arg(
        long,
        env = "KALON_CANARY_AT_BUDGET",
        value_enum,
        default_value = "rollback"
    )]
    pub at_budget: AtBudget,
    #[arg(
        long,
        env = "KALON_CANARY_ON_NEWER",
        value_enum,
        default_value = "wait"
    )]
    pub on_newer: OnNewer,
    /// How often the controller looks at the evidence.
    #[arg(long, env = "KALON_CANARY_TICK_MS", default_value_t = 2000)]
    pub tick_ms: u64,
    /// A hold is recorded (and published) at most this often per canary.
    #[arg(long, env = "KALON_CANARY_HOLD_EVERY_S", default_value_t = 60)]
    pub hold_every_s: u64,
    /// Search replicas (comma-separated base URLs): their `/v1/stats` give
    /// the guardrails, and the LMM judge's rows come from pinned searches.
    #[arg(long, env = "KALON_CANARY_SEARCH_URL", value_delimiter = ',')]
    pub search_url: Vec<String>,
    /// A guardrail breaches when the candidate's p99 latency exceeds the
    /// stable's by this factor ...
    #[arg(long, env = "KALON_CANARY_P99_RATIO", default_value_t = 1.5)]
    pub p99_ratio: f64,
    /// ... and by at least this many milliseconds.
    #[arg(long, env = "KALON_CANARY_P99_SLACK_MS", default_value_t = 20.0)]
    pub p99_slack_ms: f64,
    /// Requests per arm before the latency guardrail may breach.
    #[arg(long, env = "KALON_CANARY_MIN_REQUESTS", default_value_t = 200)]
    pub min_requests: u64,
    /// Queries the LMM judge takes per look, and in all per canary.
    #[arg(long, env = "KALON_CANARY_LMM_PER_LOOK", default_value_t = 4)]
    pub lmm_per_look: u32,
    #[arg(long, env = "KALON_CANARY_LMM_MAX_QUERIES", default_value_t = 200)]
    pub lmm_max_queries: u32,
    /// Images per row the LMM judge compares.
    #[arg(long, env = "KALON_CANARY_LMM_K", default_value_t = 4)]
    pub lmm_k: u32,
    /// The dataset whose `images/` the indexer embeds (a trainer's version
    /// is indexed before its canary starts) and the LMM judge is shown.
    #[arg(long, env = "KALON_CANARY_DATASET")]
    pub dataset: Option<PathBuf>,
    /// Where artifacts are fetched for indexing (default
    /// `$KALON_CACHE_DIR/models`).
    #[arg(long, env = "KALON_CANARY_MODEL_CACHE")]
    pub model_cache: Option<PathBuf>,
    /// The admin API (status, history, promote, rollback, pause, resume).
    #[arg(
        long,
        env = "KALON_CANARY_ADMIN_ADDR",
        default_value = "127.0.0.1:8086"
    )]
    pub admin_addr: SocketAddr,
    /// Bearer token the admin API's state-changing calls require; without
    /// one they are refused (503).
    #[arg(long, env = "KALON_CANARY_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<Secret<String>>,
}

impl CanaryConfig {
    /// Defaults for a database, broker and topic prefix (tests, kalonctl;
    /// the environment is not read).
    pub fn new(database_url: &str, brokers: &str, topic_prefix: &str) -> Self {
        kalon_service::defaults_at(database_url, brokers, topic_prefix)
    }

    pub fn tick(&self) -> Duration {
        Duration::from_millis(self.tick_ms)
    }

    pub fn uses(&self, evidence: Evidence) -> bool {
        self.evidence.contains(&evidence)
    }

    /// The candidate's share at `step` (the last step's beyond the ladder).
    pub fn share(&self, step: u32) -> f64 {
        let last = self.ladder.len().saturating_sub(1);
        self.ladder[(step as usize).min(last)]
    }

    pub fn top_step(&self) -> u32 {
        (self.ladder.len() - 1) as u32
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(!self.ladder.is_empty(), "--ladder needs at least one step");
        let mut previous = 0.0;
        for &share in &self.ladder {
            anyhow::ensure!(
                share > previous && share < 1.0,
                "--ladder shares must rise strictly within (0, 1): {:?}",
                self.ladder
            );
            previous = share;
        }
        anyhow::ensure!(
            self.stable_variant != self.canary_variant,
            "--stable-variant and --canary-variant must differ"
        );
        for variant in [&self.stable_variant, &self.canary_variant] {
            anyhow::ensure!(
                kalon_registry::store::valid_name(variant),
                "variant {variant:?} must be 1-64 characters of A-Z a-z 0-9 . _ -"
            );
        }
        anyhow::ensure!(!self.evidence.is_empty(), "--evidence names no kind");
        anyhow::ensure!(
            (0.0..=1.0).contains(&self.interleave),
            "--interleave must be in [0, 1]"
        );
        anyhow::ensure!(
            !self.uses(Evidence::Interleaving) || self.interleave > 0.0,
            "interleaving evidence needs --interleave above 0"
        );
        anyhow::ensure!(
            self.alpha > 0.0 && self.alpha < 0.5,
            "--alpha must be in (0, 0.5)"
        );
        for (flag, margin) in [
            ("--margin", self.margin),
            ("--preference-margin", self.preference_margin),
        ] {
            anyhow::ensure!((0.0..1.0).contains(&margin), "{flag} must be in [0, 1)");
        }
        anyhow::ensure!(self.tick_ms >= 50, "--tick-ms must be at least 50");
        anyhow::ensure!(self.p99_ratio >= 1.0, "--p99-ratio must be at least 1");
        anyhow::ensure!(self.lmm_k >= 1, "--lmm-k must be at least 1");
        anyhow::ensure!(
            !self.uses(Evidence::Lmm) || !self.search_url.is_empty(),
            "lmm evidence needs --search-url (the judge's rows come from pinned searches)"
        );
        for url in &self.search_url {
            anyhow::ensure!(
                url.starts_with("http://") || url.starts_with("https://"),
                "--search-url {url:?} is not an http(s) URL"
            );
        }
        self.consumer.validate()?;
        self.kafka.validate()
    }
}
