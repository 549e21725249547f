//! `kalon-ingest`: the ingest service's process. Parses flags, starts
//! telemetry, runs until SIGTERM or Ctrl-C.

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
// that pattern markedly faster than glibc malloc (see `kalonctl bench ingest`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let _telemetry = kalon_telemetry::init("kalon-ingest")?;
    let ingest = Ingest::build(cli.config).await?;
    ingest.run(kalon_telemetry::shutdown_signal()).await?;
    Ok(())
}
