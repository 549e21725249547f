//! The console's process, shared by the `kalon-console` program and
//! `kalonctl serve console`.

use kalon_llm::LlmConfig;

use crate::{Console, ConsoleConfig};

// (no `///` on it: clap would show that as the long help instead of `about`)
#[derive(clap::Parser, Debug)]
#[command(
    version,
    about = "Kalon console: the loop's stages, the canaries and their evidence, two versions side by side, the registry and its lineage"
)]
pub struct Cli {
    #[command(flatten)]
    pub config: ConsoleConfig,
}

/// Runs the console as its program does: telemetry as `kalon-console`,
/// the settings logged, the LMM judge when `KALON_LLM_BASE_URL` is set,
/// serving until SIGTERM or Ctrl-C.
pub async fn serve(cli: Cli) -> anyhow::Result<()> {
    let _telemetry = kalon_telemetry::init("kalon-console")?;
    kalon_service::log_settings(&cli.config);
    let llm = LlmConfig::from_env_if_set()?;
    if let Some(llm) = &llm {
        kalon_service::log_settings(&llm.redacted());
    }
    let console = Console::build(cli.config, llm).await?;
    let listener = console.bind().await?;
    console
        .serve(listener, kalon_telemetry::shutdown_signal())
        .await
}
