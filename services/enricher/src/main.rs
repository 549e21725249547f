//! `kalon-enricher`: the enricher's process (see [`kalon_enricher::cli`]).

use clap::Parser;
use kalon_enricher::cli::{serve, Cli};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    serve(Cli::parse()).await
}
