//! `kalon-enricher`: the enricher's process. LLM settings come from
//! `KALON_LLM_*` (at least `KALON_LLM_BASE_URL`).

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
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let _telemetry = kalon_telemetry::init("kalon-enricher")?;
    let llm = LlmConfig::from_env()?;
    kalon_service::log_settings(&cli.config);
    // the endpoint may carry a key in its URL (a proxy's `?api-key=`)
    kalon_service::log_settings(&kalon_llm::LlmConfig {
        base_url: kalon_db::redact(&llm.base_url),
        ..llm.clone()
    });
    let health_addr = cli.config.consumer.health_addr;
    let enricher = Enricher::build(cli.config, llm).await?;
    let readiness = std::sync::Arc::new(enricher.consuming().readiness());
    kalon_telemetry::health::serve(health_addr, readiness).await?;
    enricher.run(kalon_telemetry::shutdown_signal()).await?;
    Ok(())
}
