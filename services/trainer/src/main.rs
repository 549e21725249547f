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
    let trainer = Trainer::build(cli.config).await?;
    kalon_telemetry::health::serve(health_addr, trainer.readiness()).await?;
    trainer.run(kalon_telemetry::shutdown_signal()).await
}
