//! The main job: the closed loop, end to end, on this machine. The stack
//! and every service come up (`kalonctl up --pace demo`), simulated people
//! search over HTTP and click what they like; their feedback becomes
//! preference pairs, the trainer fine-tunes the encoder on them, the gate
//! and the canary judge the new version against the serving one. The job
//! ends when (a) a model trained from the people's own feedback has been
//! canaried and promoted, and (b) a deliberately bad model, injected as if
//! it had passed the gate, has been rolled back, both without a person.
//! A live timeline shows the loop turning; a summary ends it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::Args;
use kalon_events::{GateOutcome, ModelRegistered, TopicPayload};
use kalon_registry::artifact::ArtifactStore;
use kalon_registry::lifecycle::{self, NewVersion};
use kalon_sim_users::{Population, SessionOutcome, UsersConfig};
use sqlx::PgPool;

use crate::up::{self, Pace, UpArgs};
use crate::{tools, Globals};

/// The database the main job runs the loop in, made anew on each run, on
/// the stack's Postgres server (DATABASE_URL's own database is left alone).
pub const DEMO_DATABASE: &str = "kalon_demo";

#[derive(Args)]
pub struct DemoArgs {
    /// Images in the simulated catalog.
    #[arg(long, default_value_t = 2_000)]
    pub images: usize,
    #[arg(long, default_value_t = 1)]
    pub world_seed: u64,
    /// Sessions the simulated people start per second.
    #[arg(long, default_value_t = 20.0)]
    pub rate: f64,
    /// The people's seed (the same seed gives the same people).
    #[arg(long, default_value_t = 1)]
    pub users_seed: u64,
    /// Give up (and say what did not happen) after this many seconds.
    #[arg(long, default_value_t = 900)]
    pub timeout_s: u64,
    /// Inject the bad model after this many seconds even when no trained
    /// version has reached the canary yet.
    #[arg(long, default_value_t = 300)]
    pub inject_after_s: u64,
    /// See `kalonctl up --port-base`.
    #[arg(long)]
    pub port_base: Option<u16>,
}

/// What the people saw, per model version that served them.
#[derive(Debug, Default, Clone)]
struct Seen {
    searches: u64,
    clicks: u64,
    shown: u64,
    beauty: f64,
    relevance: f64,
}

impl Seen {
    fn add(&mut self, o: &SessionOutcome) {
        self.searches += 1;
        self.clicks += o.clicks.len() as u64;
        self.shown += o.shown.len() as u64;
        self.beauty += o.beauty;
        self.relevance += o.relevance;
    }
}

#[derive(Default)]
struct People {
    by_version: BTreeMap<String, Seen>,
    sessions: u64,
    /// Each answered session's request id and acknowledged feedback ids.
    answered: Vec<(String, Vec<String>)>,
}

/// How the loop is driven.
#[derive(Debug, Clone)]
pub struct LoopOptions {
    pub images: usize,
    pub rate: f64,
    pub users_seed: u64,
    pub timeout: Duration,
    pub inject_after: Duration,
    /// End only when a trained version was promoted (else: when a run
    /// trained on the people's pairs registered a version).
    pub need_promotion: bool,
    /// The people keep searching this long after the loop closed (so that
    /// a benchmark sees the rolled-back version's traffic stay at zero).
    pub linger: Duration,
}

/// What closing the loop did.
#[derive(Debug, Clone)]
pub struct Closed {
    /// When it started (the database's clock).
    pub since: DateTime<Utc>,
    pub stable_before: String,
    /// The trained version promoted (with `need_promotion`; else the first
    /// version a run trained on the people's pairs), the bad version
    /// rolled back.
    pub promoted: String,
    pub bad: String,
    /// When the bad version was announced on `model.registered.v1`.
    pub bad_announced_at: DateTime<Utc>,
    /// The people's sessions until the promotion was seen.
    pub sessions_to_promotion: u64,
    pub sessions: u64,
    /// (searches, clicks, shown, beauty sum, relevance sum) per version.
    pub seen: BTreeMap<String, (u64, u64, u64, f64, f64)>,
    /// Each answered session's request id and acknowledged feedback ids.
    pub answered: Vec<(String, Vec<String>)>,
    pub elapsed: Duration,
}

impl Closed {
    /// (CTR, mean beauty, mean relevance) of what `version` showed.
    pub fn figures(&self, version: &str) -> Option<(f64, f64, f64)> {
        self.seen
            .get(version)
            .map(|&(searches, clicks, shown, b, r)| {
                let shown = shown.max(1) as f64;
                (clicks as f64 / searches.max(1) as f64, b / shown, r / shown)
            })
    }
}

pub async fn run(cli: &Globals, args: &DemoArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    tools::announce_first_run(!cli.state_dir.join("loop").join("models").is_dir());
    // before anything long: the services run models in it
    tokio::task::spawn_blocking(tools::ensure_onnxruntime).await??;
    eprintln!("bringing the loop up: stack, catalog and reference model, services");
    let up_args = UpArgs {
        images: args.images,
        world_seed: args.world_seed,
        pace: Pace::Demo,
        port_base: args.port_base,
        chaos_every_s: None,
        // each run starts from nothing: a loop left half-way by an earlier
        // run (a canary queue, say) must not decide this one's course
        fresh_database: Some(DEMO_DATABASE.into()),
        admin_token: std::env::var("KALON_CANARY_ADMIN_TOKEN").ok(),
    };
    let running = up::bring_up(cli, &up_args).await?;
    up::print_where(&running);
    let options = LoopOptions {
        images: args.images,
        rate: args.rate,
        users_seed: args.users_seed,
        timeout: Duration::from_secs(args.timeout_s).saturating_sub(started.elapsed()),
        inject_after: Duration::from_secs(args.inject_after_s),
        need_promotion: true,
        linger: Duration::ZERO,
    };
    let closed = close_the_loop(&running, &options).await;
    let outcome = match closed {
        Ok(closed) => {
            let pool = kalon_db::connect(&running.endpoints.database_url, 2).await?;
            summary(&pool, &running.site, &closed, started).await
        }
        Err(error) => {
            println!("\nlogs: {}", running.site.dir.join("logs").display());
            Err(error)
        }
    };
    eprintln!("stopping the services (the stack stays up: `kalonctl stack down`)");
    running.supervisor.stop().await;
    outcome
}

/// Drives the running loop with simulated people until a trained version
/// is promoted and an injected bad one rolled back, printing the timeline.
pub async fn close_the_loop(
    running: &up::Running,
    options: &LoopOptions,
) -> anyhow::Result<Closed> {
    let started = Instant::now();
    let site = &running.site;
    let pool = kalon_db::connect(&running.endpoints.database_url, 4).await?;
    let (since,): (DateTime<Utc>,) = sqlx::query_as("SELECT now()").fetch_one(&pool).await?;
    let stable_before = lifecycle::promoted(&pool)
        .await?
        .map(|v| v.version)
        .context("no promoted version: search-bootstrap should have promoted the reference")?;

    let mut config = UsersConfig::new(&site.search_url(), site.world_seed, options.images);
    config.seed = options.users_seed;
    config.sessions = usize::MAX / 2;
    config.rate_per_s = Some(options.rate);
    config.concurrency = 8;
    config.first_session = first_session(&pool).await?;
    let population = Population::new(config)?;
    let people = Arc::new(Mutex::new(People::default()));
    let seen = people.clone();
    let users = tokio::spawn(async move {
        population
            .run(|o| {
                let mut people = seen.lock().expect("not poisoned");
                people.sessions += 1;
                people
                    .by_version
                    .entry(o.model_version.clone())
                    .or_default()
                    .add(o);
                people
                    .answered
                    .push((o.request_id.clone(), o.feedback_event_ids.clone()));
            })
            .await
    });
    println!(
        "\nthe loop is turning: simulated people search at {}/s (the world's training queries; \
         evaluation queries stay held out)",
        options.rate
    );
    println!(
        "waiting for (a) a model trained from their feedback to be promoted by the canary, \
         (b) a deliberately bad model to be rolled back\n"
    );

    let mut timeline = Timeline::new(since, started);
    let mut bad: Option<(String, DateTime<Utc>)> = None;
    let mut sessions_to_promotion = None;
    let mut ticks = tokio::time::interval(Duration::from_secs(2));
    let interrupted = kalon_telemetry::shutdown_signal();
    tokio::pin!(interrupted);
    let result = loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = &mut interrupted => break Err(anyhow::anyhow!("interrupted")),
        }
        for happening in running.supervisor.happenings_since(timeline.last_tick) {
            timeline.say(&format!("supervisor: {happening}"));
        }
        timeline.last_tick = Instant::now();
        let state = match timeline.look(&pool, &people).await {
            Ok(state) => state,
            Err(error) => {
                timeline.say(&format!("(could not read the loop's tables: {error:#})"));
                continue;
            }
        };
        if state.promoted_trained.is_some() && sessions_to_promotion.is_none() {
            sessions_to_promotion = Some(people.lock().expect("not poisoned").sessions);
        }
        if bad.is_none() && (state.trained_in_canary || started.elapsed() > options.inject_after) {
            match inject_bad_model(&pool, &running.endpoints, site).await {
                Ok(version) => {
                    timeline.say(&format!(
                        "demo: injected {version}, a random-weights model, registered as if it passed the gate"
                    ));
                    bad = Some((version, Utc::now()));
                }
                Err(error) => {
                    timeline.say(&format!("demo: could not inject the bad model: {error:#}"))
                }
            }
        }
        let rolled_back = match &bad {
            Some((version, _)) => {
                canary_status(&pool, version)
                    .await
                    .ok()
                    .flatten()
                    .as_deref()
                    == Some("rolled_back")
            }
            None => false,
        };
        let trained = match &state.promoted_trained {
            Some(promoted) => Some(promoted.clone()),
            // enough that a run trained on the people's pairs succeeded
            None if !options.need_promotion => state.trained_since.clone(),
            None => None,
        };
        if let (Some(trained), Some((bad, at)), true, false) = (
            trained,
            &bad,
            rolled_back,
            running.supervisor.chaos_running(),
        ) {
            break Ok((trained, bad.clone(), *at));
        }
        if started.elapsed() > options.timeout {
            break Err(anyhow::anyhow!(
                "the loop did not close in {} s: trained model promoted: {}; bad model rolled back: {}",
                options.timeout.as_secs(),
                state.promoted_trained.as_deref().unwrap_or("no"),
                if rolled_back { "yes" } else { "no" }
            ));
        }
    };
    if result.is_ok() {
        tokio::time::sleep(options.linger).await;
    }
    users.abort();
    let _ = users.await;
    let (promoted, bad, bad_announced_at) = result?;
    let people = std::mem::take(&mut *people.lock().expect("not poisoned"));
    Ok(Closed {
        since,
        stable_before,
        promoted,
        bad,
        bad_announced_at,
        sessions_to_promotion: sessions_to_promotion.unwrap_or(people.sessions),
        sessions: people.sessions,
        seen: people
            .by_version
            .into_iter()
            .map(|(v, s)| (v, (s.searches, s.clicks, s.shown, s.beauty, s.relevance)))
            .collect(),
        answered: people.answered,
        elapsed: started.elapsed(),
    })
}

/// Session numbers continue from earlier runs, so request and session ids
/// of a second demo never collide with the first's.
async fn first_session(pool: &PgPool) -> anyhow::Result<u64> {
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM impressions")
        .fetch_one(pool)
        .await?;
    Ok(n as u64 + 1_000_000 * (Utc::now().timestamp() as u64 % 1_000_000))
}

async fn canary_status(pool: &PgPool, candidate: &str) -> anyhow::Result<Option<String>> {
    Ok(
        sqlx::query_scalar("SELECT status FROM canaries WHERE candidate = $1")
            .bind(candidate)
            .fetch_optional(pool)
            .await?,
    )
}

/// A model that knows nothing (random weights), stored, registered as
/// trained from the serving version, marked as if it passed the gate and
/// announced on `model.registered.v1`: the canary must catch it.
async fn inject_bad_model(
    pool: &PgPool,
    endpoints: &crate::Endpoints,
    site: &up::LoopSite,
) -> anyhow::Result<String> {
    let dir = site
        .dir
        .join("models")
        .join(format!("bad-{}", Utc::now().format("%Y%m%d-%H%M%S")));
    let (world, out) = (site.world(), dir.clone());
    tokio::task::spawn_blocking(move || {
        kalon_model::export::export_random_reference(&world, &out, rand::random())
    })
    .await??;
    let store = ArtifactStore::from_url(&kalon_registry::artifact::default_url(&site.dir))?;
    let stored = store.put_dir(&dir).await?;
    let parent = lifecycle::promoted(pool).await?.map(|v| v.version);
    let version = lifecycle::register_trained(
        pool,
        NewVersion {
            parent: parent.clone(),
            training_run_id: None,
            artifact: stored.clone(),
            dimension: stored.embedding_dim,
            actor: "kalonctl demo".into(),
            reason: "a deliberately bad model (random weights) for the canary to catch".into(),
        },
    )
    .await?;
    lifecycle::gate(
        pool,
        &version,
        true,
        serde_json::json!({ "passed": true, "injected_by": "kalonctl demo", "checks": [] }),
        "kalonctl demo",
        "not gated: injected as if it had passed, to show the canary rolling it back",
    )
    .await?;
    let event = ModelRegistered {
        event_id: uuid::Uuid::now_v7(),
        occurred_at: Utc::now(),
        model_version: version.clone(),
        parent_version: parent,
        training_run_id: None,
        artifact_uri: stored.uri.clone(),
        artifact_sha256: stored.sha256.clone(),
        dimension: stored.embedding_dim as u32,
        gate: GateOutcome::Passed,
    };
    event.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
    let message = kalon_kafka::Outgoing {
        topic: endpoints.kafka.topic(ModelRegistered::TOPIC),
        key: Some(version.as_bytes().to_vec()),
        payload: event.to_json(),
        headers: None,
    };
    let kafka = endpoints.kafka.clone();
    tokio::task::spawn_blocking(move || kalon_kafka::produce_all(&kafka, [message], |_| {}))
        .await??;
    Ok(version)
}

/// A training run as the timeline shows it.
#[derive(sqlx::FromRow)]
struct RunRow {
    id: String,
    state: String,
    #[sqlx(rename = "model_version")]
    version: Option<String>,
    gate: Option<serde_json::Value>,
    #[sqlx(rename = "pair_counts")]
    pairs: serde_json::Value,
    reason: Option<String>,
}

/// What one look at the tables found that the end condition needs.
struct LoopState {
    /// A version trained by the trainer during this demo, promoted.
    promoted_trained: Option<String>,
    /// A trained version's canary is running (the bad model may queue).
    trained_in_canary: bool,
    /// The first version a run of this demo registered (gate passed or not).
    trained_since: Option<String>,
}

/// The live timeline: a compact line every 10 s, and a line for each
/// thing that happened (runs, registrations, canary decisions).
struct Timeline {
    since: DateTime<Utc>,
    started: Instant,
    last_tick: Instant,
    last_line: Instant,
    last_decision: i64,
    runs_seen: BTreeMap<String, String>,
    events_before: Option<(i64, Instant)>,
    sessions_before: Option<(u64, Instant)>,
}

impl Timeline {
    fn new(since: DateTime<Utc>, started: Instant) -> Timeline {
        let now = Instant::now();
        Timeline {
            since,
            started,
            last_tick: now,
            last_line: now - Duration::from_secs(60),
            last_decision: 0,
            runs_seen: BTreeMap::new(),
            events_before: None,
            sessions_before: None,
        }
    }

    fn say(&self, what: &str) {
        println!("[{:>4}s] {what}", self.started.elapsed().as_secs());
    }

    async fn look(&mut self, pool: &PgPool, people: &Mutex<People>) -> anyhow::Result<LoopState> {
        // runs that started or finished
        let runs: Vec<RunRow> = sqlx::query_as(
            "SELECT r.id::text, r.state, r.model_version, v.gate, r.pair_counts, r.reason
             FROM training_runs r LEFT JOIN model_versions v ON v.version = r.model_version
             WHERE r.started_at >= $1 ORDER BY r.started_at",
        )
        .bind(self.since)
        .fetch_all(pool)
        .await?;
        for RunRow {
            id,
            state,
            version,
            gate,
            pairs,
            reason,
        } in runs
        {
            if self.runs_seen.get(&id) == Some(&state) {
                continue;
            }
            self.runs_seen.insert(id.clone(), state.clone());
            let short = &id[..8];
            match state.as_str() {
                "running" => self.say(&format!("trainer: run {short} started")),
                "succeeded" => self.say(&format!(
                    "trainer: run {short} trained {} on {}; {}",
                    version.as_deref().unwrap_or("?"),
                    pair_summary(&pairs),
                    gate_summary(gate.as_ref())
                )),
                other => self.say(&format!(
                    "trainer: run {short} {other}: {}",
                    reason.as_deref().unwrap_or("")
                )),
            }
        }
        // canary decisions other than holds
        let decisions: Vec<(i64, String, String, f64, String)> = sqlx::query_as(
            "SELECT id, candidate, action, share, reason FROM canary_decisions
             WHERE id > $1 AND at >= $2 AND action <> 'hold' ORDER BY id",
        )
        .bind(self.last_decision)
        .bind(self.since)
        .fetch_all(pool)
        .await?;
        for (id, candidate, action, share, reason) in decisions {
            self.last_decision = id;
            self.say(&format!(
                "canary: {action} {candidate} -> {:.0}% of traffic: {reason}",
                share * 100.0
            ));
        }
        if self.last_line.elapsed() >= Duration::from_secs(10) {
            self.last_line = Instant::now();
            self.status_line(pool, people).await?;
        }
        let promoted_trained: Option<String> = sqlx::query_scalar(
            "SELECT c.candidate FROM canaries c JOIN model_versions v ON v.version = c.candidate
             WHERE c.status = 'promoted' AND c.finished_at >= $1 AND v.training_run_id IS NOT NULL
             ORDER BY c.finished_at LIMIT 1",
        )
        .bind(self.since)
        .fetch_optional(pool)
        .await?;
        let (trained_in_canary,): (bool,) = sqlx::query_as(
            "SELECT EXISTS (SELECT 1 FROM canaries c JOIN model_versions v ON v.version = c.candidate
             WHERE c.status IN ('running', 'promoted', 'rolled_back') AND c.started_at >= $1
               AND v.training_run_id IS NOT NULL)",
        )
        .bind(self.since)
        .fetch_one(pool)
        .await?;
        let trained_since: Option<String> = sqlx::query_scalar(
            "SELECT model_version FROM training_runs
             WHERE state = 'succeeded' AND started_at >= $1 ORDER BY finished_at LIMIT 1",
        )
        .bind(self.since)
        .fetch_optional(pool)
        .await?
        .flatten();
        Ok(LoopState {
            promoted_trained,
            trained_in_canary,
            trained_since,
        })
    }

    async fn status_line(&mut self, pool: &PgPool, people: &Mutex<People>) -> anyhow::Result<()> {
        let (events,): (i64,) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM impressions WHERE ingested_at >= $1)
                  + (SELECT count(*) FROM clicks WHERE ingested_at >= $1)
                  + (SELECT count(*) FROM ratings WHERE ingested_at >= $1)",
        )
        .bind(self.since)
        .fetch_one(pool)
        .await?;
        let now = Instant::now();
        let events_per_s = self.events_before.map_or(0.0, |(n, at)| {
            (events - n) as f64 / now.duration_since(at).as_secs_f64().max(1e-3)
        });
        self.events_before = Some((events, now));
        let sessions = people.lock().expect("not poisoned").sessions;
        let sessions_per_s = self.sessions_before.map_or(0.0, |(n, at)| {
            (sessions - n) as f64 / now.duration_since(at).as_secs_f64().max(1e-3)
        });
        self.sessions_before = Some((sessions, now));
        let pairs: Vec<(String, i64)> = sqlx::query_as(
            "SELECT source, count(*) FROM preference_pairs WHERE created_at >= $1
             GROUP BY source ORDER BY source",
        )
        .bind(self.since)
        .fetch_all(pool)
        .await?;
        let pairs = if pairs.is_empty() {
            "none yet".to_owned()
        } else {
            pairs
                .iter()
                .map(|(s, n)| format!("{s} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let (runs,): (i64,) =
            sqlx::query_as("SELECT count(*) FROM training_runs WHERE started_at >= $1")
                .bind(self.since)
                .fetch_one(pool)
                .await?;
        let canary: Option<(String, String, i32)> = sqlx::query_as(
            "SELECT candidate, status, step FROM canaries WHERE status IN ('running', 'paused')",
        )
        .fetch_optional(pool)
        .await?;
        let canary = match canary {
            Some((candidate, status, step)) => format!("{candidate} {status} step {step}"),
            None => "idle".into(),
        };
        self.say(&format!(
            "people {sessions_per_s:.1} sessions/s | ingested {events_per_s:.0} events/s | pairs {pairs} | runs {runs} | canary {canary}"
        ));
        Ok(())
    }
}

fn pair_summary(counts: &serde_json::Value) -> String {
    match counts.as_object() {
        Some(map) if !map.is_empty() => map
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", "),
        _ => "no pairs".into(),
    }
}

/// `gate passed: hpir_accuracy -0.004 ...` from a stored gate report.
fn gate_summary(gate: Option<&serde_json::Value>) -> String {
    let Some(gate) = gate else {
        return "no gate figures".into();
    };
    let passed = gate.get("passed").and_then(|p| p.as_bool()) == Some(true);
    let checks: Vec<String> = gate
        .get("checks")
        .and_then(|c| c.as_array())
        .map(|checks| {
            checks
                .iter()
                .map(|c| {
                    format!(
                        "{} {:+.3}",
                        c.get("metric").and_then(|m| m.as_str()).unwrap_or("?"),
                        c.get("change").and_then(|x| x.as_f64()).unwrap_or(f64::NAN)
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    format!(
        "gate {}: {}",
        if passed { "passed" } else { "FAILED" },
        checks.join(", ")
    )
}

async fn summary(
    pool: &PgPool,
    site: &up::LoopSite,
    closed: &Closed,
    started: Instant,
) -> anyhow::Result<()> {
    let (promoted, bad) = (closed.promoted.as_str(), closed.bad.as_str());
    println!(
        "\nthe loop closed in {} s ({} s from the first search), with no person involved:",
        started.elapsed().as_secs(),
        closed.elapsed.as_secs()
    );
    println!("  (a) {promoted}, trained from the people's feedback, was canaried and promoted");
    println!("  (b) {bad}, a deliberately bad model, was rolled back automatically");
    println!(
        "\nwhat the people saw ({} sessions; the oracle's mean beauty and relevance of the results shown):",
        closed.sessions
    );
    for (label, version) in [
        ("before", closed.stable_before.as_str()),
        ("after", promoted),
        ("bad (canaried)", bad),
    ] {
        match (closed.seen.get(version), closed.figures(version)) {
            (Some(&(searches, ..)), Some((ctr, beauty, relevance))) => println!(
                "  {label:<15} {version:<28} {searches:>6} searches  CTR {ctr:.3}  beauty {beauty:.3}  relevance {relevance:.3}"
            ),
            _ => println!("  {label:<15} {version:<28} (served no one)"),
        }
    }
    for (candidate, word) in [(promoted, "promoted"), (bad, "rolled back")] {
        let decisions: Vec<(String, f64, String)> = sqlx::query_as(
            "SELECT d.action, d.share, d.reason FROM canary_decisions d
             JOIN canaries c ON c.id = d.canary_id
             WHERE c.candidate = $1 AND d.action <> 'hold' ORDER BY d.id",
        )
        .bind(candidate)
        .fetch_all(pool)
        .await?;
        println!("\nwhy {candidate} was {word}:");
        for (action, share, reason) in decisions {
            println!("  {action:<9} {:>4.0}%  {reason}", share * 100.0);
        }
    }
    println!("\nthe promoted model's lineage (all of it: `kalonctl models why {promoted}`):");
    let lineage = kalon_registry::lineage::why(pool, promoted)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    for generation in &lineage.generations {
        let row = &generation.row;
        let made = match &generation.run {
            Some(run) => format!(
                "trained by run {} from {} on {}; {}",
                &run.id.to_string()[..8],
                run.parent_version.as_deref().unwrap_or("nothing"),
                pair_summary(&run.pair_counts),
                gate_summary(row.gate.as_ref())
            ),
            None => "registered by a person".into(),
        };
        println!("  {} [{}]  {made}", row.version, row.state);
    }
    println!(
        "\nthe demo's loop ran in its own database, made anew on each run:\n  export DATABASE_URL={}",
        kalon_db::redact(&site.endpoints_db)
    );
    println!(
        "\nwhere to look:\n  kalonctl canary history   every decision with its evidence\n  \
         kalonctl runs list        the trainer's runs\n  kalonctl pairs stats      \
         preference pairs by source\n  kalonctl up               the loop without the demo, \
         until Ctrl-C, with its console on {}/\n  logs                      {}\n  docker compose up -d      \
         the same services with Apache Kafka; Grafana on http://localhost:3000",
        site.console_url(),
        site.dir.join("logs").display()
    );
    Ok(())
}
