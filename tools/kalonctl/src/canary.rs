//! `kalonctl canary`: the canary controller's state, decisions and the
//! evidence behind them, and operators' overrides (recorded with who and
//! why; the running controller applies them within a tick).

use kalon_canary::ops;
use kalon_events::CanaryAction;

use crate::Endpoints;

#[derive(clap::Subcommand, Clone, Debug)]
pub enum CanaryCommand {
    /// The canary in flight (else the latest): step, share, the last
    /// decision with every figure behind it, and its moves.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// The latest canaries with their decisions.
    History {
        #[arg(long, default_value_t = 10)]
        limit: i64,
        /// Include the holds (every look that changed nothing).
        #[arg(long)]
        holds: bool,
        #[arg(long)]
        json: bool,
    },
    /// Promote the canary in flight now.
    Promote(Override),
    /// Roll the canary in flight back now (its traffic goes to zero).
    Rollback(Override),
    /// Freeze the canary at its step (no automatic decision until resumed).
    Pause(Override),
    Resume(Override),
}

#[derive(clap::Args, Clone, Debug)]
pub struct Override {
    /// Why (recorded with the decision).
    #[arg(long)]
    pub reason: String,
    /// Who [default: $USER, else kalonctl]
    #[arg(long)]
    pub actor: Option<String>,
    /// The candidate you mean: refused if another is in flight.
    #[arg(long)]
    pub candidate: Option<String>,
}

pub async fn run(endpoints: &Endpoints, command: &CanaryCommand) -> anyhow::Result<()> {
    let pool = kalon_db::connect(&endpoints.database_url, 2).await?;
    kalon_db::check_schema(&pool).await?;
    let (action, args) = match command {
        CanaryCommand::Status { json } => {
            let report = ops::status(&pool).await?;
            match (report, json) {
                (report, true) => println!("{}", serde_json::to_string_pretty(&report)?),
                (Some(report), false) => print!("{}", ops::render(&report)),
                (None, false) => println!(
                    "no canary yet: the controller starts one when a version registers with a passed gate"
                ),
            }
            return Ok(());
        }
        CanaryCommand::History { limit, holds, json } => {
            let reports = ops::history(&pool, (*limit).clamp(1, 100), *holds).await?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&reports)?);
            } else if reports.is_empty() {
                println!("no canary yet");
            } else {
                for report in &reports {
                    println!("{}", ops::render(report));
                }
            }
            return Ok(());
        }
        CanaryCommand::Promote(args) => (CanaryAction::Promote, args),
        CanaryCommand::Rollback(args) => (CanaryAction::Rollback, args),
        CanaryCommand::Pause(args) => (CanaryAction::Pause, args),
        CanaryCommand::Resume(args) => (CanaryAction::Resume, args),
    };
    let actor = args
        .actor
        .clone()
        .or_else(|| std::env::var("USER").ok().filter(|u| !u.is_empty()))
        .unwrap_or_else(|| "kalonctl".into());
    let row = ops::override_canary(
        &pool,
        action,
        args.candidate.as_deref(),
        &actor,
        &args.reason,
    )
    .await?;
    println!(
        "recorded: {} of canary {} ({}) by {}; the controller applies it within a tick",
        row.action.as_str(),
        row.canary_id,
        row.candidate,
        row.actor
    );
    Ok(())
}
