//! The enricher's process, shared by the `kalon-enricher` program and
//! `kalonctl serve enricher`. LLM settings come from `KALON_LLM_*` (at least
//! `KALON_LLM_BASE_URL`).

use kalon_llm::LlmConfig;

use crate::{Enricher, EnricherConfig};

// (no `///` on it: clap would show that as the long help instead of `about`)
#[derive(clap::Parser, Debug)]
#[command(
    version,
    about = "Kalon enricher: LLM query rephrasings and LMM judgments"
)]
pub struct Cli {
    #[command(flatten)]
    pub config: EnricherConfig,
}

/// Runs the service as its program does: telemetry as `kalon-enricher`, the
/// LLM settings read (an error when `KALON_LLM_BASE_URL` is missing), the
/// settings logged, the health endpoints served, working until SIGTERM or
/// Ctrl-C.
pub async fn serve(cli: Cli) -> anyhow::Result<()> {
    let _telemetry = kalon_telemetry::init("kalon-enricher")?;
    let llm = LlmConfig::from_env()?;
    kalon_service::log_settings(&cli.config);
    kalon_service::log_settings(&llm.redacted());
    let health_addr = cli.config.consumer.health_addr;
    let enricher = Enricher::build(cli.config, llm).await?;
    let readiness = std::sync::Arc::new(enricher.consuming().readiness());
    kalon_telemetry::health::serve(health_addr, readiness).await?;
    enricher.run(kalon_telemetry::shutdown_signal()).await?;
    Ok(())
}
