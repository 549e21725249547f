//! `kalon-ingest`: the ingest service's process. Parses flags, starts
//! telemetry and the health endpoints, runs until SIGTERM or Ctrl-C.

use clap::Parser;
use kalon_ingest::{Ingest, IngestConfig};

#[derive(Parser)]
#[command(
    version,
    about = "Kalon ingest: search events from Kafka into Postgres"
)]
struct Cli {
    #[command(flatten)]
    config: IngestConfig,
}

// Ingest allocates and frees many small strings per event; mimalloc handles
// that pattern markedly faster than glibc malloc (see `kalon-bench ingest`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let _telemetry = kalon_telemetry::init("kalon-ingest")?;
    kalon_service::log_settings(&cli.config);
    let health_addr = cli.config.consumer.health_addr;
    let ingest = Ingest::build(cli.config).await?;
    let readiness = std::sync::Arc::new(ingest.consuming().readiness());
    kalon_telemetry::health::serve(health_addr, readiness).await?;
    ingest.run(kalon_telemetry::shutdown_signal()).await?;
    Ok(())
}
