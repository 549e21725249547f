//! `kalon-search`: the search service's process (see [`kalon_search::cli`]).

use clap::Parser;
use kalon_search::cli::{serve, Cli};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    serve(Cli::parse()).await
}
