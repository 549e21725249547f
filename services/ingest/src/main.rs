//! `kalon-ingest`: the ingest service's process (see [`kalon_ingest::cli`]).

use clap::Parser;
use kalon_ingest::cli::{serve, Cli};

// Ingest allocates and frees many small strings per event; mimalloc handles
// that pattern markedly faster than glibc malloc (see `kalon-bench ingest`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    serve(Cli::parse()).await
}
