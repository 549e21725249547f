//! The endpoint's command line, shared by the `kalon-sim-llm` program and
//! `kalonctl sim serve-llm`.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::{FaultRates, SimConfig, SimServer};

/// How the simulated endpoint behaves.
#[derive(Debug, Clone, Args)]
pub struct SimArgs {
    /// The world's seed and catalog size (as `sim generate` made it).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    #[arg(long, default_value_t = 10_000)]
    pub images: usize,
    /// The world's folder, to recognise images sent inline as base64.
    #[arg(long)]
    pub world: Option<PathBuf>,
    /// Latency added to every answer.
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// Log-odds towards the row shown first (0 = no position bias).
    #[arg(long, default_value_t = 1.0)]
    pub position_bias: f64,
    /// Standard deviation of the judge's perception of a row's mean value.
    #[arg(long, default_value_t = 0.02)]
    pub perception_noise: f64,
    /// Chance that a rephrasing picks up a filler word.
    #[arg(long, default_value_t = 0.1)]
    pub rephrase_noise: f64,
    /// Chance that an answer comes wrapped in prose or code fences.
    #[arg(long, default_value_t = 0.2)]
    pub chatty: f64,
    /// Fault rates per request: 429 (with Retry-After), 500, no answer,
    /// a body cut in half, an HTML body, a refusal as the answer.
    #[arg(long, default_value_t = 0.0)]
    pub rate_limited: f64,
    #[arg(long, default_value_t = 0.0)]
    pub server_error: f64,
    #[arg(long, default_value_t = 0.0)]
    pub timeout: f64,
    #[arg(long, default_value_t = 0.0)]
    pub truncated: f64,
    #[arg(long, default_value_t = 0.0)]
    pub garbage: f64,
    #[arg(long, default_value_t = 0.0)]
    pub malformed: f64,
    /// Seconds in the Retry-After header of a 429.
    #[arg(long, default_value_t = 1.0)]
    pub retry_after_s: f64,
    /// Require this bearer token.
    #[arg(long, env = "KALON_SIM_API_KEY", hide_env_values = true)]
    pub api_key: Option<kalon_service::Secret<String>>,
}

impl SimArgs {
    pub fn config(&self) -> anyhow::Result<SimConfig> {
        for (name, p) in [
            ("--rephrase-noise", self.rephrase_noise),
            ("--chatty", self.chatty),
            ("--rate-limited", self.rate_limited),
            ("--server-error", self.server_error),
            ("--timeout", self.timeout),
            ("--truncated", self.truncated),
            ("--garbage", self.garbage),
            ("--malformed", self.malformed),
        ] {
            anyhow::ensure!(
                (0.0..=1.0).contains(&p),
                "{name} {p} is not a probability in [0, 1]"
            );
        }
        anyhow::ensure!(self.images >= 1, "--images must be at least 1");
        anyhow::ensure!(
            self.perception_noise >= 0.0 && self.retry_after_s >= 0.0,
            "--perception-noise and --retry-after-s must not be negative"
        );
        let mut config = SimConfig::new(self.seed, self.images);
        config.world_dir = self.world.clone();
        config.latency = Duration::from_millis(self.latency_ms);
        config.position_bias = self.position_bias;
        config.perception_noise = self.perception_noise;
        config.rephrase_noise = self.rephrase_noise;
        config.chatty = self.chatty;
        config.retry_after_s = self.retry_after_s;
        config.api_key = self.api_key.clone();
        config.faults = FaultRates {
            rate_limited: self.rate_limited,
            server_error: self.server_error,
            timeout: self.timeout,
            truncated: self.truncated,
            garbage: self.garbage,
            malformed: self.malformed,
        };
        Ok(config)
    }
}

/// `kalon-sim-llm` (`kalonctl sim serve-llm`)
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8090")]
    pub listen: String,
    #[command(flatten)]
    pub sim: SimArgs,
}

pub async fn serve(args: &ServeArgs) -> anyhow::Result<()> {
    let config = args.sim.config()?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.listen))?;
    let server = SimServer::start(config, listener).await?;
    eprintln!(
        "simulated LLM/LMM for world seed {} at {} (KALON_LLM_BASE_URL={}); Ctrl-C stops it",
        args.sim.seed,
        server.base_url(),
        server.base_url()
    );
    tokio::select! {
        result = server.wait() => result,
        _ = tokio::signal::ctrl_c() => Ok(()),
    }
}
