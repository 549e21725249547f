//! `kalon-bench preferences`: the preference builder's click and rating
//! passes over a million pre-ingested events, beside ingest's own drain of
//! the same events in the same run (the builder must never fall behind).

use std::time::Instant;

use clap::Args;
use kalon_preferences::clicks::{self, Timing};
use kalon_preferences::ratings;
use kalonctl::Globals;

#[derive(Clone, Debug, Args)]
pub struct PreferencesBenchArgs {
    /// Events pre-produced, ingested, then built from (60% impressions,
    /// 35% clicks, 5% ratings).
    #[arg(long, default_value_t = 1_000_000)]
    pub events: u64,
    /// Result lists (or rated queries) per transaction (the service's default).
    #[arg(long, default_value_t = 5000)]
    pub batch: usize,
}

pub async fn run(cli: &Globals, args: &PreferencesBenchArgs) -> anyhow::Result<()> {
    let landed = crate::land(cli, args.events, 4, 2000).await?;
    let pool = &landed.pool;
    // the catalog the generated events name, so ratings are of known images
    let ids: Vec<String> = (0..100_000).map(|i| format!("img-{i:06}")).collect();
    kalon_registry::store::register_version(pool, "ref-v1", "/bench/ref-v1", None, 2).await?;
    kalon_registry::store::store_embeddings(pool, "ref-v1", &ids, &vec![0.5; ids.len() * 2], 2)
        .await?;
    // fresh statistics, as autovacuum would have them on a live database
    sqlx::query("ANALYZE").execute(pool).await?;
    let [impressions, clicked, rated] = kalonctl::events::count_all(pool).await?;
    eprintln!("building from {impressions} impressions, {clicked} clicks, {rated} ratings");
    let timing = Timing {
        quiet: chrono::Duration::zero(),
        expire_after: chrono::Duration::zero(),
        lookback: chrono::Duration::days(3650),
    };
    let prior = kalon_align::feedback::Propensity::default();
    let started = Instant::now();
    let click_pass = clicks::pass(pool, timing, args.batch, &prior).await?;
    let click_s = started.elapsed().as_secs_f64();
    let rating_start = Instant::now();
    let rating_pass = ratings::pass(pool, timing.lookback, args.batch, Default::default()).await?;
    let rating_s = rating_start.elapsed().as_secs_f64();
    let seconds = started.elapsed().as_secs_f64();
    // a pass with nothing new: the steady-state cost of looking
    let idle_start = Instant::now();
    let idle = clicks::pass(pool, timing, args.batch, &prior).await?;
    ratings::pass(pool, timing.lookback, args.batch, Default::default()).await?;
    let idle_s = idle_start.elapsed().as_secs_f64();
    anyhow::ensure!(
        idle.clicks == 0,
        "a second pass found {} clicks again",
        idle.clicks
    );
    let pairs = click_pass.new_pairs + rating_pass.new_pairs;
    let events = args.events as f64;
    let rate = events / seconds;
    eprintln!(
        "clicks: {} marked ({} refused), {} lists, {} pairs in {click_s:.2}s",
        click_pass.clicks,
        click_pass.refused.values().sum::<u64>(),
        click_pass.lists,
        click_pass.new_pairs
    );
    eprintln!(
        "ratings: {} marked ({} refused), {} query/aspect groups, {} pairs in {rating_s:.2}s",
        rating_pass.ratings,
        rating_pass.refused.values().sum::<u64>(),
        rating_pass.groups,
        rating_pass.new_pairs
    );
    eprintln!(
        "builder: {} events in {seconds:.2}s = {rate:.0} events/s, {:.0} pairs/s; ingest drained them at {:.0} events/s; an idle pass takes {idle_s:.2}s",
        args.events,
        pairs as f64 / seconds,
        landed.rate
    );
    let line = serde_json::json!({
        "bench": "preferences",
        "events": args.events,
        "events_per_s": rate.round(),
        "pairs": pairs,
        "pairs_per_s": (pairs as f64 / seconds).round(),
        "click_pairs": click_pass.new_pairs,
        "rating_pairs": rating_pass.new_pairs,
        "seconds": (seconds * 100.0).round() / 100.0,
        "idle_pass_s": (idle_s * 100.0).round() / 100.0,
        "ingest_events_per_s": landed.rate.round(),
        "ratio": (rate / landed.rate * 100.0).round() / 100.0,
    });
    landed.finish().await?;
    println!("{line}");
    Ok(())
}
