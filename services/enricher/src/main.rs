//! `kalon-enricher`: the enricher's process. LLM settings come from
//! `KALON_LLM_*` (at least `KALON_LLM_BASE_URL`).

use std::net::SocketAddr;

use clap::Parser;
use kalon_enricher::{Enricher, EnricherConfig};
use kalon_llm::LlmConfig;

#[derive(Parser)]
#[command(
    version,
    about = "Kalon enricher: LLM query rephrasings and LMM judgments"
)]
struct Cli {
    #[command(flatten)]
    config: EnricherConfig,
    /// Where `/healthz` and `/readyz` are served (`/readyz` answers 503
    /// while impressions wait and the group does not move); port 0 picks one.
    #[arg(
        long,
        env = "KALON_ENRICHER_HEALTH_ADDR",
        default_value = "127.0.0.1:9182"
    )]
    health_addr: SocketAddr,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let _telemetry = kalon_telemetry::init("kalon-enricher")?;
    let llm = LlmConfig::from_env()?;
    let enricher = Enricher::build(cli.config, llm).await?;
    let readiness = std::sync::Arc::new(enricher.consuming().readiness());
    kalon_telemetry::health::serve(cli.health_addr, readiness).await?;
    enricher.run(kalon_telemetry::shutdown_signal()).await?;
    Ok(())
}
