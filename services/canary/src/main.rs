//! `kalon-canary`: the canary controller's process (see [`kalon_canary::cli`]).

use clap::Parser;
use kalon_canary::cli::{serve, Cli};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    serve(Cli::parse()).await
}
