//! `kalonctl train now` and `kalonctl runs list | show`: the trainer's
//! triggers and runs (the trainer itself is the `kalon-trainer` service).

use std::time::Duration;

use clap::{Args, Subcommand};
use kalon_trainer::store;

use crate::Endpoints;

#[derive(Clone, Debug, Args)]
pub struct NowArgs {
    /// Why (kept with the trigger and shown in the version's lineage).
    #[arg(long, default_value = "requested by hand")]
    pub reason: String,
    /// Wait for a trainer to finish the run and print it.
    #[arg(long)]
    pub wait: bool,
    /// With --wait: give up after this many seconds.
    #[arg(long, default_value_t = 3600)]
    pub timeout_s: u64,
    #[arg(long)]
    pub json: bool,
}

#[derive(Clone, Debug, Subcommand)]
pub enum RunsAction {
    /// The newest training runs.
    List {
        #[arg(long, default_value_t = 20)]
        limit: i64,
        #[arg(long)]
        json: bool,
    },
    /// One run: its trigger, window, pairs by source, config, device,
    /// progress, timings and gate.
    Show {
        run: uuid::Uuid,
        #[arg(long)]
        json: bool,
    },
}

fn requester() -> String {
    let user = std::env::var("USER").unwrap_or_else(|_| "someone".into());
    format!("kalonctl train now ({user})")
}

/// Asks the trainers to train now (the leader picks it up).
pub async fn now(endpoints: &Endpoints, args: &NowArgs) -> anyhow::Result<()> {
    let pool = kalon_db::connect(&endpoints.database_url, 2).await?;
    kalon_db::check_schema(&pool).await?;
    let id = store::request_manual(&pool, &requester(), &args.reason).await?;
    if !args.wait {
        if args.json {
            println!("{}", serde_json::json!({ "trigger": id }));
        } else {
            println!("training requested: trigger {id} (a running kalon-trainer picks it up; `kalonctl runs list` follows it)");
        }
        return Ok(());
    }
    eprintln!("trigger {id}: waiting for a kalon-trainer to run it");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout_s);
    loop {
        if let Some((state, _)) = store::trigger_state(&pool, &id).await? {
            if state != "pending" {
                let runs = store::runs_of(&pool, &id).await?;
                if args.json {
                    println!(
                        "{}",
                        serde_json::json!({ "trigger": id, "state": state, "runs": runs })
                    );
                } else {
                    println!("trigger {id}: {state}");
                    for run in &runs {
                        print!("{}", render(run));
                    }
                }
                anyhow::ensure!(state == "done", "trigger {id} ended {state}");
                return Ok(());
            }
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "trigger {id} still pending after {} s: is a kalon-trainer running against this database?",
            args.timeout_s
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn render(run: &store::Run) -> String {
    let mut out = format!(
        "run {}  {}  attempt {} of {}\n",
        run.id, run.state, run.attempt, run.trigger_id
    );
    let line = |out: &mut String, name: &str, value: String| {
        out.push_str(&format!("  {name:<10} {value}\n"));
    };
    if let Some(reason) = &run.reason {
        line(&mut out, "reason", reason.clone());
    }
    line(
        &mut out,
        "parent",
        run.parent_version.clone().unwrap_or_else(|| "-".into()),
    );
    line(
        &mut out,
        "version",
        run.model_version.clone().unwrap_or_else(|| "-".into()),
    );
    if let (Some(start), Some(end)) = (run.window_start, run.window_end) {
        line(&mut out, "window", format!("{start} .. {end}"));
    }
    line(&mut out, "pairs", run.pair_counts.to_string());
    line(
        &mut out,
        "device",
        run.device.clone().unwrap_or_else(|| "-".into()),
    );
    line(&mut out, "progress", run.progress.to_string());
    line(&mut out, "seconds", run.timings.to_string());
    if let Some(gate) = &run.gate {
        line(
            &mut out,
            "gate",
            format!(
                "{} {}",
                if gate["passed"] == true {
                    "passed"
                } else {
                    "FAILED"
                },
                gate["checks"]
                    .as_array()
                    .map(|checks| checks
                        .iter()
                        .map(|c| format!(
                            "{} {:+.3}",
                            c["metric"].as_str().unwrap_or("?"),
                            c["change"].as_f64().unwrap_or(f64::NAN)
                        ))
                        .collect::<Vec<_>>()
                        .join(", "))
                    .unwrap_or_default()
            ),
        );
    }
    line(
        &mut out,
        "owner",
        format!(
            "{} (started {}, finished {})",
            run.owner,
            run.started_at,
            run.finished_at
                .map(|t| t.to_string())
                .unwrap_or_else(|| "-".into())
        ),
    );
    out
}

pub async fn runs(endpoints: &Endpoints, action: &RunsAction) -> anyhow::Result<()> {
    let pool = kalon_db::connect(&endpoints.database_url, 2).await?;
    kalon_db::check_schema(&pool).await?;
    match action {
        RunsAction::List { limit, json } => {
            let runs = store::runs(&pool, *limit).await?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&runs)?);
            } else if runs.is_empty() {
                println!("no training runs yet (`kalonctl train now` asks for one)");
            } else {
                println!(
                    "{:<36}  {:<11}  {:<28}  {:<30}  started",
                    "run", "state", "trigger", "version"
                );
                for run in runs {
                    println!(
                        "{:<36}  {:<11}  {:<28}  {:<30}  {}",
                        run.id,
                        run.state,
                        run.trigger_id,
                        run.model_version.as_deref().unwrap_or("-"),
                        run.started_at.format("%Y-%m-%d %H:%M:%S")
                    );
                }
            }
        }
        RunsAction::Show { run, json } => {
            let found = store::run(&pool, *run).await?.ok_or_else(|| {
                anyhow::anyhow!("no training run {run} (`kalonctl runs list` shows them)")
            })?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&found)?);
            } else {
                print!("{}", render(&found));
            }
        }
    }
    Ok(())
}
