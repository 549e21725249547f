//! `kalon-bench search`: the search service under HTTP load over a large
//! corpus of the simulated world, and its vector index against faiss.
//!
//! 1. A world of `--images` images (built once, cached under the state dir)
//!    and the reference model pretrained on a 3,000-image world of the seed;
//!    the corpus is embedded into a database of its own (once per model).
//! 2. The service runs in this process on a free port; `oha` (a real HTTP
//!    load generator, installed once into the tool cache) sends `--rps`
//!    requests/s for `--seconds`, with latency correction (open loop), while
//!    impressions go to the stack's broker.
//! 3. The index alone: recall@10 of the service's HNSW against exact search
//!    and its queries/s on one thread, over the world's query and caption
//!    texts embedded by the model, for a sweep of efSearch (the service's
//!    setting is the reported one); the other maintained crates considered,
//!    `hnsw_rs` and `instant-distance`, with the same parameters beside it;
//!    and the peer, faiss-cpu's HNSW with the same M and efConstruction,
//!    float (IndexHNSWFlat) and int8 with exact re-scoring like the
//!    service's (IndexHNSWSQ under IndexRefineFlat), each at the smallest
//!    efSearch that reaches the same recall; the faster of the two is the
//!    peer (bench/search_peer.py).
//!
//! The last line is one JSON object.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use kalon_encoder::{EncoderOptions, Manifest, TextEncoder};
use kalon_registry::indexer::{self, IndexJob};
use kalon_registry::store;
use kalon_search::index::{recall, IndexParams, VectorIndex, OVERFETCH};
use kalon_search::{Search, SearchConfig};

use kalonctl::Globals;

const OHA_VERSION: &str = "1.16.0";

#[derive(Debug, Clone, Args)]
pub struct SearchBenchArgs {
    /// Images in the corpus.
    #[arg(long, default_value_t = 100_000)]
    pub images: usize,
    /// Requests per second offered by the load generator.
    #[arg(long, default_value_t = 200)]
    pub rps: u32,
    /// Length of the load.
    #[arg(long, default_value_t = 30)]
    pub seconds: u32,
    /// World seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// HNSW efSearch of the service [default: the service's].
    #[arg(long)]
    pub ef_search: Option<usize>,
    /// HNSW M of the service [default: the service's].
    #[arg(long)]
    pub hnsw_m: Option<usize>,
    /// HNSW efConstruction of the service [default: the service's].
    #[arg(long)]
    pub ef_construction: Option<usize>,
    /// Connections the load generator may open.
    #[arg(long, default_value_t = 16)]
    pub connections: u32,
    /// Skip the faiss peer.
    #[arg(long)]
    pub no_baseline: bool,
}

/// `oha` in the tool cache, installed with cargo the first time.
async fn oha() -> anyhow::Result<PathBuf> {
    let root = kalon_stack::tools::cache_dir()
        .join("tools")
        .join(format!("oha-{OHA_VERSION}"));
    let bin = root.join("bin").join("oha");
    if bin.exists() {
        return Ok(bin);
    }
    eprintln!(
        "bench: installing oha {OHA_VERSION} into {} (one time, a few minutes)",
        root.display()
    );
    let status = tokio::process::Command::new("cargo")
        .args([
            "install",
            "oha",
            "--locked",
            "--version",
            OHA_VERSION,
            "--root",
        ])
        .arg(&root)
        .env("CARGO_TARGET_DIR", root.join("build"))
        .status()
        .await
        .context("cargo is needed to install oha")?;
    anyhow::ensure!(status.success(), "cargo install oha failed");
    let _ = std::fs::remove_dir_all(root.join("build"));
    Ok(bin)
}

/// Query texts for the index benchmark: the world's queries, then captions.
fn query_texts(world: &Path, count: usize) -> anyhow::Result<Vec<String>> {
    let mut texts = Vec::new();
    for file in ["queries.jsonl", "captions.jsonl"] {
        let path = world.join(file);
        let body = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        for line in body.lines() {
            let row: serde_json::Value = serde_json::from_str(line)?;
            if let Some(text) = row["text"].as_str().or(row["caption"].as_str()) {
                texts.push(text.to_owned());
            }
            if texts.len() >= count {
                return Ok(texts);
            }
        }
    }
    Ok(texts)
}

fn write_f32(path: &Path, data: &[f32]) -> anyhow::Result<()> {
    let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))
}

/// One point for `instant-distance`: a unit row; distance 1 - dot.
#[derive(Clone)]
struct Unit(Vec<f32>);

impl instant_distance::Point for Unit {
    fn distance(&self, other: &Self) -> f32 {
        1.0 - self.0.iter().zip(&other.0).map(|(a, b)| a * b).sum::<f32>()
    }
}

/// `1 - <a, b>` clamped at 0, for the hnsw_rs candidate (anndists' own
/// `DistDot` asserts on rounding for a row and itself).
#[derive(Clone, Copy, Default)]
struct UnitDot;

impl hnsw_rs::prelude::Distance<f32> for UnitDot {
    fn eval(&self, va: &[f32], vb: &[f32]) -> f32 {
        (1.0 - kalon_search::index::dot(va, vb)).max(0.0)
    }
}

/// Queries/s of `search` over `queries` on this thread, for about a second.
fn rate(queries: &[f32], dim: usize, mut search: impl FnMut(&[f32])) -> f64 {
    let started = Instant::now();
    let mut done = 0usize;
    while started.elapsed() < Duration::from_secs(1) {
        for q in queries.chunks_exact(dim) {
            search(q);
        }
        done += queries.len() / dim;
    }
    done as f64 / started.elapsed().as_secs_f64()
}

struct IndexFigures {
    recall: f64,
    qps: f64,
    build_s: f64,
    sweep: Vec<serde_json::Value>,
    candidates: Vec<serde_json::Value>,
}

/// Mean recall@10 of `search` against `truth`.
fn mean_recall(
    queries: &[f32],
    dim: usize,
    truth: &[Vec<kalon_search::index::Hit>],
    mut search: impl FnMut(&[f32]) -> Vec<kalon_search::index::Hit>,
) -> f64 {
    let total: f64 = queries
        .chunks_exact(dim)
        .zip(truth)
        .map(|(q, exact)| recall(exact, &search(q)))
        .sum();
    total / truth.len() as f64
}

fn index_figures(
    data: &[f32],
    dim: usize,
    queries: &[f32],
    params: IndexParams,
) -> anyhow::Result<IndexFigures> {
    let started = Instant::now();
    let index = VectorIndex::build(dim, data.to_vec(), params)?;
    let build_s = started.elapsed().as_secs_f64();
    let truth: Vec<_> = queries
        .chunks_exact(dim)
        .map(|q| index.exact(q, 10))
        .collect();
    let hit = |row: usize, distance: f32| kalon_search::index::Hit {
        row,
        score: 1.0 - distance,
    };
    // efSearch sweep of the service's index, then its own setting. A search
    // for 10 asks the int8 graph for 10 x OVERFETCH candidates (to re-score
    // them exactly), and any smaller efSearch searches as that many: the
    // sweep starts above it
    let mut sweep = Vec::new();
    let candidates = 10 * OVERFETCH;
    for ef in [16, 32, 48, 64, 96, 128, 192, 256]
        .into_iter()
        .filter(|&ef| ef > candidates)
    {
        index.set_ef_search(ef);
        let r = mean_recall(queries, dim, &truth, |q| {
            index.search(q, 10).expect("dims checked")
        });
        let qps = rate(queries, dim, |q| {
            std::hint::black_box(index.search(q, 10).expect("dims checked"));
        });
        sweep.push(
            serde_json::json!({"ef_search": ef, "recall_at_10": round(r, 4), "qps": qps.round()}),
        );
    }
    index.set_ef_search(params.ef_search);
    let own_recall = mean_recall(queries, dim, &truth, |q| {
        index.search(q, 10).expect("dims checked")
    });
    let qps = rate(queries, dim, |q| {
        std::hint::black_box(index.search(q, 10).expect("dims checked"));
    });

    // the candidates, same M, efConstruction and efSearch
    let mut candidates = Vec::new();
    let n = data.len() / dim;
    let started = Instant::now();
    let layers = 16.min((n as f32).ln().ceil() as usize).max(1);
    let graph = hnsw_rs::hnsw::Hnsw::<f32, UnitDot>::new(
        params.max_connections,
        n,
        layers,
        params.ef_construction,
        UnitDot,
    );
    let rows: Vec<(&[f32], usize)> = data.chunks_exact(dim).zip(0..n).collect();
    graph.parallel_insert_slice(&rows);
    let built = started.elapsed().as_secs_f64();
    let ef = params.ef_search;
    let r = mean_recall(queries, dim, &truth, |q| {
        graph
            .search(q, 10, ef)
            .into_iter()
            .map(|nb| hit(nb.d_id, nb.distance))
            .collect()
    });
    let q_rate = rate(queries, dim, |q| {
        std::hint::black_box(graph.search(q, 10, ef));
    });
    candidates.push(serde_json::json!({"crate": "hnsw_rs 0.3", "recall_at_10": round(r, 4), "qps": q_rate.round(), "build_s": round(built, 2)}));
    drop(graph);

    let points: Vec<Unit> = data.chunks_exact(dim).map(|r| Unit(r.to_vec())).collect();
    let started = Instant::now();
    let map = instant_distance::Builder::default()
        .ef_construction(params.ef_construction)
        .ef_search(params.ef_search)
        .seed(7)
        .build(points, (0..n).collect::<Vec<usize>>());
    let built = started.elapsed().as_secs_f64();
    let mut searcher = instant_distance::Search::default();
    let r = mean_recall(queries, dim, &truth, |q| {
        map.search(&Unit(q.to_vec()), &mut searcher)
            .take(10)
            .map(|item| hit(*item.value, item.distance))
            .collect()
    });
    let q_rate = rate(queries, dim, |q| {
        let point = Unit(q.to_vec());
        std::hint::black_box(map.search(&point, &mut searcher).take(10).count());
    });
    candidates.push(serde_json::json!({"crate": "instant-distance 0.6", "recall_at_10": round(r, 4), "qps": q_rate.round(), "build_s": round(built, 2)}));
    Ok(IndexFigures {
        recall: own_recall,
        qps,
        build_s,
        sweep,
        candidates,
    })
}

fn round(x: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (x * scale).round() / scale
}

pub async fn run(cli: &Globals, args: &SearchBenchArgs) -> anyhow::Result<()> {
    if args.images == 0 || args.rps == 0 || args.seconds == 0 {
        bail!("--images, --rps and --seconds must be positive");
    }
    let oha = oha().await?;
    let endpoints = kalonctl::stack_up(
        cli.database_url.as_deref(),
        cli.brokers.as_deref(),
        &cli.state_dir,
        &cli.topic_prefix,
    )
    .await?;
    // a database of its own, so the bench's deployment never routes the
    // stack's own search traffic
    let database_url = kalon_db::with_database(&endpoints.database_url, "kalon_bench_search");
    kalon_db::create_database(&database_url).await?;
    let pool = kalon_db::connect(&database_url, 4).await?;
    kalon_db::migrate(&pool).await?;

    // the model (pretrained on a small world of the seed) and the corpus
    let (state_dir, seed, images) = (cli.state_dir.clone(), args.seed, args.images);
    let (model, world) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let prepared = kalonctl::model::prepare(
            &state_dir,
            seed,
            3_000,
            None,
            false,
            &kalonctl::model::PretrainArgs::defaults(),
        )?;
        let world = kalonctl::model::cached_world(&state_dir, seed, images)?;
        Ok((prepared.model, world))
    })
    .await??;
    let model = std::fs::canonicalize(&model)?;
    let version = format!("bench-seed-{seed}-{images}");
    let indexed = store::version(&pool, &version).await?;
    let fresh = indexed.as_ref().is_some_and(|v| {
        v.images_indexed as usize == images
            && v.encoder_dir.as_deref() == Some(model.display().to_string().as_str())
    });
    if !fresh {
        let bar = kalonctl::progress_bar(images as u64, "indexing");
        let outcome = indexer::index_version(
            &pool,
            IndexJob {
                version: &version,
                encoder_dir: &model,
                images: &world.join("images"),
                parent: None,
                force_tower: true,
                batch: 64,
                options: &EncoderOptions::from_env()?,
            },
            |done, _| bar.set_position(done as u64),
        )
        .await?;
        bar.finish_and_clear();
        eprintln!(
            "indexed {} images in {:.1} s ({:.0}/s)",
            outcome.images, outcome.seconds, outcome.images_per_s
        );
    }
    store::set_deployment(&pool, &version, "main", 1.0).await?;

    // the service, in this process
    let mut config = SearchConfig::new(
        &database_url,
        &endpoints.kafka.brokers,
        &endpoints.kafka.topic_prefix,
    );
    config.ef_search = args.ef_search.unwrap_or(config.ef_search);
    config.hnsw_m = args.hnsw_m.unwrap_or(config.hnsw_m);
    config.ef_construction = args.ef_construction.unwrap_or(config.ef_construction);
    config.images = Some(world.join("images"));
    let params = config.index_params();
    let started = Instant::now();
    let search = Search::build(config).await?;
    anyhow::ensure!(
        search.state.live.current().is_ready(),
        "the bench version did not load"
    );
    eprintln!(
        "service loaded {images} images in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let stats = search.state.events.stats.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/v1/search", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(search.serve(listener, async move {
        let _ = stopped.await;
    }));

    let body =
        r#"{"query": "a calm blue lake under a soft evening sky", "k": 10, "session_id": "bench"}"#;
    eprintln!(
        "load: {} requests/s for {} s (oha {OHA_VERSION}, open loop with latency correction)",
        args.rps, args.seconds
    );
    let load = tokio::process::Command::new(&oha)
        .args([
            "--no-tui",
            "--output-format",
            "json",
            "--latency-correction",
        ])
        .args(["-z", &format!("{}s", args.seconds)])
        .args(["-q", &args.rps.to_string()])
        .args(["-c", &args.connections.to_string()])
        .args([
            "-m",
            "POST",
            "-H",
            "content-type: application/json",
            "-d",
            body,
        ])
        .arg(&url)
        .output()
        .await
        .context("cannot run oha")?;
    let _ = stop.send(());
    serving.await??;
    anyhow::ensure!(
        load.status.success(),
        "oha failed: {}",
        String::from_utf8_lossy(&load.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_slice(&load.stdout).context("oha printed no JSON report")?;
    let p50 = report["latencyPercentiles"]["p50"]
        .as_f64()
        .unwrap_or(f64::NAN)
        * 1000.0;
    let p99 = report["latencyPercentiles"]["p99"]
        .as_f64()
        .unwrap_or(f64::NAN)
        * 1000.0;
    let achieved = report["summary"]["requestsPerSec"]
        .as_f64()
        .unwrap_or_default();
    let success = report["summary"]["successRate"]
        .as_f64()
        .unwrap_or_default();
    let statuses = report["statusCodeDistribution"].clone();
    let (queued, delivered, dropped) = stats.snapshot();
    println!(
        "service: {achieved:.1} requests/s achieved, success {:.2}%, p50 {p50:.2} ms, p99 {p99:.2} ms; statuses {statuses}; impressions queued {queued}, delivered {delivered}, dropped {dropped}",
        success * 100.0
    );

    // the index alone, and the peers
    let manifest = Manifest::load(&model)?;
    let dim = manifest.embedding_dim;
    let text = TextEncoder::load(&model, &manifest, &EncoderOptions::from_env()?)?;
    let texts = query_texts(&world, 1_000)?;
    let queries = text.embed_texts(&texts)?.data;
    let stored = store::load_embeddings(&pool, &version, dim).await?;
    let (data, q) = (stored.data.clone(), queries.clone());
    let figures =
        tokio::task::spawn_blocking(move || index_figures(&data, dim, &q, params)).await??;
    for point in &figures.sweep {
        println!("index sweep: {point}");
    }
    println!(
        "index (usearch, M {} efC {} efS {}): recall@10 {:.4}, {:.0} queries/s on one thread, built in {:.1} s",
        params.max_connections, params.ef_construction, params.ef_search, figures.recall, figures.qps, figures.build_s
    );
    for candidate in &figures.candidates {
        println!("candidate: {candidate}");
    }
    let mut faiss_qps = f64::NAN;
    if !args.no_baseline {
        let python =
            crate::bench_python("bench-faiss", "faiss", &["faiss-cpu==1.15.1", "numpy<3"]).await?;
        let dir = tempfile::tempdir()?;
        write_f32(&dir.path().join("base.f32"), &stored.data)?;
        write_f32(&dir.path().join("queries.f32"), &queries)?;
        let script = crate::repo_file("bench/search_peer.py");
        let out = tokio::process::Command::new(python)
            .arg(&script)
            .arg("--base")
            .arg(dir.path().join("base.f32"))
            .arg("--queries")
            .arg(dir.path().join("queries.f32"))
            .args(["--dim", &dim.to_string()])
            .args(["--m", &params.max_connections.to_string()])
            .args(["--ef-construction", &params.ef_construction.to_string()])
            .args(["--target-recall", &figures.recall.to_string()])
            .output()
            .await
            .with_context(|| format!("cannot run {}", script.display()))?;
        anyhow::ensure!(
            out.status.success(),
            "the faiss peer failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let peer: serde_json::Value =
            serde_json::from_slice(&out.stdout).context("the faiss peer printed no JSON line")?;
        println!("peer: {peer}");
        if peer["reached"].as_bool() != Some(true) {
            eprintln!("warning: faiss did not reach Kalon's recall; its fastest reaching setting is unknown");
        }
        faiss_qps = peer["chosen"]["qps"].as_f64().unwrap_or(f64::NAN);
    }
    println!(
        "{}",
        serde_json::json!({
            "bench": "search",
            "images": images,
            "rps": args.rps,
            "p50_ms": round(p50, 2),
            "p99_ms": round(p99, 2),
            "recall_at_10": round(figures.recall, 4),
            "ann_qps": figures.qps.round(),
            "faiss_qps": if faiss_qps.is_finite() { serde_json::json!(faiss_qps.round()) } else { serde_json::Value::Null },
            "ratio": if faiss_qps.is_finite() { serde_json::json!(round(figures.qps / faiss_qps, 2)) } else { serde_json::Value::Null },
        })
    );
    pool.close().await;
    Ok(())
}
