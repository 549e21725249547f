//! `kalon-bench canary`: how many sessions each kind of canary evidence
//! needs to reach the right decision, measured with simulated people
//! searching a real search service over HTTP.
//!
//! A world, a reference model with random weights and image embeddings of
//! known quality (`kalonctl::quality`: pulled towards what the oracle's
//! people find attractive by `mix`): the stable version at `--mix`, a
//! candidate the people prefer (`--mix + --delta`), one they dislike
//! (`--mix - --delta`) and a twin of the stable (A/A). For each candidate
//! and each method, repeated runs of fresh people, looking after every
//! `--batch` sessions with the controller's own tests and defaults, until a
//! significant verdict or `--max-sessions`:
//!
//! - **A/B**: stable and candidate at 50/50; the primary metric (a
//!   session's click-through) by mSPRT. Sessions: both arms.
//! - **Interleaving**: every search a team-draft page of both rankings
//!   (search's canary interleaving at share 1); the per-query preference
//!   by its confidence sequence. Sessions: all, each one query.
//! - **LMM**: the sessions' queries judged by the order-consistent judge
//!   (the simulated LMM over HTTP) on both versions' top-k rows (pinned
//!   searches); aesthetic and relevance. Sessions: queries judged.
//!
//! Last line JSON: per method the median sessions to a decision and the
//! wrong decisions (the wrong direction, or any decision on A/A).

use std::time::{Duration, Instant};

use kalon_canary::evidence::preference;
use kalon_canary::lmm::LmmCanary;
use kalon_canary::stats::sequential::{
    decide, decide_preference, ArmSums, Criterion, Decision, Direction, MsprtConfig,
    PreferenceConfig, PreferenceCounts,
};
use kalon_canary::CanaryConfig;
use kalon_events::Aspect;
use kalon_registry::{deploy, lifecycle, store};
use kalon_search::{Search, SearchConfig};
use kalon_sim_users::{Population, UsersConfig};
use kalonctl::quality::{version_of_quality, Quality};
use kalonctl::Globals;
use rand::{Rng, SeedableRng};
use serde_json::json;

#[derive(clap::Args, Clone, Debug)]
pub struct CanaryBenchArgs {
    /// The world's seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    #[arg(long, default_value_t = 2000)]
    pub images: usize,
    /// Runs per candidate and method (better, worse).
    #[arg(long, default_value_t = 10)]
    pub runs: usize,
    /// A/A runs per method.
    #[arg(long, default_value_t = 40)]
    pub aa_runs: usize,
    /// Sessions between looks.
    #[arg(long, default_value_t = 50)]
    pub batch: usize,
    /// A run that has not decided after this many sessions ends undecided.
    #[arg(long, default_value_t = 20_000)]
    pub max_sessions: usize,
    /// The stable version's pull towards the oracle.
    #[arg(long, default_value_t = 0.3)]
    pub mix: f32,
    /// The candidates' distance from it.
    #[arg(long, default_value_t = 0.1)]
    pub delta: f32,
    /// LMM runs per candidate (each query costs two judge calls per aspect).
    #[arg(long, default_value_t = 3)]
    pub lmm_runs: usize,
    #[arg(long, default_value_t = 300)]
    pub lmm_max_queries: usize,
    /// Sessions in flight.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
}

/// One run's outcome: the decision and the sessions it took.
#[derive(Debug, Clone, Copy)]
struct Run {
    decision: Decision,
    sessions: usize,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Method {
    Ab,
    Interleaving,
    Lmm,
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Method::Ab => "ab",
            Method::Interleaving => "interleaving",
            Method::Lmm => "lmm",
        }
    }
}

struct Bench {
    pool: sqlx::PgPool,
    kafka: kalon_kafka::KafkaSettings,
    url: String,
    http: reqwest::Client,
    args: CanaryBenchArgs,
    defaults: CanaryConfig,
}

fn significant(d: Decision) -> bool {
    matches!(
        d,
        Decision::SignificantlyBetter | Decision::SignificantlyWorse
    )
}

impl Bench {
    /// Serves `stable` and `candidate` as the method needs and waits until
    /// search does.
    async fn deploy(&self, stable: &str, candidate: &str, method: Method) -> anyhow::Result<()> {
        sqlx::query("DELETE FROM deployments")
            .execute(&self.pool)
            .await?;
        let (stable_weight, candidate_weight, interleave) = match method {
            Method::Ab => (0.5, 0.5, 0.0),
            // every search interleaved; the stable loaded, with no traffic of its own
            Method::Interleaving => (0.0, 1.0, 1.0),
            Method::Lmm => (1.0, 0.0, 0.0),
        };
        store::set_deployment(&self.pool, stable, "main", stable_weight).await?;
        store::set_deployment(&self.pool, candidate, "canary", candidate_weight).await?;
        store::set_interleave(&self.pool, candidate, interleave).await?;
        deploy::announce(
            &self.kafka,
            &kalon_events::DeploymentChanged::now(candidate, Some("canary"), candidate_weight),
        )
        .await?;
        let started = Instant::now();
        loop {
            let body: serde_json::Value = serde_json::from_slice(
                &self
                    .http
                    .get(format!("{}/readyz", self.url))
                    .send()
                    .await?
                    .bytes()
                    .await?,
            )
            .unwrap_or_default();
            let serves = |v: &str, w: f64| {
                body["variants"].as_array().is_some_and(|all| {
                    all.iter()
                        .any(|x| x["model_version"] == v && x["weight"].as_f64() == Some(w))
                })
            };
            if serves(stable, stable_weight) && serves(candidate, candidate_weight) {
                return Ok(());
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(60),
                "search never served {stable} and {candidate}: {body}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Fresh people until the method's verdict is significant.
    async fn run_users(&self, method: Method, seed: u64) -> anyhow::Result<Run> {
        let d = &self.defaults;
        let mut stable = ArmSums::default();
        let mut candidate = ArmSums::default();
        let mut counts = PreferenceCounts::default();
        let mut sessions = 0;
        let mut decision = Decision::Inconclusive;
        while sessions < self.args.max_sessions && !significant(decision) {
            let mut config = UsersConfig::new(&self.url, self.args.seed, self.args.images);
            config.seed = seed;
            config.users = 1_000_000;
            config.sessions = self.args.batch;
            config.first_session = sessions as u64;
            config.concurrency = self.args.concurrency;
            config.behaviour.rating_rate = 0.0;
            let report = Population::new(config)?
                .run(|o| {
                    let clicked: Vec<i32> = o.clicks.iter().map(|(rank, _)| *rank as i32).collect();
                    match method {
                        Method::Ab => {
                            let value = if clicked.is_empty() { 0.0 } else { 1.0 };
                            if o.variant == "canary" {
                                candidate.push(value);
                            } else {
                                stable.push(value);
                            }
                        }
                        _ => counts.push(preference(&o.teams, &clicked)),
                    }
                })
                .await;
            anyhow::ensure!(report.failed == 0, "{} sessions failed", report.failed);
            sessions += self.args.batch;
            decision = match method {
                Method::Ab => {
                    let criterion = Criterion {
                        better: Direction::HigherIsBetter,
                        margin: d.margin,
                        alpha: d.alpha,
                    };
                    let config = MsprtConfig {
                        min_samples: d.min_sessions,
                        ..MsprtConfig::default()
                    };
                    decide(&stable, &candidate, &criterion, &config)?.decision
                }
                _ => {
                    let config = PreferenceConfig {
                        min_decisive: d.min_decisive,
                        ..PreferenceConfig::default()
                    };
                    decide_preference(&counts, d.preference_margin, d.alpha, &config)?.decision
                }
            };
        }
        Ok(Run { decision, sessions })
    }

    /// Queries people would ask, judged one by one until a verdict.
    async fn run_lmm(
        &self,
        lmm: &LmmCanary,
        stable: &str,
        candidate: &str,
        seed: u64,
    ) -> anyhow::Result<Run> {
        let d = &self.defaults;
        let queries: Vec<String> = kalon_world::QuerySet::generate(self.args.seed, 160)
            .split(kalon_world::text::Split::Train)
            .map(|q| q.text.clone())
            .collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut aesthetic = PreferenceCounts::default();
        let mut relevance = PreferenceCounts::default();
        let config = PreferenceConfig {
            min_decisive: d.min_decisive,
            ..PreferenceConfig::default()
        };
        for n in 1..=self.args.lmm_max_queries {
            let query = &queries[rng.random_range(0..queries.len())];
            for (aspect, p, _) in lmm.judge_query(query, stable, candidate).await? {
                match aspect {
                    Aspect::Aesthetic => aesthetic.push(p),
                    Aspect::Relevance => relevance.push(p),
                }
            }
            for counts in [&aesthetic, &relevance] {
                let decision =
                    decide_preference(counts, d.preference_margin, d.alpha, &config)?.decision;
                if significant(decision) {
                    return Ok(Run {
                        decision,
                        sessions: n,
                    });
                }
            }
        }
        Ok(Run {
            decision: Decision::Inconclusive,
            sessions: self.args.lmm_max_queries,
        })
    }
}

fn median(mut xs: Vec<usize>) -> Option<usize> {
    if xs.is_empty() {
        return None;
    }
    xs.sort_unstable();
    Some(xs[xs.len() / 2])
}

/// A method's figures over a scenario's runs.
fn summary(runs: &[Run], right: Option<Decision>) -> serde_json::Value {
    let decided: Vec<&Run> = runs.iter().filter(|r| significant(r.decision)).collect();
    let correct: Vec<usize> = decided
        .iter()
        .filter(|r| Some(r.decision) == right)
        .map(|r| r.sessions)
        .collect();
    let wrong = decided.len() - correct.len();
    json!({
        "runs": runs.len(),
        "correct": correct.len(),
        "wrong_decisions": wrong,
        "undecided": runs.len() - decided.len(),
        "sessions_to_decision": median(correct),
        "sessions_per_run": runs.iter().map(|r| r.sessions).collect::<Vec<_>>(),
    })
}

pub async fn run(cli: &Globals, args: &CanaryBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.batch >= 1 && args.max_sessions >= args.batch,
        "--batch must be at least 1 and at most --max-sessions"
    );
    anyhow::ensure!(
        args.mix - args.delta >= 0.0 && args.mix + args.delta <= 1.0,
        "--mix +- --delta must stay in [0, 1]"
    );
    let endpoints = kalonctl::stack_up(
        cli.database_url.as_deref(),
        cli.brokers.as_deref(),
        &cli.state_dir,
        &cli.topic_prefix,
    )
    .await?;
    let database_url = kalon_db::with_database(&endpoints.database_url, "kalon_bench_canary");
    let _ = kalon_db::drop_database(&database_url).await;
    kalon_db::create_database(&database_url).await?;
    let pool = kalon_db::connect(&database_url, 4).await?;
    kalon_db::migrate(&pool).await?;
    let (state_dir, seed, images) = (cli.state_dir.clone(), args.seed, args.images);
    let (world, model) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let world = kalonctl::model::cached_world(&state_dir, seed, images)?;
        let model = state_dir.join(format!("bench-canary-model-{seed}-{images}"));
        if !model.join(kalon_encoder::MANIFEST_FILE).exists() {
            kalon_model::export::export_random_reference(&world, &model, 4)?;
        }
        Ok((world, std::fs::canonicalize(&model)?))
    })
    .await??;
    let started = Instant::now();
    kalon_registry::indexer::index_version(
        &pool,
        kalon_registry::indexer::IndexJob {
            version: "base",
            encoder_dir: &model,
            images: &world.join("images"),
            parent: None,
            force_tower: true,
            batch: 64,
            options: &kalon_encoder::EncoderOptions::from_env()?,
        },
        |_, _| {},
    )
    .await?;
    let versions = [
        ("stable", Quality::Oracle { mix: args.mix }),
        (
            "better",
            Quality::Oracle {
                mix: args.mix + args.delta,
            },
        ),
        (
            "worse",
            Quality::Oracle {
                mix: args.mix - args.delta,
            },
        ),
        ("twin", Quality::Oracle { mix: args.mix }),
    ];
    for (name, quality) in versions {
        version_of_quality(&pool, &model, "base", name, seed, quality).await;
    }
    lifecycle::promote(
        &pool,
        "stable",
        "kalon-bench",
        "the bench's stable version",
        json!({}),
    )
    .await?;
    eprintln!(
        "world of {images} images, versions indexed in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let mut config = SearchConfig::new(
        &database_url,
        &endpoints.kafka.brokers,
        &endpoints.kafka.topic_prefix,
    );
    config.images = Some(world.join("images"));
    config.reload_every_s = 3600;
    store::set_deployment(&pool, "stable", "main", 1.0).await?;
    let search = Search::build(config).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(search.serve(listener, async move {
        let _ = stopped.await;
    }));
    kalon_telemetry::install_crypto_provider();
    let bench = Bench {
        pool: pool.clone(),
        kafka: endpoints.kafka.clone(),
        url: url.clone(),
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()?,
        args: args.clone(),
        defaults: CanaryConfig::new("postgres://unused", "unused:9092", ""),
    };

    // the simulated LMM, over HTTP
    let mut sim = kalon_sim_llm::SimConfig::new(seed, images);
    sim.world_dir = Some(world.clone());
    let llm_server =
        kalon_sim_llm::SimServer::start(sim, tokio::net::TcpListener::bind("127.0.0.1:0").await?)
            .await?;
    let mut llm = kalon_llm::LlmConfig::new(llm_server.base_url(), "kalon-sim-1");
    llm.rate_per_s = 1e6;
    llm.burst = 1_000_000;
    let lmm = LmmCanary::new(
        kalon_llm::Judge::new(kalon_llm::LlmClient::new(llm)?),
        url.clone(),
        Some(world.join("images")),
        bench.defaults.lmm_k,
        1,
        u32::MAX,
    );

    let scenarios = [
        ("better", Some(Decision::SignificantlyBetter), args.runs),
        ("worse", Some(Decision::SignificantlyWorse), args.runs),
        ("aa", None, args.aa_runs),
    ];
    let mut figures = serde_json::Map::new();
    let mut per_method: Vec<(Method, Vec<usize>, usize, usize)> = Vec::new();
    for method in [Method::Ab, Method::Interleaving, Method::Lmm] {
        let mut all_correct = Vec::new();
        let (mut wrong, mut aa_wrong) = (0, 0);
        let mut by_scenario = serde_json::Map::new();
        for (s, (scenario, right, runs)) in scenarios.iter().enumerate() {
            let candidate = if *scenario == "aa" { "twin" } else { scenario };
            let runs = if method == Method::Lmm {
                args.lmm_runs.min(*runs)
            } else {
                *runs
            };
            bench.deploy("stable", candidate, method).await?;
            let clock = Instant::now();
            let mut results = Vec::with_capacity(runs);
            for r in 0..runs {
                let run_seed = 1_000 * (s as u64 + 1) + r as u64;
                let run = match method {
                    Method::Lmm => bench.run_lmm(&lmm, "stable", candidate, run_seed).await?,
                    _ => bench.run_users(method, run_seed).await?,
                };
                eprintln!(
                    "{:<12} {scenario:<6} run {r:>3}: {:<21} after {:>6} sessions",
                    method.name(),
                    kalon_canary::evidence::decision_name(run.decision),
                    run.sessions
                );
                results.push(run);
            }
            let summary = summary(&results, *right);
            eprintln!(
                "{:<12} {scenario:<6} {} in {:.0} s",
                method.name(),
                summary,
                clock.elapsed().as_secs_f64()
            );
            wrong += summary["wrong_decisions"].as_u64().unwrap_or(0) as usize;
            if right.is_none() {
                aa_wrong += summary["wrong_decisions"].as_u64().unwrap_or(0) as usize;
            }
            all_correct.extend(
                results
                    .iter()
                    .filter(|r| right.is_some() && Some(r.decision) == *right)
                    .map(|r| r.sessions),
            );
            by_scenario.insert(scenario.to_string(), summary);
        }
        per_method.push((method, all_correct, wrong, aa_wrong));
        figures.insert(method.name().into(), serde_json::Value::Object(by_scenario));
    }
    let _ = stop.send(());
    serving.await??;

    let mut line = serde_json::Map::new();
    line.insert("bench".into(), json!("canary"));
    line.insert("images".into(), json!(args.images));
    line.insert("mix".into(), json!(args.mix));
    line.insert("delta".into(), json!(args.delta));
    line.insert("alpha".into(), json!(bench.defaults.alpha));
    line.insert("runs".into(), json!(args.runs));
    line.insert("aa_runs".into(), json!(args.aa_runs));
    line.insert("lmm_runs".into(), json!(args.lmm_runs));
    for (method, correct, wrong, aa_wrong) in &per_method {
        let runs = if *method == Method::Lmm {
            args.lmm_runs.min(args.runs) * 2 + args.lmm_runs.min(args.aa_runs)
        } else {
            args.runs * 2 + args.aa_runs
        };
        line.insert(
            method.name().into(),
            json!({
                "sessions_to_decision": median(correct.clone()),
                "wrong_decisions": wrong,
                "aa_false_decisions": aa_wrong,
                "runs": runs,
            }),
        );
    }
    let ab = median(per_method[0].1.clone());
    let il = median(per_method[1].1.clone());
    line.insert(
        "interleaving_to_ab".into(),
        json!(ab.zip(il).map(|(ab, il)| il as f64 / ab as f64)),
    );
    line.insert("scenarios".into(), serde_json::Value::Object(figures));
    let line = serde_json::Value::Object(line);
    println!("{line}");
    Ok(())
}
