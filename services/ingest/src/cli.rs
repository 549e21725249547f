//! The ingest service's process, shared by the `kalon-ingest` program and
//! `kalonctl serve ingest`. Parses flags, starts telemetry and the health
//! endpoints, runs until SIGTERM or Ctrl-C.

use crate::{Ingest, IngestConfig};

// (no `///` on it: clap would show that as the long help instead of `about`)
#[derive(clap::Parser, Debug)]
#[command(
    version,
    about = "Kalon ingest: search events from Kafka into Postgres"
)]
pub struct Cli {
    #[command(flatten)]
    pub config: IngestConfig,
}

/// Runs the service as its program does: telemetry as `kalon-ingest`, the
/// settings logged, the health endpoints served, consuming until SIGTERM or
/// Ctrl-C.
pub async fn serve(cli: Cli) -> anyhow::Result<()> {
    let _telemetry = kalon_telemetry::init("kalon-ingest")?;
    kalon_service::log_settings(&cli.config);
    let health_addr = cli.config.consumer.health_addr;
    let ingest = Ingest::build(cli.config).await?;
    let readiness = std::sync::Arc::new(ingest.consuming().readiness());
    kalon_telemetry::health::serve(health_addr, readiness).await?;
    ingest.run(kalon_telemetry::shutdown_signal()).await?;
    Ok(())
}
