//! `kalon-preferences`: the preference builder's process. Run several: one
//! leads the click and rating passes, all read the topics and work D_po.

use clap::Parser;
use kalon_preferences::{Builder, PreferencesConfig};

#[derive(Parser)]
#[command(
    version,
    about = "Kalon preference builder: clicks, ratings, LMM judgments and live D_po into weighted preference pairs"
)]
struct Cli {
    #[command(flatten)]
    config: PreferencesConfig,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let _telemetry = kalon_telemetry::init("kalon-preferences")?;
    kalon_service::log_settings(&cli.config);
    let health_addr = cli.config.consumer.health_addr;
    // the LMM teacher: the same KALON_LLM_* settings as the enricher's
    let llm = if std::env::var("KALON_LLM_BASE_URL").is_ok_and(|url| !url.is_empty()) {
        let llm = kalon_llm::LlmConfig::from_env()?;
        kalon_service::log_settings(&kalon_llm::LlmConfig {
            base_url: kalon_db::redact(&llm.base_url),
            ..llm.clone()
        });
        Some(llm)
    } else {
        None
    };
    let builder = Builder::build(cli.config, llm).await?;
    kalon_telemetry::health::serve(health_addr, builder.readiness()).await?;
    builder.run(kalon_telemetry::shutdown_signal()).await
}
