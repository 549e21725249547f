//! What the pages show, read from the loop's tables: the stages' figures,
//! the canaries with every decision and its evidence, the registry, the
//! training runs and a version's lineage.

use chrono::{DateTime, Utc};
use kalon_canary::ops;
use kalon_registry::lifecycle;
use kalon_registry::store;
use serde::Serialize;
use serde_json::{json, Value};
use sqlx::PgPool;

/// The window the rates are measured over, in seconds.
pub const RATE_WINDOW_S: i64 = 60;

/// The loop's stages with live figures.
#[derive(Debug, Serialize)]
pub struct Overview {
    pub at: DateTime<Utc>,
    pub events: Events,
    pub enricher: Enricher,
    /// Preference pairs by source.
    pub pairs: Vec<Pairs>,
    pub last_run: Option<RunRow>,
    pub promoted: Option<String>,
    /// What search serves: every deployment with its weight.
    pub serving: Vec<Serving>,
    /// The canary in flight, else the latest one.
    pub canary: Option<CanarySummary>,
}

/// Events ingested per second over the last minute, by table.
#[derive(Debug, Serialize)]
pub struct Events {
    pub window_s: i64,
    pub impressions_per_s: f64,
    pub clicks_per_s: f64,
    pub ratings_per_s: f64,
    /// Impressions of the last minute by the version that served them.
    pub impressions_by_version: Vec<(String, i64)>,
}

#[derive(Debug, Serialize)]
pub struct Enricher {
    /// Queries waiting for their rephrasings, and done.
    pub pending: i64,
    pub done: i64,
    /// LMM judgments stored in the last hour.
    pub judgments_last_hour: i64,
}

#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct Pairs {
    pub source: String,
    pub total: i64,
    pub last_hour: i64,
}

#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct RunRow {
    pub id: String,
    pub state: String,
    pub model_version: Option<String>,
    pub parent_version: Option<String>,
    pub trigger_kind: String,
    pub reason: Option<String>,
    pub pair_counts: Value,
    pub progress: Value,
    pub timings: Value,
    pub gate: Option<Value>,
    pub device: Option<String>,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Serialize)]
pub struct Serving {
    pub model_version: String,
    pub variant: String,
    pub weight: f64,
    /// Its share of the traffic (weight over the weights' sum).
    pub share: f64,
    pub interleave: f64,
    pub state: String,
}

#[derive(Debug, Serialize)]
pub struct CanarySummary {
    pub id: i64,
    pub candidate: String,
    pub stable: Option<String>,
    pub status: String,
    pub step: u32,
    pub share: f64,
    pub last_action: Option<String>,
    pub last_reason: Option<String>,
    pub last_at: Option<DateTime<Utc>>,
}

pub async fn overview(pool: &PgPool) -> sqlx::Result<Overview> {
    let (at, impressions, clicks, ratings): (DateTime<Utc>, i64, i64, i64) = sqlx::query_as(
        "SELECT now(),
                (SELECT count(*) FROM impressions WHERE occurred_at >= now() - make_interval(secs => $1)),
                (SELECT count(*) FROM clicks WHERE occurred_at >= now() - make_interval(secs => $1)),
                (SELECT count(*) FROM ratings WHERE occurred_at >= now() - make_interval(secs => $1))",
    )
    .bind(RATE_WINDOW_S as f64)
    .fetch_one(pool)
    .await?;
    let impressions_by_version: Vec<(String, i64)> = sqlx::query_as(
        "SELECT model_version, count(*) FROM impressions
         WHERE occurred_at >= now() - make_interval(secs => $1)
         GROUP BY model_version ORDER BY count(*) DESC",
    )
    .bind(RATE_WINDOW_S as f64)
    .fetch_all(pool)
    .await?;
    let per_s = |n: i64| n as f64 / RATE_WINDOW_S as f64;
    let (pending, done, judgments_last_hour): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM enrich_queries WHERE status = 'pending'),
                (SELECT count(*) FROM enrich_queries WHERE status = 'done'),
                (SELECT count(*) FROM lmm_judgments WHERE created_at >= now() - interval '1 hour')",
    )
    .fetch_one(pool)
    .await?;
    let pairs = sqlx::query_as(
        "SELECT source, count(*) AS total,
                count(*) FILTER (WHERE created_at >= now() - interval '1 hour') AS last_hour
         FROM preference_pairs GROUP BY source ORDER BY source",
    )
    .fetch_all(pool)
    .await?;
    let last_run = runs(pool, 1).await?.pop();
    let promoted = lifecycle::promoted(pool).await?.map(|v| v.version);
    let deployments = store::deployments(pool).await?;
    let total: f64 = deployments.iter().map(|d| d.weight).sum();
    let serving = deployments
        .into_iter()
        .map(|d| Serving {
            share: if total > 0.0 { d.weight / total } else { 0.0 },
            model_version: d.model_version,
            variant: d.variant,
            weight: d.weight,
            interleave: d.interleave,
            state: d.state.as_str().to_owned(),
        })
        .collect();
    let canary = ops::status(pool).await?.map(|report| CanarySummary {
        id: report.canary.id,
        candidate: report.canary.candidate.clone(),
        stable: report.canary.stable.clone(),
        status: report.canary.status.as_str().to_owned(),
        step: report.canary.step,
        share: report.share,
        last_action: report.last.as_ref().map(|d| d.action.as_str().to_owned()),
        last_reason: report.last.as_ref().map(|d| d.reason.clone()),
        last_at: report.last.as_ref().map(|d| d.at),
    });
    Ok(Overview {
        at,
        events: Events {
            window_s: RATE_WINDOW_S,
            impressions_per_s: per_s(impressions),
            clicks_per_s: per_s(clicks),
            ratings_per_s: per_s(ratings),
            impressions_by_version,
        },
        enricher: Enricher {
            pending,
            done,
            judgments_last_hour,
        },
        pairs,
        last_run,
        promoted,
        serving,
        canary,
    })
}

/// The latest `limit` training runs, newest first, with the gate of the
/// version each made.
pub async fn runs(pool: &PgPool, limit: i64) -> sqlx::Result<Vec<RunRow>> {
    sqlx::query_as(
        "SELECT r.id::text AS id, r.state, r.model_version, r.parent_version,
                t.kind AS trigger_kind, r.reason, r.pair_counts, r.progress, r.timings,
                coalesce(v.gate, r.gate) AS gate, r.device, r.started_at, r.finished_at
         FROM training_runs r
         JOIN training_triggers t ON t.id = r.trigger_id
         LEFT JOIN model_versions v ON v.version = r.model_version
         ORDER BY r.started_at DESC LIMIT $1",
    )
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// Every registered version, newest first, with its deployment (if any)
/// and the pairs of the run that made it.
pub async fn models(pool: &PgPool) -> sqlx::Result<Vec<Value>> {
    let deployments = store::deployments(pool).await?;
    let pair_counts: Vec<(String, Value)> = sqlx::query_as(
        "SELECT model_version, pair_counts FROM training_runs
         WHERE model_version IS NOT NULL AND state = 'succeeded'",
    )
    .fetch_all(pool)
    .await?;
    let mut versions = store::versions(pool).await?;
    versions.sort_by_key(|v| std::cmp::Reverse(v.created_at));
    Ok(versions
        .into_iter()
        .map(|v| {
            let deployment = deployments
                .iter()
                .find(|d| d.model_version == v.version)
                .map(|d| json!({ "variant": d.variant, "weight": d.weight, "interleave": d.interleave }));
            let pairs = pair_counts
                .iter()
                .find(|(version, _)| *version == v.version)
                .map(|(_, counts)| counts.clone());
            json!({
                "version": v.version,
                "parent": v.parent,
                "state": v.state.as_str(),
                "embedding_dim": v.embedding_dim,
                "images_indexed": v.images_indexed,
                "gate": v.gate,
                "training_run_id": v.training_run_id,
                "artifact_sha256": v.artifact_sha256,
                "created_at": v.created_at,
                "indexed_at": v.indexed_at,
                "deployment": deployment,
                "pair_counts": pairs,
            })
        })
        .collect())
}
