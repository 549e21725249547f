//! The main job at this stage: bring the stack up, produce a stream of
//! generated events (with a few malformed ones), ingest them with the real
//! ingest pipeline, and show what landed; then pretrain the reference model
//! on a small simulated world, align it with Ranked DPO (the world's LMM
//! judge as the teacher) and print the pretrained-vs-aligned table.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use clap::Args;
use kalon_ingest::{Ingest, IngestConfig};

use crate::events::{self, count_landed};
use crate::{tools, Globals};

#[derive(Args)]
pub struct DemoArgs {
    /// Valid events to produce.
    #[arg(long, default_value_t = 50_000)]
    pub events: u64,
    /// Malformed payloads mixed in; they end in the dead-letter topic.
    #[arg(long, default_value_t = 50)]
    pub malformed: u64,
    /// Skip the alignment part.
    #[arg(long)]
    pub no_align: bool,
    /// The small world the alignment part builds, pretrains on and aligns.
    #[arg(long, default_value_t = 1)]
    pub world_seed: u64,
    #[arg(long, default_value_t = 3_000)]
    pub world_images: usize,
    #[command(flatten)]
    pub align: crate::align::AlignArgs,
}

pub async fn run(cli: &Globals, args: &DemoArgs) -> anyhow::Result<()> {
    tools::announce_first_run(!args.no_align && !cli.state_dir.join("models").is_dir());
    if !args.no_align {
        // before anything long: the alignment part runs the models in it
        tokio::task::spawn_blocking(tools::ensure_onnxruntime).await??;
    }
    let endpoints = crate::stack_up(
        cli.database_url.as_deref(),
        cli.brokers.as_deref(),
        &cli.state_dir,
        &cli.topic_prefix,
    )
    .await?;
    let pool = kalon_db::connect(&endpoints.database_url, 2).await?;

    let config = IngestConfig::new(
        &endpoints.database_url,
        &endpoints.kafka.brokers,
        &cli.topic_prefix,
    );
    let ingest = Ingest::build(config).await?;
    let handled = ingest.handled();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(ingest.run(async {
        let _ = stopped.await;
    }));

    let seed = events::clock_seed();
    let generated = events::generate(&endpoints.kafka, args.events, args.malformed, seed);
    let ids = generated.ids.clone();
    let started = Instant::now();
    events::send(&endpoints.kafka, generated.messages).await?;
    let pool_ref = &pool;
    let ids_ref = &ids;
    events::wait_landed(args.events, Duration::from_secs(300), || async move {
        Ok(count_landed(pool_ref, ids_ref).await?.iter().sum())
    })
    .await?;
    let elapsed = started.elapsed();
    // let ingest commit the last dead letters' batch before stopping
    let target = args.events + args.malformed;
    let wait_dlq = Instant::now();
    while handled.load(Ordering::Relaxed) < target && wait_dlq.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = stop.send(());
    let report = running.await??;

    let landed = count_landed(&pool, &ids).await?;
    println!();
    println!("{:<22} {:>10} {:>11}", "event", "produced", "in postgres");
    for (i, kind) in kalon_events::EventKind::ALL.iter().enumerate() {
        println!(
            "{:<22} {:>10} {:>11}",
            kind.topic(),
            ids[i].len(),
            landed[i]
        );
    }
    println!(
        "{:<22} {:>10} {:>11}  (dead-letter topic {})",
        "malformed",
        args.malformed,
        report.dead_letters,
        endpoints.kafka.topic(kalon_events::DEAD_LETTER_TOPIC)
    );
    println!(
        "\nproduced and ingested {} events in {:.2}s ({:.0} events/s end to end)",
        args.events,
        elapsed.as_secs_f64(),
        args.events as f64 / elapsed.as_secs_f64()
    );

    let sample: Vec<(String, String, i32)> = sqlx::query_as(
        "SELECT i.query, i.variant, c.rank FROM clicks c JOIN impressions i USING (request_id) \
         WHERE c.event_id = ANY($1) ORDER BY c.occurred_at LIMIT 5",
    )
    .bind(&ids[1])
    .fetch_all(&pool)
    .await?;
    println!("\na few clicks joined to their impressions:");
    for (query, variant, rank) in sample {
        println!("  {query:<24} variant={variant:<7} clicked rank {rank}");
    }
    println!(
        "\nthe stack stays up for you (`kalonctl stack status`, `kalonctl stack down`); \
         DATABASE_URL={}",
        endpoints.database_url
    );
    anyhow::ensure!(
        landed.iter().sum::<u64>() == args.events,
        "not every event landed"
    );
    if !args.no_align {
        println!(
            "\nalignment on a small simulated world (seed {}, {} images; cached in {}):",
            args.world_seed,
            args.world_images,
            cli.state_dir.display()
        );
        let (state_dir, seed, images, align) = (
            cli.state_dir.clone(),
            args.world_seed,
            args.world_images,
            args.align.clone(),
        );
        tokio::task::spawn_blocking(move || {
            let pretrain = crate::model::PretrainArgs::defaults();
            crate::align::eval_align(&state_dir, seed, images, &pretrain, None, &align, false)
        })
        .await??;
    }
    Ok(())
}
