//! `kalonctl serve <service>`: one service in this process, from the same
//! code as its own program (each service's `cli` module), so a supervisor
//! (`kalonctl up`) needs only this binary.
//!
//! `serve` must come first on the command line (`kalonctl serve ingest
//! --brokers ...`): the service takes its own flags and environment, and
//! kalonctl's global flags (`--database-url`, `--brokers`, `--topic-prefix`)
//! share their names, so `main` parses `serve` without them.

use clap::Subcommand;

/// The services `kalonctl serve` runs.
#[derive(Subcommand, Debug)]
pub enum Service {
    /// The ingest service: search events from Kafka into Postgres.
    Ingest(kalon_ingest::cli::Cli),
    /// The enricher: LLM query rephrasings and LMM judgments (needs `KALON_LLM_BASE_URL`).
    Enricher(kalon_enricher::cli::Cli),
    /// The search service: text-to-image search with canary routing.
    Search(kalon_search::cli::Cli),
    /// The trainer: scheduled Ranked DPO on the preference pairs, gated and registered.
    Trainer(kalon_trainer::cli::Cli),
    /// The preference builder: clicks, ratings, LMM judgments and live D_po into preference pairs.
    Preferences(kalon_preferences::cli::Cli),
    /// The canary controller: rolls model versions out and promotes or rolls them back.
    Canary(kalon_canary::cli::Cli),
    /// The console: the loop's stages, canaries and their evidence, two versions side by side.
    Console(kalon_console::cli::Cli),
}

/// Runs `service` until SIGTERM or Ctrl-C, exactly as its own program does
/// (telemetry under the service's own name included).
pub async fn run(service: Service) -> anyhow::Result<()> {
    match service {
        Service::Ingest(cli) => kalon_ingest::cli::serve(cli).await,
        Service::Enricher(cli) => kalon_enricher::cli::serve(cli).await,
        Service::Search(cli) => kalon_search::cli::serve(cli).await,
        Service::Trainer(cli) => kalon_trainer::cli::serve(cli).await,
        Service::Preferences(cli) => kalon_preferences::cli::serve(cli).await,
        Service::Canary(cli) => kalon_canary::cli::serve(cli).await,
        Service::Console(cli) => kalon_console::cli::serve(cli).await,
    }
}
