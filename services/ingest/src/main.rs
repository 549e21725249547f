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
    ingest.run(shutdown_signal()).await?;
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("failed to install the SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutdown requested");
}
