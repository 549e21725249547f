//! `kalon-bench`: Kalon's benchmarks, commands that print figures (last
//! line JSON), each measured beside its peer in the same run. Kept out of
//! kalonctl and the production image: they pip-install JAX and faiss and link
//! two extra HNSW libraries.
//!
//! `bench ingest` pre-produces events into a private in-memory tansu broker
//! (so it measures Kalon, not the broker's storage), drains them into a fresh
//! database with the ingest pipeline, then drains the same events with the
//! baseline (PyPI confluent-kafka piped into `psql \copy`), and prints one
//! JSON line with both rates.

use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Subcommand;
use kalon_ingest::{Ingest, IngestConfig};
use kalon_kafka::KafkaSettings;
use kalon_stack::{tools, Broker, Storage};

use clap::Parser;
use kalonctl::{events, Globals};

mod canary;
mod encoder;
mod judge;
mod loop_bench;
mod preferences;
mod search;
mod trainer;

#[derive(Parser)]
#[command(
    version,
    about = "Kalon's benchmarks: figures beside their peers, last line JSON"
)]
struct Cli {
    #[command(flatten)]
    globals: Globals,
    #[command(subcommand)]
    which: Bench,
}

#[derive(Subcommand)]
pub enum Bench {
    /// LMM judge calls/s and client overhead against the simulated endpoint, and the judge's agreement with people (single call vs order-consistent).
    Judge(crate::judge::JudgeBenchArgs),
    /// Kafka -> Postgres drain rate of ingest against a plain consumer piped into psql.
    Ingest {
        /// Events to pre-produce and drain.
        #[arg(long, default_value_t = 1_000_000)]
        events: u64,
        /// Skip the confluent-kafka + psql baseline.
        #[arg(long)]
        no_baseline: bool,
        /// Batches written concurrently by ingest.
        #[arg(long, default_value_t = 4)]
        writers: usize,
        /// Most events per ingest batch.
        #[arg(long, default_value_t = 2000)]
        batch_max: usize,
    },
    /// Ranked DPO adapter training throughput (pairs/s) against the same model and loss in JAX (bench/align_peer.py). Kalon trains on KALON_TRAIN_DEVICE (cpu, or cuda in a `cuda` build); the peer on JAX's default backend.
    Align {
        #[arg(long, default_value_t = 200)]
        steps: usize,
        /// Skip the JAX peer.
        #[arg(long)]
        no_baseline: bool,
        /// A Python that already has JAX (a GPU machine's, say) to run the peer with; by default a venv with jax[cpu] is made in the cache.
        #[arg(long)]
        peer_python: Option<std::path::PathBuf>,
    },
    /// The search service under HTTP load (oha) over a large corpus, and its HNSW index against faiss-cpu (and instant-distance) at the same recall.
    Search(crate::search::SearchBenchArgs),
    /// The trainer service: seconds from a trigger to a registered version (reference model, default data window), split into load / train / export / gate / upload.
    Trainer(crate::trainer::TrainerBenchArgs),
    /// The preference builder's click and rating passes over pre-ingested events (events/s, pairs/s), beside ingest's drain of the same events.
    Preferences(crate::preferences::PreferencesBenchArgs),
    /// Sessions each kind of canary evidence (A/B, interleaving, LMM) needs
    /// to decide rightly, with simulated people over HTTP; A/A false decisions.
    Canary(crate::canary::CanaryBenchArgs),
    /// The closed loop at a fixed traffic rate: click -> row latency, registered -> canary traffic, rollback decision -> no traffic, pair -> run; sessions to promotion; what people saw before and after.
    Loop(crate::loop_bench::LoopBenchArgs),
    /// Encoder throughput on ONNX Runtime (images/s, texts/s) at batch 1 and 32, on a world's held-out pairs.
    Encoder {
        /// World (and pretrained model) seed, built when missing.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, default_value_t = 10_000)]
        images: usize,
        /// An encoder directory instead of the seed's reference model.
        #[arg(long)]
        model: Option<std::path::PathBuf>,
        /// Inputs embedded per measurement.
        #[arg(long, default_value_t = 512)]
        count: usize,
    },
}

async fn run(cli: &Globals, bench: &Bench) -> anyhow::Result<()> {
    match bench {
        Bench::Judge(args) => crate::judge::bench_judge(args).await,
        Bench::Ingest {
            events,
            no_baseline,
            writers,
            batch_max,
        } => ingest(cli, *events, !*no_baseline, *writers, *batch_max).await,
        Bench::Align {
            steps,
            no_baseline,
            peer_python,
        } => {
            let peer = match (no_baseline, peer_python) {
                (true, _) => AlignPeer::Skip,
                (false, None) => AlignPeer::CachedVenv,
                (false, Some(python)) => AlignPeer::Python(python),
            };
            align(*steps, peer).await
        }
        Bench::Search(args) => crate::search::run(cli, args).await,
        Bench::Trainer(args) => crate::trainer::run(cli, args).await,
        Bench::Preferences(args) => crate::preferences::run(cli, args).await,
        Bench::Canary(args) => crate::canary::run(cli, args).await,
        Bench::Loop(args) => crate::loop_bench::run(cli, args).await,
        Bench::Encoder {
            seed,
            images,
            model,
            count,
        } => {
            let (state_dir, model, seed, images, count) =
                (cli.state_dir.clone(), model.clone(), *seed, *images, *count);
            tokio::task::spawn_blocking(move || {
                crate::encoder::bench_encoder(&state_dir, seed, images, model.as_deref(), count)
            })
            .await?
        }
    }
}

/// Events pre-produced into a private in-memory tansu broker and drained
/// into a fresh database by ingest: what `bench ingest` measures and what
/// `bench preferences` builds from.
pub(crate) struct Landed {
    pub database_url: String,
    pub pool: sqlx::PgPool,
    pub kafka: KafkaSettings,
    pub tag: String,
    /// ingest's drain, events/s
    pub rate: f64,
    _broker: Broker,
    _dir: tempfile::TempDir,
}

impl Landed {
    /// Drops the database (the broker goes with `self`).
    pub async fn finish(self) -> anyhow::Result<()> {
        self.pool.close().await;
        kalon_db::drop_database(&self.database_url).await?;
        Ok(())
    }
}

pub(crate) async fn land(
    cli: &Globals,
    count: u64,
    writers: usize,
    batch_max: usize,
) -> anyhow::Result<Landed> {
    anyhow::ensure!(count > 0, "--events must be positive");
    let endpoints = kalonctl::stack_up(
        cli.database_url.as_deref(),
        cli.brokers.as_deref(),
        &cli.state_dir,
        "",
    )
    .await?;
    let tag = format!("{:08x}", rand_u32());
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
    let pool = kalon_db::connect(&database_url, 4).await?;

    eprintln!(
        "bench: {count} events, broker {} (memory storage), database {}",
        kafka.brokers,
        kalon_db::redact(&database_url)
    );
    let generated = events::generate(&kafka, count, 0, 42);
    let bytes: usize = generated.messages.iter().map(|m| m.payload.len()).sum();
    let produce_start = Instant::now();
    events::send(&kafka, generated.messages).await?;
    eprintln!(
        "pre-produced {count} events ({:.1} MB) in {:.1}s",
        bytes as f64 / 1e6,
        produce_start.elapsed().as_secs_f64()
    );

    // Kalon ingest
    let mut config = IngestConfig::new(&database_url, &kafka.brokers, &kafka.topic_prefix);
    config.writers = writers;
    config.batch_max = batch_max;
    let started = Instant::now();
    let ingest = Ingest::build(config).await?;
    let handled = ingest.handled();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(ingest.run(async {
        let _ = stopped.await;
    }));
    let handled_ref = &handled;
    let first_batch = std::sync::OnceLock::new();
    let first_ref = &first_batch;
    events::wait_landed(count, Duration::from_secs(1800), || async move {
        let n = handled_ref.load(Ordering::Relaxed);
        if n > 0 {
            first_ref.get_or_init(|| started.elapsed());
        }
        Ok(n)
    })
    .await?;
    let seconds = started.elapsed().as_secs_f64();
    if let Some(first) = first_batch.get() {
        eprintln!(
            "kalon ingest: first batch durable {:.2}s after start (group join included)",
            first.as_secs_f64()
        );
    }
    let _ = stop.send(());
    let report = running.await??;
    let landed: u64 = events::count_all(&pool).await?.iter().sum();
    if landed != count {
        bail!("ingest reported done but {landed} of {count} rows are in Postgres");
    }
    let rate = count as f64 / seconds;
    eprintln!(
        "kalon ingest: {count} events in {seconds:.2}s = {rate:.0} events/s ({} batches)",
        report.batches
    );
    Ok(Landed {
        database_url,
        pool,
        kafka,
        tag,
        rate,
        _broker: broker,
        _dir: dir,
    })
}

async fn ingest(
    cli: &Globals,
    count: u64,
    baseline: bool,
    writers: usize,
    batch_max: usize,
) -> anyhow::Result<()> {
    let python = if baseline {
        Some(baseline_python().await?)
    } else {
        None
    };
    let landed = land(cli, count, writers, batch_max).await?;
    let (pool, kafka, database_url, tag, rate) = (
        &landed.pool,
        &landed.kafka,
        &landed.database_url,
        &landed.tag,
        landed.rate,
    );
    let mut baseline_rate = None;
    if let Some(python) = python {
        sqlx::query("CREATE TABLE baseline_events (payload jsonb NOT NULL)")
            .execute(pool)
            .await?;
        let topics = kafka.event_topics();
        let script = repo_file("scripts/bench/baseline_consumer.py");
        let pipeline = format!(
            "set -o pipefail; '{}' '{}' '{}' 'baseline-{tag}' {count} {} | psql -X -q -v ON_ERROR_STOP=1 '{}' -c '\\copy baseline_events(payload) FROM STDIN'",
            python.display(),
            script.display(),
            kafka.brokers,
            topics.join(" "),
            database_url
        );
        let started = Instant::now();
        let status = tokio::process::Command::new("bash")
            .args(["-c", &pipeline])
            .stdin(Stdio::null())
            .status()
            .await
            .context("failed to run the baseline pipeline")?;
        let seconds = started.elapsed().as_secs_f64();
        if !status.success() {
            bail!("the baseline pipeline failed ({status})");
        }
        let (copied,): (i64,) = sqlx::query_as("SELECT count(*) FROM baseline_events")
            .fetch_one(pool)
            .await?;
        if copied as u64 != count {
            bail!("baseline copied {copied} of {count} events");
        }
        let rate = count as f64 / seconds;
        eprintln!("baseline (confluent-kafka | psql \\copy): {count} events in {seconds:.2}s = {rate:.0} events/s");
        baseline_rate = Some(rate);
    }

    landed.finish().await?;
    let line = serde_json::json!({
        "bench": "ingest",
        "events": count,
        "events_per_s": rate.round(),
        "baseline_events_per_s": baseline_rate.map(f64::round),
        "ratio": baseline_rate.map(|b| (rate / b * 100.0).round() / 100.0),
    });
    println!("{line}");
    Ok(())
}

fn rand_u32() -> u32 {
    (events::clock_seed() ^ (std::process::id() as u64).rotate_left(32)) as u32
}

/// A Python with confluent-kafka, in a venv in the tool cache (made once).
async fn baseline_python() -> anyhow::Result<std::path::PathBuf> {
    bench_python(
        "bench-venv",
        "confluent_kafka",
        &["confluent-kafka==2.16.1"],
    )
    .await
}

/// A file of Kalon's repository that a bench runs (a peer's script): where
/// this binary was built from, else relative to the current directory (a
/// binary copied to another machine, run in a checkout there).
pub(crate) fn repo_file(path: &str) -> std::path::PathBuf {
    let built = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path);
    if built.exists() {
        built
    } else {
        path.into()
    }
}

/// A Python in a venv under the cache with `requirements` installed (once);
/// `module` is imported to tell whether it is ready.
pub(crate) async fn bench_python(
    name: &str,
    module: &str,
    requirements: &[&str],
) -> anyhow::Result<std::path::PathBuf> {
    let venv = tools::cache_dir().join(name);
    let python = venv.join("bin").join("python");
    let ready = tokio::process::Command::new(&python)
        .args(["-c", &format!("import {module}")])
        .stderr(Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success());
    if ready {
        return Ok(python);
    }
    eprintln!(
        "bench: installing {} into {} (one time)",
        requirements.join(" "),
        venv.display()
    );
    let made = tokio::process::Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .status()
        .await
        .context("python3 is needed for the peer (or pass --no-baseline)")?;
    anyhow::ensure!(made.success(), "python3 -m venv failed");
    let pip = tokio::process::Command::new(&python)
        .args(["-m", "pip", "install", "-q"])
        .args(requirements)
        .status()
        .await?;
    anyhow::ensure!(
        pip.success(),
        "pip install {} failed",
        requirements.join(" ")
    );
    Ok(python)
}

/// Where `bench align` runs its JAX peer.
enum AlignPeer<'a> {
    /// `--no-baseline`: Kalon alone.
    Skip,
    /// A venv with jax[cpu] in the cache, made once.
    CachedVenv,
    /// `--peer-python`: a Python that already has JAX.
    Python(&'a std::path::Path),
}

/// `bench align`: synthetic unit embeddings of a 10,000-image world (64-d,
/// 600 queries, 28,800 pairs); Kalon's trainer (after 3 untimed steps),
/// then the JAX peer on data of the same sizes, same batch sizes and steps.
async fn align(steps: usize, peer: AlignPeer<'_>) -> anyhow::Result<()> {
    use kalon_align::dpo::IndexedPair;
    use kalon_align::train::{train_adapter, AlignConfig, TrainingSet};
    use kalon_encoder::Embeddings;
    use rand::{Rng, SeedableRng};
    const IMAGES: usize = 10_000;
    const TRAIN: usize = 9_000;
    const DIM: usize = 64;
    const QUERIES: usize = 600;
    const PAIRS: usize = 28_800;
    anyhow::ensure!(steps > 0, "--steps must be positive");
    let config = AlignConfig {
        steps,
        ..AlignConfig::default()
    };
    let trainer = kalon_model::train::training_device()?;
    let device = if trainer.is_cuda() { "CUDA" } else { "CPU" };
    let kalon = tokio::task::spawn_blocking(move || -> anyhow::Result<f64> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut unit = |rows: usize| {
            let mut data: Vec<f32> = (0..rows * DIM)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            kalon_encoder::encoder::l2_normalise(&mut data, DIM);
            Embeddings { dim: DIM, data }
        };
        let (images, captions, queries) = (unit(IMAGES), unit(IMAGES), unit(QUERIES));
        let pairs: Vec<IndexedPair> = (0..PAIRS)
            .map(|_| IndexedPair {
                query: rng.random_range(0..QUERIES),
                winner: rng.random_range(0..TRAIN),
                loser: rng.random_range(0..TRAIN),
                weight: 1.0,
            })
            .collect();
        let set = TrainingSet {
            images: &images,
            captions: &captions,
            train: TRAIN,
            queries: &queries,
            pairs: &pairs,
        };
        // a few untimed steps first: the peer's one-time compilation is
        // excluded too (for CUDA: loading the kernels' modules)
        let warm_up = AlignConfig {
            steps: 3,
            ..config.clone()
        };
        train_adapter(&trainer, &set, &warm_up, |_| {})?;
        let started = Instant::now();
        train_adapter(&trainer, &set, &config, |_| {})?;
        Ok((steps * config.pair_batch) as f64 / started.elapsed().as_secs_f64())
    })
    .await??;
    println!("kalon (candle, {device}): {kalon:.0} pairs/s");
    let mut figures = serde_json::json!({
        "bench": "align",
        "device": device,
        "steps": steps,
        "pair_batch": AlignConfig::default().pair_batch,
        "caption_batch": AlignConfig::default().caption_batch,
        "pairs_per_s": kalon.round(),
    });
    let python = match peer {
        AlignPeer::Skip => None,
        AlignPeer::CachedVenv => {
            Some(bench_python("bench-jax", "jax", &["jax[cpu]==0.10.2"]).await?)
        }
        AlignPeer::Python(python) => Some(python.to_path_buf()),
    };
    if let Some(python) = python {
        let script = repo_file("bench/align_peer.py");
        let out = tokio::process::Command::new(python)
            .arg(&script)
            .args(["--steps", &steps.to_string()])
            .output()
            .await
            .with_context(|| format!("cannot run {}", script.display()))?;
        anyhow::ensure!(
            out.status.success(),
            "the JAX peer failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line = String::from_utf8_lossy(&out.stdout);
        let peer: serde_json::Value =
            serde_json::from_str(line.trim().lines().last().unwrap_or_default())
                .context("the JAX peer printed no JSON line")?;
        let peer_rate = peer["pairs_per_s"].as_f64().unwrap_or_default();
        let backend = peer["backend"].as_str().unwrap_or("cpu").to_uppercase();
        println!(
            "peer (JAX, {backend}): {peer_rate:.0} pairs/s; ratio {:.2}",
            kalon / peer_rate
        );
        figures["peer_device"] = backend.into();
        figures["peer_pairs_per_s"] = peer_rate.round().into();
        figures["ratio"] = ((kalon / peer_rate * 100.0).round() / 100.0).into();
    }
    println!("{figures}");
    Ok(())
}

// as kalonctl: ingest's many small allocations run markedly faster on mimalloc
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    kalonctl::main_with(|cli: Cli| async move {
        let _telemetry = kalon_telemetry::init("kalon-bench")?;
        if !matches!(
            cli.which,
            Bench::Ingest { .. } | Bench::Judge(_) | Bench::Preferences(_)
        ) {
            // these run models in ONNX Runtime: fetch it now if this machine lacks it
            tokio::task::spawn_blocking(kalonctl::tools::ensure_onnxruntime).await??;
        }
        run(&cli.globals, &cli.which).await
    })
}
