//! `kalonctl pairs`: what the preference builder made.

use kalon_preferences::store;

use crate::Endpoints;

#[derive(clap::Subcommand, Clone, Debug)]
pub enum PairsAction {
    /// Pairs by source, by day and by serving version; refused inputs by
    /// reason; the D_po queue; the position-bias estimate in use.
    Stats {
        /// Days shown in the by-day table.
        #[arg(long, default_value_t = 14)]
        days: i64,
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(endpoints: &Endpoints, action: &PairsAction) -> anyhow::Result<()> {
    let pool = kalon_db::connect(&endpoints.database_url, 2).await?;
    kalon_db::check_schema(&pool).await?;
    match action {
        PairsAction::Stats { days, json } => {
            let stats = store::stats(&pool, *days).await?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&stats)?);
            } else {
                print!("{}", render(&stats));
            }
        }
    }
    Ok(())
}

/// The stats as tables for people.
pub fn render(stats: &store::Stats) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let total: i64 = stats.by_source.iter().map(|(_, n)| n).sum();
    let _ = writeln!(out, "preference pairs: {total}");
    if total == 0 {
        let _ = writeln!(
            out,
            "  none yet: kalon-preferences builds them from clicks, ratings, judgments and rephrased queries"
        );
    }
    for (source, count) in &stats.by_source {
        let _ = writeln!(out, "  {source:<10} {count:>10}");
    }
    if !stats.by_day.is_empty() {
        let _ = writeln!(out, "\nby day (created):");
        for (day, source, count) in &stats.by_day {
            let _ = writeln!(out, "  {day}  {source:<10} {count:>10}");
        }
    }
    if !stats.by_version.is_empty() {
        let _ = writeln!(out, "\nby serving version:");
        for (version, source, count) in &stats.by_version {
            let version = version.as_deref().unwrap_or("(not from a served list)");
            let _ = writeln!(out, "  {version:<32} {source:<10} {count:>10}");
        }
    }
    if !stats.refused.is_empty() {
        let _ = writeln!(out, "\nrefused inputs:");
        for (source, reason, count) in &stats.refused {
            let _ = writeln!(out, "  {source:<10} {reason:<28} {count:>10}");
        }
    }
    if !stats.dpo_queue.is_empty() {
        let _ = writeln!(out, "\nD_po queue:");
        for (state, count) in &stats.dpo_queue {
            let _ = writeln!(out, "  {state:<10} {count:>10}");
        }
    }
    match &stats.propensity {
        None => {
            let _ = writeln!(
                out,
                "\nposition bias: not estimated yet (click pairs use the prior 1/rank^eta)"
            );
        }
        Some(p) => {
            let _ = writeln!(
                out,
                "\nposition bias ({}, {} impressions, {} clicks, at {}):",
                p["method"].as_str().unwrap_or("?"),
                p["impressions"],
                p["clicks"],
                p["estimated_at"].as_str().unwrap_or("?")
            );
            let _ = writeln!(out, "  rank  propensity  interval          interventions");
            for rank in p["estimate"]["ranks"].as_array().into_iter().flatten() {
                let fmt = |v: &serde_json::Value| {
                    v.as_f64()
                        .map(|x| format!("{x:.3}"))
                        .unwrap_or_else(|| "-".into())
                };
                let _ = writeln!(
                    out,
                    "  {:>4}  {:>10}  [{:>6}, {:>6}]  {:>13}",
                    rank["rank"],
                    fmt(&rank["theta"]),
                    fmt(&rank["low"]),
                    fmt(&rank["high"]),
                    rank["interventions"]
                );
            }
        }
    }
    out
}
