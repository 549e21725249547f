//! The search service's process, shared by the `kalon-search` program and
//! `kalonctl serve search`. Parses flags, starts telemetry, serves until
//! SIGTERM or Ctrl-C.

use crate::{Search, SearchConfig};

// (no `///` on it: clap would show that as the long help instead of `about`)
#[derive(clap::Parser, Debug)]
#[command(
    version,
    about = "Kalon search: text-to-image search with canary routing between model versions"
)]
pub struct Cli {
    #[command(flatten)]
    pub config: SearchConfig,
}

/// Runs the service as its program does: telemetry as `kalon-search`, the
/// settings logged, serving until SIGTERM or Ctrl-C.
pub async fn serve(cli: Cli) -> anyhow::Result<()> {
    let _telemetry = kalon_telemetry::init("kalon-search")?;
    kalon_service::log_settings(&cli.config);
    let search = Search::build(cli.config).await?;
    search.run(kalon_telemetry::shutdown_signal()).await
}
