//! The builder's Postgres: pairs with ids derived from what made them, the
//! consumption marks written in the same transaction, the D_po queue and
//! the position-bias estimates.

use chrono::{DateTime, Utc};
use kalon_align::PreferencePair;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

/// A pair as stored: its id and where it was served.
#[derive(Debug, Clone, PartialEq)]
pub struct PairRow {
    pub id: String,
    pub pair: PreferencePair,
    pub model_version: Option<String>,
    pub variant: Option<String>,
}

/// A pair's id: [`PreferencePair::id_with`] of what made it (a click pair's
/// request, rule and ranks; a judgment's id; a rating pair's aspect; a D_po
/// pair's rephrasing and teacher). Weights are not part of it: the same
/// facts give the same id whatever the propensity estimate was when they
/// were built.
pub fn pair_id(pair: &PreferencePair, identity: &serde_json::Value) -> String {
    pair.id_with(identity)
}

/// What to do when a pair's id is already stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnConflict {
    /// Keep the stored pair (clicks, judgments, D_po: their facts never change).
    Keep,
    /// Take the new weight and provenance (ratings: a pair's mean star
    /// difference moves as ratings arrive).
    Refresh,
}

/// Writes pairs (each validated); returns how many were new.
pub async fn insert_pairs(
    conn: &mut PgConnection,
    rows: &[PairRow],
    on_conflict: OnConflict,
) -> anyhow::Result<u64> {
    let mut inserted = 0;
    for chunk in rows.chunks(5000) {
        let mut text: [Vec<String>; 5] = Default::default();
        let mut served: [Vec<Option<String>>; 2] = Default::default();
        let mut weights = Vec::with_capacity(chunk.len());
        let mut provenance = Vec::with_capacity(chunk.len());
        for row in chunk {
            row.pair
                .validate()
                .map_err(|e| anyhow::anyhow!("preference pair {}: {e}", row.id))?;
            text[0].push(row.id.clone());
            text[1].push(row.pair.source.as_str().to_owned());
            text[2].push(row.pair.query.clone());
            text[3].push(row.pair.winner.clone());
            text[4].push(row.pair.loser.clone());
            served[0].push(row.model_version.clone());
            served[1].push(row.variant.clone());
            weights.push(row.pair.weight);
            provenance.push(row.pair.provenance.clone());
        }
        let [ids, sources, queries, winners, losers] = text;
        let [versions, variants] = served;
        let conflict = match on_conflict {
            OnConflict::Keep => "DO NOTHING",
            // xmax = 0 tells an inserted row from an updated one
            OnConflict::Refresh => {
                "DO UPDATE SET weight = EXCLUDED.weight, provenance = EXCLUDED.provenance
                 WHERE preference_pairs.weight <> EXCLUDED.weight
                    OR preference_pairs.provenance <> EXCLUDED.provenance"
            }
        };
        let sql = format!(
            "WITH written AS (
               INSERT INTO preference_pairs
                 (id, source, weight, query, winner, loser, model_version, variant, provenance)
               SELECT * FROM UNNEST($1::text[], $2::text[], $3::float8[], $4::text[], $5::text[],
                                    $6::text[], $7::text[], $8::text[], $9::jsonb[])
               ON CONFLICT (id) {conflict}
               RETURNING (xmax = 0) AS new)
             SELECT count(*) FILTER (WHERE new) FROM written"
        );
        let (new,): (i64,) = sqlx::query_as(&sql)
            .bind(ids)
            .bind(sources)
            .bind(weights)
            .bind(queries)
            .bind(winners)
            .bind(losers)
            .bind(versions)
            .bind(variants)
            .bind(provenance)
            .fetch_one(&mut *conn)
            .await?;
        inserted += new as u64;
    }
    Ok(inserted)
}

/// One consumed input and what became of it (`paired` or a reason).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mark {
    pub reference: String,
    pub outcome: String,
    pub detail: Option<String>,
}

impl Mark {
    pub fn paired(reference: impl Into<String>) -> Mark {
        Mark {
            reference: reference.into(),
            outcome: "paired".into(),
            detail: None,
        }
    }

    pub fn refused(reference: impl Into<String>, reason: &str, detail: impl Into<String>) -> Mark {
        Mark {
            reference: reference.into(),
            outcome: reason.into(),
            detail: Some(detail.into()),
        }
    }
}

/// Records inputs as consumed (a mark already there stays as it was).
pub async fn mark(conn: &mut PgConnection, source: &str, marks: &[Mark]) -> sqlx::Result<u64> {
    if marks.is_empty() {
        return Ok(0);
    }
    let refs: Vec<&str> = marks.iter().map(|m| m.reference.as_str()).collect();
    let outcomes: Vec<&str> = marks.iter().map(|m| m.outcome.as_str()).collect();
    let details: Vec<Option<&str>> = marks.iter().map(|m| m.detail.as_deref()).collect();
    Ok(sqlx::query(
        "INSERT INTO preference_inputs (source, ref, outcome, detail)
         SELECT $1, * FROM UNNEST($2::text[], $3::text[], $4::text[])
         ON CONFLICT (source, ref) DO NOTHING",
    )
    .bind(source)
    .bind(refs)
    .bind(outcomes)
    .bind(details)
    .execute(conn)
    .await?
    .rows_affected())
}

/// The database's clock: every age the builder computes compares it with
/// `ingested_at`, which the database stamped.
pub async fn now(pool: &PgPool) -> sqlx::Result<DateTime<Utc>> {
    sqlx::query_scalar("SELECT now()").fetch_one(pool).await
}

/// A queued live query for D_po.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DpoItem {
    pub event_id: Uuid,
    pub query: String,
    pub rephrasings: serde_json::Value,
    pub attempts: i32,
}

/// Queues rephrased queries (a redelivered event is already there).
pub async fn enqueue_dpo(
    pool: &PgPool,
    items: &[kalon_events::QueryRephrased],
) -> sqlx::Result<()> {
    if items.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = items.iter().map(|i| i.event_id).collect();
    let queries: Vec<&str> = items.iter().map(|i| i.query.as_str()).collect();
    let rephrasings: Vec<serde_json::Value> = items
        .iter()
        .map(|i| serde_json::json!(i.rephrasings))
        .collect();
    sqlx::query(
        "INSERT INTO dpo_queue (event_id, query, rephrasings)
         SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::jsonb[])
         ON CONFLICT (event_id) DO NOTHING",
    )
    .bind(ids)
    .bind(queries)
    .bind(rephrasings)
    .execute(pool)
    .await?;
    Ok(())
}

/// Claims the oldest due queued query for `lease` (a crashed holder's claim
/// runs out and the query is due again).
pub async fn claim_dpo(pool: &PgPool, lease: std::time::Duration) -> sqlx::Result<Option<DpoItem>> {
    sqlx::query_as(
        "UPDATE dpo_queue SET next_attempt_at = now() + $1::float8 * interval '1 second',
                              attempts = attempts + 1
         WHERE event_id = (SELECT event_id FROM dpo_queue
                           WHERE state = 'pending' AND next_attempt_at <= now()
                           ORDER BY next_attempt_at LIMIT 1 FOR UPDATE SKIP LOCKED)
         RETURNING event_id, query, rephrasings, attempts",
    )
    .bind(lease.as_secs_f64())
    .fetch_optional(pool)
    .await
}

/// Stores a query's D_po pairs and closes it, in one transaction.
pub async fn finish_dpo(
    pool: &PgPool,
    event_id: Uuid,
    model_version: &str,
    rows: &[PairRow],
) -> anyhow::Result<u64> {
    let mut tx = pool.begin().await?;
    let new = insert_pairs(&mut tx, rows, OnConflict::Keep).await?;
    sqlx::query(
        "UPDATE dpo_queue SET state = 'done', model_version = $2, pairs = $3,
                              finished_at = now(), last_error = NULL
         WHERE event_id = $1 AND state = 'pending'",
    )
    .bind(event_id)
    .bind(model_version)
    .bind(rows.len() as i32)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(new)
}

/// A queued query that can never make pairs (no variant the builder uses,
/// too few candidates): closed with the reason.
pub async fn refuse_dpo(pool: &PgPool, event_id: Uuid, reason: &str) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE dpo_queue SET state = 'refused', last_error = $2, finished_at = now()
         WHERE event_id = $1 AND state = 'pending'",
    )
    .bind(event_id)
    .bind(reason)
    .execute(pool)
    .await?;
    Ok(())
}

/// Keeps a claim while its D_po is built (the teacher can take longer
/// than a lease); false once the query is no longer pending.
pub async fn renew_dpo(
    pool: &PgPool,
    event_id: Uuid,
    lease: std::time::Duration,
) -> sqlx::Result<bool> {
    Ok(sqlx::query(
        "UPDATE dpo_queue SET next_attempt_at = now() + $2::float8 * interval '1 second'
         WHERE event_id = $1 AND state = 'pending'",
    )
    .bind(event_id)
    .bind(lease.as_secs_f64())
    .execute(pool)
    .await?
    .rows_affected()
        == 1)
}

/// Whether the same query with the same rephrasings was built already with
/// `model_version` (the enricher published it again): its pairs are stored,
/// the teacher need not be asked.
pub async fn dpo_built(pool: &PgPool, item: &DpoItem, model_version: &str) -> sqlx::Result<bool> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM dpo_queue WHERE state = 'done' AND query = $1
                          AND rephrasings = $2 AND model_version = $3 AND event_id <> $4)",
    )
    .bind(&item.query)
    .bind(&item.rephrasings)
    .bind(model_version)
    .bind(item.event_id)
    .fetch_one(pool)
    .await
}

/// The teacher or the model failed: try again after `backoff`.
pub async fn postpone_dpo(
    pool: &PgPool,
    event_id: Uuid,
    backoff: std::time::Duration,
    error: &str,
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE dpo_queue SET next_attempt_at = now() + $2::float8 * interval '1 second',
                              last_error = $3
         WHERE event_id = $1 AND state = 'pending'",
    )
    .bind(event_id)
    .bind(backoff.as_secs_f64())
    .bind(error)
    .execute(pool)
    .await?;
    Ok(())
}

/// The newest position-bias estimate, if any.
pub async fn latest_estimate(pool: &PgPool) -> sqlx::Result<Option<(i64, serde_json::Value)>> {
    sqlx::query_as("SELECT id, estimate FROM propensity_estimates ORDER BY id DESC LIMIT 1")
        .fetch_optional(pool)
        .await
}

/// Counts for `kalonctl pairs stats`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Stats {
    pub by_source: Vec<(String, i64)>,
    pub by_day: Vec<(String, String, i64)>,
    pub by_version: Vec<(Option<String>, String, i64)>,
    pub refused: Vec<(String, String, i64)>,
    pub dpo_queue: Vec<(String, i64)>,
    pub propensity: Option<serde_json::Value>,
}

pub async fn stats(pool: &PgPool, days: i64) -> sqlx::Result<Stats> {
    let by_source = sqlx::query_as(
        "SELECT source, count(*) FROM preference_pairs GROUP BY source ORDER BY source",
    )
    .fetch_all(pool)
    .await?;
    let by_day = sqlx::query_as(
        "SELECT to_char(date_trunc('day', created_at), 'YYYY-MM-DD'), source, count(*)
         FROM preference_pairs WHERE created_at > now() - make_interval(days => $1::int)
         GROUP BY 1, 2 ORDER BY 1, 2",
    )
    .bind(days)
    .fetch_all(pool)
    .await?;
    let by_version = sqlx::query_as(
        "SELECT model_version, source, count(*) FROM preference_pairs
         GROUP BY 1, 2 ORDER BY 1 NULLS LAST, 2",
    )
    .fetch_all(pool)
    .await?;
    let refused = sqlx::query_as(
        "SELECT source, outcome, count(*) FROM preference_inputs WHERE outcome <> 'paired'
         GROUP BY 1, 2 ORDER BY 1, 2",
    )
    .fetch_all(pool)
    .await?;
    let dpo_queue =
        sqlx::query_as("SELECT state, count(*) FROM dpo_queue GROUP BY state ORDER BY state")
            .fetch_all(pool)
            .await?;
    let propensity = sqlx::query_scalar(
        "SELECT jsonb_build_object('estimated_at', estimated_at, 'method', method,
                  'impressions', impressions, 'clicks', clicks, 'estimate', estimate)
         FROM propensity_estimates ORDER BY id DESC LIMIT 1",
    )
    .fetch_optional(pool)
    .await?;
    Ok(Stats {
        by_source,
        by_day,
        by_version,
        refused,
        dpo_queue,
        propensity,
    })
}
