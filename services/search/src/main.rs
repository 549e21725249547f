//! `kalon-search`: the search service's process. Parses flags, starts
//! telemetry, serves until SIGTERM or Ctrl-C.

use clap::Parser;
use kalon_search::{Search, SearchConfig};

#[derive(Parser)]
#[command(
    version,
    about = "Kalon search: text-to-image search with canary routing between model versions"
)]
struct Cli {
    #[command(flatten)]
    config: SearchConfig,
}

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let _telemetry = kalon_telemetry::init("kalon-search")?;
    kalon_service::log_settings(&cli.config);
    let search = Search::build(cli.config).await?;
    search.run(kalon_telemetry::shutdown_signal()).await
}
