//! The preference builder's process, shared by the `kalon-preferences`
//! program and `kalonctl serve preferences`. Run several: one leads the
//! click and rating passes, all read the topics and work D_po.

use kalon_llm::LlmConfig;

use crate::{Builder, PreferencesConfig};

// (no `///` on it: clap would show that as the long help instead of `about`)
#[derive(clap::Parser, Debug)]
#[command(
    version,
    about = "Kalon preference builder: clicks, ratings, LMM judgments and live D_po into weighted preference pairs"
)]
pub struct Cli {
    #[command(flatten)]
    pub config: PreferencesConfig,
}

/// Runs the service as its program does: telemetry as `kalon-preferences`,
/// the settings logged, the LMM teacher when `KALON_LLM_BASE_URL` is set,
/// the health endpoints served, working until SIGTERM or Ctrl-C.
pub async fn serve(cli: Cli) -> anyhow::Result<()> {
    let _telemetry = kalon_telemetry::init("kalon-preferences")?;
    kalon_service::log_settings(&cli.config);
    let health_addr = cli.config.consumer.health_addr;
    // the LMM teacher: the same KALON_LLM_* settings as the enricher's
    let llm = LlmConfig::from_env_if_set()?;
    if let Some(llm) = &llm {
        kalon_service::log_settings(&llm.redacted());
    }
    let builder = Builder::build(cli.config, llm).await?;
    kalon_telemetry::health::serve(health_addr, builder.readiness()).await?;
    builder.run(kalon_telemetry::shutdown_signal()).await
}
