//! `kalon-trainer`: the trainer's process. Run several: one leads.

use clap::Parser;
use kalon_trainer::{Trainer, TrainerConfig};

#[derive(Parser)]
#[command(
    version,
    about = "Kalon trainer: scheduled Ranked DPO on the preference pairs, gated, registered and announced"
)]
struct Cli {
    #[command(flatten)]
    config: TrainerConfig,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let _telemetry = kalon_telemetry::init("kalon-trainer")?;
    kalon_service::log_settings(&cli.config);
    let health_addr = cli.config.health_addr;
    let mut trainer = Trainer::build(cli.config).await?;
    // the offline gate's LMM judge: the same KALON_LLM_* settings as the enricher's
    if std::env::var("KALON_LLM_BASE_URL").is_ok_and(|url| !url.is_empty()) {
        let llm = kalon_llm::LlmConfig::from_env()?;
        kalon_service::log_settings(&kalon_llm::LlmConfig {
            base_url: kalon_db::redact(&llm.base_url),
            ..llm.clone()
        });
        trainer = trainer.with_judge(llm)?;
    } else {
        tracing::info!("no KALON_LLM_BASE_URL: the offline gate runs without the LMM judge");
    }
    kalon_telemetry::health::serve(health_addr, trainer.readiness()).await?;
    trainer.run(kalon_telemetry::shutdown_signal()).await
}
