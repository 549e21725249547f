//! `kalon-trainer`: the trainer's process (see [`kalon_trainer::cli`]).

use clap::Parser;
use kalon_trainer::cli::{serve, Cli};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    serve(Cli::parse()).await
}
