//! `kalon-preferences`: the preference builder's process (see
//! [`kalon_preferences::cli`]).

use clap::Parser;
use kalon_preferences::cli::{serve, Cli};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    serve(Cli::parse()).await
}
