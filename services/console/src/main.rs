//! `kalon-console`: the console's process (see [`kalon_console::cli`]).

use clap::Parser;
use kalon_console::cli::{serve, Cli};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    serve(Cli::parse()).await
}
