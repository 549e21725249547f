//! `kalon-canary`: the canary controller's process. Run several: one leads
//! the decisions (advisory lock), all read `model.registered.v1` and serve
//! the admin API.

use clap::Parser;
use kalon_canary::{CanaryConfig, Controller};

#[derive(Parser)]
#[command(
    version,
    about = "Kalon canary controller: rolls registered model versions out step by step and promotes or rolls them back on online evidence"
)]
struct Cli {
    #[command(flatten)]
    config: CanaryConfig,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let _telemetry = kalon_telemetry::init("kalon-canary")?;
    kalon_service::log_settings(&cli.config);
    let health_addr = cli.config.consumer.health_addr;
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
    let controller = Controller::build(cli.config, llm).await?;
    kalon_telemetry::health::serve(health_addr, controller.readiness()).await?;
    controller.run(kalon_telemetry::shutdown_signal()).await
}
