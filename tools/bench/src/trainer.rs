//! `kalon-bench trainer`: from a trigger to a registered version, through
//! the trainer service's own code path (in process), on the reference model
//! and a world's oracle preferences; split into the run's phases.

use std::time::{Duration, Instant};

use clap::Args;
use kalon_align::{PairSource, PreferencePair};
use kalon_kafka::KafkaSettings;
use kalon_stack::{tools, Broker, Storage};
use kalon_trainer::{store, Trainer, TrainerConfig};
use kalonctl::model::{prepare, PretrainArgs};
use kalonctl::Globals;

#[derive(Clone, Debug, Args)]
pub struct TrainerBenchArgs {
    /// World (and pretrained model) seed, built when missing.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    #[arg(long, default_value_t = 10_000)]
    pub images: usize,
    /// Preference pairs in the data window (the world's oracle's).
    #[arg(long, default_value_t = 20_000)]
    pub pairs: usize,
    /// Training steps (the trainer's default).
    #[arg(long, default_value_t = 300)]
    pub steps: usize,
}

pub async fn run(cli: &Globals, args: &TrainerBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.pairs > 0, "--pairs must be positive");
    let endpoints = kalonctl::stack_up(
        cli.database_url.as_deref(),
        cli.brokers.as_deref(),
        &cli.state_dir,
        "",
    )
    .await?;
    let (state_dir, seed, images) = (cli.state_dir.clone(), args.seed, args.images);
    let prepared = tokio::task::spawn_blocking(move || {
        prepare(
            &state_dir,
            seed,
            images,
            None,
            false,
            &PretrainArgs::defaults(),
        )
    })
    .await??;

    let tag = format!("{:08x}", rand::random::<u32>());
    let dir = tempfile::tempdir()?;
    let binary = tokio::task::spawn_blocking(tools::install_tansu).await??;
    let broker = Broker::start(
        &binary,
        kalon_stack::free_port(),
        Storage::Memory,
        dir.path(),
    )?;
    let kafka = KafkaSettings::new(broker.address(), format!("bench{tag}."));
    kalon_kafka::create_topics(&kafka).await?;
    let database_url =
        kalon_db::with_database(&endpoints.database_url, &format!("kalon_bench_{tag}"));
    kalonctl::migrate(&database_url).await?;
    let pool = kalon_db::connect(&database_url, 2).await?;

    // the pretrained model, promoted; the window's pairs
    let manifest = kalon_encoder::Manifest::load(&prepared.model)?;
    kalon_registry::store::register_version(
        &pool,
        "base",
        &prepared.model.display().to_string(),
        None,
        manifest.embedding_dim,
    )
    .await?;
    kalon_registry::lifecycle::promote(
        &pool,
        "base",
        "kalon-bench",
        "the benchmark's parent",
        serde_json::json!({}),
    )
    .await?;
    let pairs: Vec<PreferencePair> = kalon_world::oracle_pairs(seed, images, args.pairs, 0.1, 7)
        .into_iter()
        .map(|p| PreferencePair {
            query: p.query,
            winner: p.better,
            loser: p.worse,
            source: PairSource::Rating,
            weight: 1.0,
            provenance: serde_json::json!({}),
        })
        .collect();
    store::insert_pairs(&pool, &pairs).await?;

    let mut config = TrainerConfig::new(
        &database_url,
        &kafka.brokers,
        &kafka.topic_prefix,
        &prepared.world.display().to_string(),
    );
    config.work_dir = dir.path().join("trainer");
    config.steps = args.steps;
    config.poll_ms = 100;
    config.schedule = "0 0 0 1 1 *".into();
    eprintln!(
        "bench trainer: {} pairs, {} steps, world seed {seed} ({images} images), the reference model",
        pairs.len(),
        args.steps
    );
    let trainer = Trainer::build(config).await?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(trainer.run(async {
        let _ = stopped.await;
    }));
    let requested = Instant::now();
    let trigger = store::request_manual(&pool, "kalon-bench", "bench trainer").await?;
    let state = loop {
        match store::trigger_state(&pool, &trigger).await? {
            Some((state, _)) if state != "pending" => break state,
            _ => {}
        }
        anyhow::ensure!(
            requested.elapsed() < Duration::from_secs(3600),
            "the run took over an hour"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let wall = requested.elapsed().as_secs_f64();
    let _ = stop.send(());
    running.await??;
    let run = store::runs_of(&pool, &trigger)
        .await?
        .pop()
        .ok_or_else(|| anyhow::anyhow!("no run for {trigger}"))?;
    anyhow::ensure!(
        state == "done",
        "the run ended {state}: {}",
        run.reason.unwrap_or_default()
    );
    let (db_seconds,): (f64,) = sqlx::query_as(
        "SELECT extract(epoch FROM r.finished_at - t.created_at)::float8
         FROM training_runs r JOIN training_triggers t ON t.id = r.trigger_id WHERE r.id = $1",
    )
    .bind(run.id)
    .fetch_one(&pool)
    .await?;
    let phase = |name: &str| run.timings[name].as_f64().unwrap_or(f64::NAN);
    println!("{:<14} {:>9}", "phase", "seconds");
    for name in ["fetch_parent", "load", "train", "export", "gate", "upload"] {
        println!("{name:<14} {:>9.2}", phase(name));
    }
    println!("{:<14} {:>9.2}", "trigger->reg", db_seconds);
    let figures = serde_json::json!({
        "bench": "trainer",
        "trigger_to_registered_s": (db_seconds * 100.0).round() / 100.0,
        "observed_wall_s": (wall * 100.0).round() / 100.0,
        "split_s": {
            "fetch_parent": phase("fetch_parent"),
            "load": phase("load"),
            "train": phase("train"),
            "export": phase("export"),
            "gate": phase("gate"),
            "upload": phase("upload"),
        },
        "pairs": run.pair_counts,
        "steps": args.steps,
        "device": run.device,
        "images": images,
        "gate_passed": run.gate.as_ref().map(|g| g["passed"].clone()),
        "model_version": run.model_version,
    });
    pool.close().await;
    let _ = kalon_db::drop_database(&database_url).await;
    drop(broker);
    println!("{figures}");
    Ok(())
}
