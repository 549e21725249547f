//! `kalon-bench loop`: the closed loop (`kalonctl demo`'s) at a fixed
//! traffic rate, with its latencies measured: a click posted to search's
//! API until its row is queryable in Postgres (probes beside the simulated
//! people), a version announced on `model.registered.v1` until it serves
//! canary traffic, a rollback decision until its version serves nothing,
//! and a preference pair until a training run includes it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use kalonctl::demo::{close_the_loop, Closed, LoopOptions};
use kalonctl::up::{self, Pace, UpArgs};
use kalonctl::Globals;
use sqlx::PgPool;

#[derive(clap::Args, Clone, Debug)]
pub struct LoopBenchArgs {
    #[arg(long, default_value_t = 1_000)]
    pub images: usize,
    #[arg(long, default_value_t = 1)]
    pub world_seed: u64,
    /// The people's sessions per second.
    #[arg(long, default_value_t = 20.0)]
    pub rate: f64,
    /// Click probes per second (a search, then a click on its first result,
    /// timed until the click's row is in Postgres).
    #[arg(long, default_value_t = 2.0)]
    pub probes: f64,
    #[arg(long, default_value_t = 900)]
    pub timeout_s: u64,
    /// See `kalonctl up --port-base`.
    #[arg(long)]
    pub port_base: Option<u16>,
}

pub async fn run(cli: &Globals, args: &LoopBenchArgs) -> anyhow::Result<()> {
    tokio::task::spawn_blocking(kalonctl::tools::ensure_onnxruntime).await??;
    let running = up::bring_up(
        cli,
        &UpArgs {
            images: args.images,
            world_seed: args.world_seed,
            pace: Pace::Demo,
            port_base: args.port_base,
            chaos_every_s: None,
            fresh_database: Some("kalon_bench_loop".into()),
            admin_token: None,
        },
    )
    .await?;
    let outcome = measure(&running, args).await;
    running.supervisor.stop().await;
    outcome
}

async fn measure(running: &up::Running, args: &LoopBenchArgs) -> anyhow::Result<()> {
    let pool = kalon_db::connect(&running.endpoints.database_url, 4).await?;
    let latencies = Arc::new(Mutex::new(Vec::<f64>::new()));
    let probing = tokio::spawn(probe_clicks(
        running.site.search_url(),
        pool.clone(),
        args.probes,
        latencies.clone(),
    ));
    let closed = close_the_loop(
        running,
        &LoopOptions {
            images: args.images,
            rate: args.rate,
            users_seed: 1,
            timeout: Duration::from_secs(args.timeout_s),
            inject_after: Duration::from_secs(300),
            need_promotion: true,
            linger: Duration::from_secs(15),
        },
    )
    .await;
    probing.abort();
    let closed = closed?;
    let mut clicks = latencies.lock().expect("not poisoned").clone();
    clicks.sort_by(f64::total_cmp);
    anyhow::ensure!(!clicks.is_empty(), "no click probe completed");

    // the bad version waits in the queue behind the trained one: from the
    // moment the controller was free (the trained canary's end) instead
    let trained_ended: Option<DateTime<Utc>> =
        sqlx::query_scalar("SELECT finished_at FROM canaries WHERE candidate = $1")
            .bind(&closed.promoted)
            .fetch_optional(&pool)
            .await?
            .flatten();
    let bad_free_to_canary = first_serving(&pool, &closed.bad).await?.map(|at| {
        seconds(
            trained_ended.map_or(closed.bad_announced_at, |t| t.max(closed.bad_announced_at)),
            at,
        )
    });
    let trained_registered_to_canary = trained_registered_to_canary(&pool, &closed).await?;
    let (decision_to_rollback, traffic_after) = rollback_latency(&pool, &closed.bad).await?;
    let (fresh_p50, fresh_p99, pairs_included) = pair_freshness(&pool, closed.since).await?;

    let figures = |v: &str| closed.figures(v).unwrap_or((f64::NAN, f64::NAN, f64::NAN));
    let (ctr_before, beauty_before, relevance_before) = figures(&closed.stable_before);
    let (ctr_after, beauty_after, relevance_after) = figures(&closed.promoted);
    let line = serde_json::json!({
        "bench": "loop",
        "images": args.images,
        "rate_sessions_per_s": args.rate,
        "loop_s": closed.elapsed.as_secs_f64(),
        "sessions": closed.sessions,
        "click_probes": clicks.len(),
        "click_to_row_p50_ms": percentile(&clicks, 0.5),
        "click_to_row_p99_ms": percentile(&clicks, 0.99),
        // announced -> first canary impression, with the controller idle
        // (an adapter version: indexed from its parent's embeddings)
        "registered_to_canary_s": trained_registered_to_canary,
        // a whole new model, queued: controller free -> first impression
        // (its catalog embedded by the new towers first)
        "queued_full_model_to_canary_s": bad_free_to_canary,
        "decision_to_rollback_s": decision_to_rollback,
        "rolled_back_impressions_after_decision_plus_10s": traffic_after,
        "pair_to_run_p50_s": fresh_p50,
        "pair_to_run_p99_s": fresh_p99,
        "pairs_included": pairs_included,
        "sessions_to_promotion": closed.sessions_to_promotion,
        "promoted": closed.promoted,
        "rolled_back": closed.bad,
        "before": { "version": closed.stable_before, "ctr": ctr_before, "beauty": beauty_before, "relevance": relevance_before },
        "after": { "version": closed.promoted, "ctr": ctr_after, "beauty": beauty_after, "relevance": relevance_after },
    });
    println!("{line}");
    Ok(())
}

fn seconds(from: DateTime<Utc>, to: DateTime<Utc>) -> f64 {
    (to - from).num_milliseconds() as f64 / 1000.0
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i]
}

/// When `version` first served a search (its first impression).
async fn first_serving(pool: &PgPool, version: &str) -> anyhow::Result<Option<DateTime<Utc>>> {
    Ok(
        sqlx::query_scalar("SELECT min(occurred_at) FROM impressions WHERE model_version = $1")
            .bind(version)
            .fetch_one(pool)
            .await?,
    )
}

/// The trained version's announcement (its run's `announced_at`) until
/// its first impression.
async fn trained_registered_to_canary(
    pool: &PgPool,
    closed: &Closed,
) -> anyhow::Result<Option<f64>> {
    let announced: Option<DateTime<Utc>> = sqlx::query_scalar(
        "SELECT r.announced_at FROM training_runs r JOIN model_versions v ON v.training_run_id = r.id
         WHERE v.version = $1",
    )
    .bind(&closed.promoted)
    .fetch_optional(pool)
    .await?
    .flatten();
    let first = first_serving(pool, &closed.promoted).await?;
    Ok(announced.zip(first).map(|(a, f)| seconds(a, f)))
}

/// The rollback decision until the version's last impression (0 when none
/// came after it), and the impressions later than 10 s after it (must be 0).
async fn rollback_latency(pool: &PgPool, version: &str) -> anyhow::Result<(f64, i64)> {
    let decided: DateTime<Utc> = sqlx::query_scalar(
        "SELECT d.at FROM canary_decisions d JOIN canaries c ON c.id = d.canary_id
         WHERE c.candidate = $1 AND d.action = 'rollback'",
    )
    .bind(version)
    .fetch_one(pool)
    .await?;
    let last: Option<DateTime<Utc>> =
        sqlx::query_scalar("SELECT max(occurred_at) FROM impressions WHERE model_version = $1")
            .bind(version)
            .fetch_one(pool)
            .await?;
    let (after,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM impressions WHERE model_version = $1 AND occurred_at > $2",
    )
    .bind(version)
    .bind(decided + chrono::Duration::seconds(10))
    .fetch_one(pool)
    .await?;
    Ok((last.map_or(0.0, |l| seconds(decided, l).max(0.0)), after))
}

/// For each pair made since `since` that a succeeded run trained on (its
/// window holds the pair): seconds from the pair to that run's start;
/// p50, p99 and how many.
async fn pair_freshness(
    pool: &PgPool,
    since: DateTime<Utc>,
) -> anyhow::Result<(Option<f64>, Option<f64>, i64)> {
    let (p50, p99, n): (Option<f64>, Option<f64>, i64) = sqlx::query_as(
        "WITH included AS (
           SELECT p.id, min(extract(epoch FROM r.started_at - p.created_at))::float8 AS delay
           FROM preference_pairs p
           JOIN training_runs r ON r.state = 'succeeded'
             AND p.created_at <= r.window_end AND p.created_at >= r.window_start
           WHERE p.created_at >= $1
           GROUP BY p.id)
         SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY delay),
                percentile_cont(0.99) WITHIN GROUP (ORDER BY delay), count(*)
         FROM included",
    )
    .bind(since)
    .fetch_one(pool)
    .await?;
    Ok((p50, p99, n))
}

/// Every `1 / rate` s: a search, then a click on its first result through
/// the feedback API, timed from the click's POST until its row answers a
/// query in Postgres.
async fn probe_clicks(
    search_url: String,
    pool: PgPool,
    rate: f64,
    latencies: Arc<Mutex<Vec<f64>>>,
) {
    kalon_telemetry::install_crypto_provider();
    let Ok(http) = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
    else {
        return;
    };
    let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(0.01)));
    for n in 0u64.. {
        ticks.tick().await;
        let (http, pool, url, latencies) = (
            http.clone(),
            pool.clone(),
            search_url.clone(),
            latencies.clone(),
        );
        tokio::spawn(async move {
            if let Ok(ms) = probe(&http, &pool, &url, n).await {
                latencies.lock().expect("not poisoned").push(ms);
            }
        });
    }
}

async fn probe(http: &reqwest::Client, pool: &PgPool, url: &str, n: u64) -> anyhow::Result<f64> {
    let answer = post_json(
        http,
        &format!("{url}/v1/search"),
        serde_json::json!({
            "query": "a quiet landscape", "k": 10,
            "session_id": format!("probe-{n}"), "user_id": "probe"
        }),
    )
    .await?;
    let request_id = answer["request_id"].as_str().unwrap_or_default().to_owned();
    let image_id = answer["results"][0]["image_id"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("no results"))?
        .to_owned();
    let posted = Instant::now();
    let accepted = post_json(
        http,
        &format!("{url}/v1/feedback/click"),
        serde_json::json!({
            "request_id": request_id, "image_id": image_id, "rank": 1, "dwell_ms": 1000
        }),
    )
    .await?;
    let event_id: uuid::Uuid = accepted["event_id"].as_str().unwrap_or_default().parse()?;
    while posted.elapsed() < Duration::from_secs(60) {
        let found: Option<i32> = sqlx::query_scalar("SELECT 1 FROM clicks WHERE event_id = $1")
            .bind(event_id)
            .fetch_optional(pool)
            .await?;
        if found.is_some() {
            return Ok(posted.elapsed().as_secs_f64() * 1000.0);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    anyhow::bail!("click {event_id} not in Postgres after 60 s")
}

async fn post_json(
    http: &reqwest::Client,
    url: &str,
    body: serde_json::Value,
) -> anyhow::Result<serde_json::Value> {
    let response = http
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await?
        .error_for_status()?;
    Ok(serde_json::from_slice(&response.bytes().await?)?)
}
