//! The trainer's tables: triggers, runs, and the preference pairs it reads
//! (migrations/20261207000001_registry_and_trainer.sql).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use kalon_align::{PairSource, PreferencePair};
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

/// A trigger waiting to be trained.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Trigger {
    pub id: String,
    pub kind: String,
    pub requested_by: String,
    pub reason: String,
    pub attempts: i32,
}

/// Creates a trigger unless one with its id exists; says whether it did.
pub async fn create_trigger(
    pool: &PgPool,
    id: &str,
    kind: &str,
    requested_by: &str,
    reason: &str,
) -> sqlx::Result<bool> {
    let done = sqlx::query(
        "INSERT INTO training_triggers (id, kind, requested_by, reason) VALUES ($1, $2, $3, $4)
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(id)
    .bind(kind)
    .bind(requested_by)
    .bind(reason)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// `kalonctl train now`: a manual trigger; returns its id.
pub async fn request_manual(
    pool: &PgPool,
    requested_by: &str,
    reason: &str,
) -> sqlx::Result<String> {
    let id = format!("manual:{}", Uuid::now_v7());
    create_trigger(pool, &id, "manual", requested_by, reason).await?;
    Ok(id)
}

/// The oldest pending trigger.
pub async fn next_pending(pool: &PgPool) -> sqlx::Result<Option<Trigger>> {
    sqlx::query_as(
        "SELECT id, kind, requested_by, reason, attempts FROM training_triggers
         WHERE state = 'pending' ORDER BY created_at, id LIMIT 1",
    )
    .fetch_optional(pool)
    .await
}

/// The newest cron trigger's tick (its id is `cron:<RFC 3339 tick>`).
pub async fn last_cron_tick(pool: &PgPool) -> sqlx::Result<Option<DateTime<Utc>>> {
    let id: Option<(String,)> = sqlx::query_as(
        "SELECT id FROM training_triggers WHERE kind = 'cron' ORDER BY id DESC LIMIT 1",
    )
    .fetch_optional(pool)
    .await?;
    Ok(id.and_then(|(id,)| {
        id.strip_prefix("cron:")
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&Utc))
    }))
}

/// A cron trigger's id: the tick, fixed-width so ids sort by time.
pub fn cron_trigger_id(tick: DateTime<Utc>) -> String {
    format!("cron:{}", tick.format("%Y-%m-%dT%H:%M:%SZ"))
}

/// Starts attempt `attempts + 1` of `trigger` as a run owned by `owner`;
/// `None` (and the trigger failed) when it has had `max_attempts`.
pub async fn start_run(
    pool: &PgPool,
    trigger: &Trigger,
    owner: &str,
    max_attempts: i32,
) -> sqlx::Result<Option<Uuid>> {
    let mut tx = pool.begin().await?;
    let Some((attempts,)): Option<(i32,)> = sqlx::query_as(
        "UPDATE training_triggers SET attempts = attempts + 1 WHERE id = $1 AND state = 'pending'
         RETURNING attempts",
    )
    .bind(&trigger.id)
    .fetch_optional(&mut *tx)
    .await?
    else {
        // it ended meanwhile: nothing to attempt
        return Ok(None);
    };
    if attempts > max_attempts {
        sqlx::query(
            "UPDATE training_triggers SET state = 'failed', finished_at = now(), attempts = $2 WHERE id = $1",
        )
        .bind(&trigger.id)
        .bind(max_attempts)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        return Ok(None);
    }
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO training_runs (id, trigger_id, attempt, owner) VALUES ($1, $2, $3, $4)",
    )
    .bind(id)
    .bind(&trigger.id)
    .bind(attempts)
    .bind(owner)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Some(id))
}

/// What a run is about to train on.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub parent_version: Option<String>,
    pub window_start: DateTime<Utc>,
    pub window_end: DateTime<Utc>,
    pub pair_counts: serde_json::Value,
    pub config: serde_json::Value,
    pub device: String,
}

pub async fn set_plan(pool: &PgPool, run: Uuid, plan: &Plan) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE training_runs SET parent_version = $2, window_start = $3, window_end = $4,
           pair_counts = $5, config = $6, device = $7, heartbeat_at = now()
         WHERE id = $1",
    )
    .bind(run)
    .bind(&plan.parent_version)
    .bind(plan.window_start)
    .bind(plan.window_end)
    .bind(&plan.pair_counts)
    .bind(&plan.config)
    .bind(&plan.device)
    .execute(pool)
    .await?;
    Ok(())
}

/// A live run's heartbeat, with its latest figures (kept when `progress`
/// is null); false when the run is no longer running (another leader
/// marked it interrupted).
pub async fn heartbeat(
    pool: &PgPool,
    run: Uuid,
    progress: &serde_json::Value,
) -> sqlx::Result<bool> {
    let done = sqlx::query(
        "UPDATE training_runs SET heartbeat_at = now(),
           progress = CASE WHEN $2 = 'null'::jsonb THEN progress ELSE $2 END
         WHERE id = $1 AND state = 'running'",
    )
    .bind(run)
    .bind(progress)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Ends a run that registered nothing: 'skipped' (too little data, no
/// parent) or 'failed' (an error); its trigger ends the same way.
pub async fn end_run(
    pool: &PgPool,
    run: Uuid,
    state: &str,
    reason: &str,
    timings: &serde_json::Value,
) -> sqlx::Result<()> {
    debug_assert!(matches!(state, "skipped" | "failed"));
    let mut tx = pool.begin().await?;
    // only a run still running: one that succeeded (a commit whose
    // acknowledgement was lost) or that another leader interrupted stays
    let Some((trigger,)): Option<(String,)> = sqlx::query_as(
        "UPDATE training_runs SET state = $2, reason = $3, timings = $4, finished_at = now()
         WHERE id = $1 AND state = 'running' RETURNING trigger_id",
    )
    .bind(run)
    .bind(state)
    .bind(reason)
    .bind(timings)
    .fetch_optional(&mut *tx)
    .await?
    else {
        return Ok(());
    };
    sqlx::query(
        "UPDATE training_triggers SET state = $2, finished_at = now() WHERE id = $1 AND state = 'pending'",
    )
        .bind(&trigger)
        .bind(state)
        .execute(&mut *tx)
        .await?;
    tx.commit().await
}

/// Marks runs whose trainer is gone (still 'running', heartbeat older than
/// `stale_after`) as interrupted; their triggers stay pending and are
/// attempted again. Returns them.
pub async fn interrupt_stale(
    pool: &PgPool,
    stale_after: std::time::Duration,
) -> sqlx::Result<Vec<(Uuid, String, String)>> {
    sqlx::query_as(
        "UPDATE training_runs SET state = 'interrupted', finished_at = now(),
           reason = 'the trainer running it stopped (owner ' || owner || ', last heartbeat ' || heartbeat_at || ')'
         WHERE state = 'running' AND heartbeat_at < now() - make_interval(secs => $1)
         RETURNING id, trigger_id, owner",
    )
    .bind(stale_after.as_secs_f64())
    .fetch_all(pool)
    .await
}

/// A run marked running (its heartbeat may be stale: [`interrupt_stale`]
/// ends those).
pub async fn running(pool: &PgPool) -> sqlx::Result<Option<(Uuid, String)>> {
    sqlx::query_as("SELECT id, owner FROM training_runs WHERE state = 'running' LIMIT 1")
        .fetch_optional(pool)
        .await
}

/// The pairs created in `(start, end]`, in id order, and how many were
/// left out because the loss cannot use them (a blank query, a weight
/// beyond f32): counted, never a reason for every run to fail.
pub async fn pairs_in_window(
    pool: &PgPool,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
) -> sqlx::Result<(Vec<PreferencePair>, usize)> {
    let rows: Vec<(
        String,
        String,
        f64,
        String,
        String,
        String,
        serde_json::Value,
    )> = sqlx::query_as(
        "SELECT id, source, weight, query, winner, loser, provenance FROM preference_pairs
             WHERE created_at > $1 AND created_at <= $2 ORDER BY id",
    )
    .bind(start)
    .bind(end)
    .fetch_all(pool)
    .await?;
    let total = rows.len();
    let pairs: Vec<PreferencePair> = rows
        .into_iter()
        .filter_map(|(id, source, weight, query, winner, loser, provenance)| {
            Some(PreferencePair {
                query,
                winner,
                loser,
                source: PairSource::parse(&source)?,
                weight,
                provenance: serde_json::json!({ "pair_id": id, "made_by": provenance }),
            })
        })
        .filter(|pair| pair.validate().is_ok() && pair.weight <= f64::from(f32::MAX))
        .collect();
    let invalid = total - pairs.len();
    Ok((pairs, invalid))
}

/// The database's clock (pairs' `created_at` is on it).
pub async fn now(pool: &PgPool) -> sqlx::Result<DateTime<Utc>> {
    let (now,): (DateTime<Utc>,) = sqlx::query_as("SELECT now()").fetch_one(pool).await?;
    Ok(now)
}

/// Whether a trigger waits or a run is running: a tick then adds nothing
/// (the new pairs it would count are theirs).
pub async fn busy(pool: &PgPool) -> sqlx::Result<bool> {
    let (busy,): (bool,) = sqlx::query_as(
        "SELECT EXISTS (SELECT 1 FROM training_triggers WHERE state = 'pending')
             OR EXISTS (SELECT 1 FROM training_runs WHERE state = 'running')",
    )
    .fetch_one(pool)
    .await?;
    Ok(busy)
}

/// A candidate that still awaits the canary's verdict: passed the gate and
/// not yet indexed, or a trained version indexed or in canary (a person's
/// indexed version, never trained here, does not count).
pub async fn pending_candidate(pool: &PgPool) -> sqlx::Result<Option<String>> {
    sqlx::query_scalar(
        "SELECT version FROM model_versions
         WHERE state IN ('gated_passed', 'canary')
            OR (state = 'indexed' AND training_run_id IS NOT NULL)
         ORDER BY created_at LIMIT 1",
    )
    .fetch_optional(pool)
    .await
}

/// Pairs by source in a list.
pub fn counts_by_source(pairs: &[PreferencePair]) -> BTreeMap<&'static str, usize> {
    let mut counts = BTreeMap::new();
    for pair in pairs {
        *counts.entry(pair.source.as_str()).or_insert(0) += 1;
    }
    counts
}

/// Pairs created since the last successful run's window ended (all of
/// them before the first run).
pub async fn new_pairs(pool: &PgPool) -> sqlx::Result<i64> {
    let (count,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM preference_pairs WHERE created_at > COALESCE(
           (SELECT max(window_end) FROM training_runs WHERE state = 'succeeded'),
           '-infinity'::timestamptz)",
    )
    .fetch_one(pool)
    .await?;
    Ok(count)
}

/// A run's row, for kalonctl and tests.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Run {
    pub id: Uuid,
    pub trigger_id: String,
    pub attempt: i32,
    pub state: String,
    pub reason: Option<String>,
    pub parent_version: Option<String>,
    pub model_version: Option<String>,
    pub window_start: Option<DateTime<Utc>>,
    pub window_end: Option<DateTime<Utc>>,
    pub pair_counts: serde_json::Value,
    pub config: serde_json::Value,
    pub device: Option<String>,
    pub progress: serde_json::Value,
    pub timings: serde_json::Value,
    pub gate: Option<serde_json::Value>,
    pub owner: String,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub announced_at: Option<DateTime<Utc>>,
}

const RUN_COLUMNS: &str = "id, trigger_id, attempt, state, reason, parent_version, model_version,
    window_start, window_end, pair_counts, config, device, progress, timings, gate, owner,
    started_at, finished_at, announced_at";

/// The newest runs first.
pub async fn runs(pool: &PgPool, limit: i64) -> sqlx::Result<Vec<Run>> {
    sqlx::query_as(&format!(
        "SELECT {RUN_COLUMNS} FROM training_runs ORDER BY started_at DESC, id DESC LIMIT $1"
    ))
    .bind(limit)
    .fetch_all(pool)
    .await
}

pub async fn run(pool: &PgPool, id: Uuid) -> sqlx::Result<Option<Run>> {
    sqlx::query_as(&format!(
        "SELECT {RUN_COLUMNS} FROM training_runs WHERE id = $1"
    ))
    .bind(id)
    .fetch_optional(pool)
    .await
}

/// Runs of one trigger, in attempt order.
pub async fn runs_of(pool: &PgPool, trigger: &str) -> sqlx::Result<Vec<Run>> {
    sqlx::query_as(&format!(
        "SELECT {RUN_COLUMNS} FROM training_runs WHERE trigger_id = $1 ORDER BY attempt"
    ))
    .bind(trigger)
    .fetch_all(pool)
    .await
}

/// A trigger's state.
pub async fn trigger_state(pool: &PgPool, id: &str) -> sqlx::Result<Option<(String, i32)>> {
    sqlx::query_as("SELECT state, attempts FROM training_triggers WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await
}

/// A pair's id, derived from what it says and where it came from: the same
/// pair written twice is one row.
pub fn pair_id(pair: &PreferencePair) -> String {
    pair.id_with(&pair.provenance)
}

/// Writes pairs (each validated; ids from [`pair_id`], so rewriting one is
/// a no-op); returns how many were new. The preference builder's writer,
/// and how tests and benchmarks fill the table.
pub async fn insert_pairs(pool: &PgPool, pairs: &[PreferencePair]) -> anyhow::Result<u64> {
    let mut inserted = 0;
    for chunk in pairs.chunks(5000) {
        let mut columns: [Vec<String>; 5] = Default::default();
        let mut weights = Vec::with_capacity(chunk.len());
        let mut provenance = Vec::with_capacity(chunk.len());
        for (i, pair) in chunk.iter().enumerate() {
            pair.validate()
                .map_err(|e| anyhow::anyhow!("preference pair {}: {e}", i + 1))?;
            columns[0].push(pair_id(pair));
            columns[1].push(pair.source.as_str().to_owned());
            columns[2].push(pair.query.clone());
            columns[3].push(pair.winner.clone());
            columns[4].push(pair.loser.clone());
            weights.push(pair.weight);
            provenance.push(pair.provenance.clone());
        }
        let [ids, sources, queries, winners, losers] = columns;
        inserted += sqlx::query(
            "INSERT INTO preference_pairs (id, source, weight, query, winner, loser, provenance)
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::float8[], $4::text[], $5::text[],
                                  $6::text[], $7::jsonb[])
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(ids)
        .bind(sources)
        .bind(weights)
        .bind(queries)
        .bind(winners)
        .bind(losers)
        .bind(provenance)
        .execute(pool)
        .await?
        .rows_affected();
    }
    Ok(inserted)
}
