//! The canary controller's process, shared by the `kalon-canary` program and
//! `kalonctl serve canary`. Run several: one leads the decisions (advisory
//! lock), all read `model.registered.v1` and serve the admin API.

use kalon_llm::LlmConfig;

use crate::{CanaryConfig, Controller};

// (no `///` on it: clap would show that as the long help instead of `about`)
#[derive(clap::Parser, Debug)]
#[command(
    version,
    about = "Kalon canary controller: rolls registered model versions out step by step and promotes or rolls them back on online evidence"
)]
pub struct Cli {
    #[command(flatten)]
    pub config: CanaryConfig,
}

/// Runs the service as its program does: telemetry as `kalon-canary`, the
/// settings logged, the LMM judge when `KALON_LLM_BASE_URL` is set, the
/// health endpoints and the admin API served, working until SIGTERM or
/// Ctrl-C.
pub async fn serve(cli: Cli) -> anyhow::Result<()> {
    let _telemetry = kalon_telemetry::init("kalon-canary")?;
    kalon_service::log_settings(&cli.config);
    let health_addr = cli.config.consumer.health_addr;
    let llm = LlmConfig::from_env_if_set()?;
    if let Some(llm) = &llm {
        kalon_service::log_settings(&llm.redacted());
    }
    let controller = Controller::build(cli.config, llm).await?;
    kalon_telemetry::health::serve(health_addr, controller.readiness()).await?;
    controller.run(kalon_telemetry::shutdown_signal()).await
}
