//! The trainer's process, shared by the `kalon-trainer` program and
//! `kalonctl serve trainer`. Run several: one leads.

use kalon_llm::LlmConfig;

use crate::{Trainer, TrainerConfig};

// (no `///` on it: clap would show that as the long help instead of `about`)
#[derive(clap::Parser, Debug)]
#[command(
    version,
    about = "Kalon trainer: scheduled Ranked DPO on the preference pairs, gated, registered and announced"
)]
pub struct Cli {
    #[command(flatten)]
    pub config: TrainerConfig,
}

/// Runs the service as its program does: telemetry as `kalon-trainer`, the
/// settings logged, the LMM judge when `KALON_LLM_BASE_URL` is set, the
/// health endpoints served, working until SIGTERM or Ctrl-C.
pub async fn serve(cli: Cli) -> anyhow::Result<()> {
    let _telemetry = kalon_telemetry::init("kalon-trainer")?;
    kalon_service::log_settings(&cli.config);
    let health_addr = cli.config.health_addr;
    let mut trainer = Trainer::build(cli.config).await?;
    // the offline gate's LMM judge: the same KALON_LLM_* settings as the enricher's
    if let Some(llm) = LlmConfig::from_env_if_set()? {
        kalon_service::log_settings(&llm.redacted());
        trainer = trainer.with_judge(llm)?;
    } else {
        tracing::info!("no KALON_LLM_BASE_URL: the offline gate runs without the LMM judge");
    }
    kalon_telemetry::health::serve(health_addr, trainer.readiness()).await?;
    trainer.run(kalon_telemetry::shutdown_signal()).await
}
