//! The enricher's Postgres side: the query queue, rephrasings, malformed
//! answers and judgments.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use kalon_llm::ask::Answer;
use kalon_llm::prompts::ParseError;
use kalon_llm::{Completion, PromptVariant};
use sqlx::PgPool;

/// Lower case, whitespace collapsed; `None` for an empty query.
pub fn normalise(query: &str) -> Option<String> {
    let words: Vec<String> = query.split_whitespace().map(str::to_lowercase).collect();
    (!words.is_empty()).then(|| words.join(" "))
}

/// Adds queries to the queue. A known query is only marked seen, unless its
/// rephrasings are older than `ttl`, when it is due again.
pub async fn enqueue(pool: &PgPool, queries: &BTreeSet<String>, ttl: Duration) -> sqlx::Result<()> {
    if queries.is_empty() {
        return Ok(());
    }
    // sorted and unique: one statement may touch a row once, and concurrent
    // batches lock rows in the same order
    let queries: Vec<&str> = queries.iter().map(String::as_str).collect();
    sqlx::query(
        "INSERT INTO enrich_queries (query) SELECT * FROM unnest($1::text[])
         ON CONFLICT (query) DO UPDATE SET
             last_seen_at = now(),
             status = CASE WHEN enrich_queries.status = 'done'
                            AND enrich_queries.enriched_at < now() - make_interval(secs => $2)
                      THEN 'pending' ELSE enrich_queries.status END,
             next_attempt_at = CASE WHEN enrich_queries.status = 'done'
                            AND enrich_queries.enriched_at < now() - make_interval(secs => $2)
                      THEN now() ELSE enrich_queries.next_attempt_at END",
    )
    .bind(&queries)
    .bind(ttl.as_secs_f64())
    .execute(pool)
    .await?;
    Ok(())
}

/// Claims one due query for `lease`; returns it with its attempt number.
pub async fn claim(pool: &PgPool, lease: Duration) -> sqlx::Result<Option<(String, i32)>> {
    sqlx::query_as(
        "UPDATE enrich_queries SET lease_until = now() + make_interval(secs => $1), attempts = attempts + 1
         WHERE query = (
             SELECT query FROM enrich_queries
             WHERE status = 'pending' AND next_attempt_at <= now()
               AND (lease_until IS NULL OR lease_until < now())
             ORDER BY next_attempt_at LIMIT 1
             FOR UPDATE SKIP LOCKED)
         RETURNING query, attempts",
    )
    .bind(lease.as_secs_f64())
    .fetch_optional(pool)
    .await
}

/// Extends the lease of `query` claimed as attempt `attempt` by `lease`
/// from now. False when the claim is no longer this worker's: its lease ran
/// out and another worker claimed it, or the query was finished or
/// postponed (a renewal landing after those leaves them as they are).
pub async fn renew(
    pool: &PgPool,
    query: &str,
    attempt: i32,
    lease: Duration,
) -> sqlx::Result<bool> {
    let renewed = sqlx::query(
        "UPDATE enrich_queries SET lease_until = now() + make_interval(secs => $3)
         WHERE query = $1 AND attempts = $2 AND status = 'pending' AND lease_until IS NOT NULL",
    )
    .bind(query)
    .bind(attempt)
    .bind(lease.as_secs_f64())
    .execute(pool)
    .await?;
    Ok(renewed.rows_affected() == 1)
}

/// Variants of `query` rephrased within `ttl` (not to be asked again).
pub async fn fresh_variants(
    pool: &PgPool,
    query: &str,
    ttl: Duration,
) -> sqlx::Result<BTreeSet<String>> {
    let rows: Vec<(String,)> = sqlx::query_as(
        "SELECT variant FROM query_rephrasings
         WHERE query = $1 AND created_at > now() - make_interval(secs => $2)",
    )
    .bind(query)
    .bind(ttl.as_secs_f64())
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|(v,)| v).collect())
}

async fn insert_malformed(
    tx: &mut sqlx::PgConnection,
    task: &str,
    query: &str,
    variant: Option<&str>,
    refused: &[(Completion, ParseError)],
    last_dead: bool,
) -> sqlx::Result<()> {
    for (i, (completion, error)) in refused.iter().enumerate() {
        sqlx::query(
            "INSERT INTO llm_malformed (task, query, variant, strict, error, raw_response, dead_lettered)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(task)
        .bind(query)
        .bind(variant)
        .bind(i > 0)
        .bind(&error.0)
        .bind(&completion.raw)
        .bind(last_dead && i + 1 == refused.len())
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

/// Stores a rephrasing (replacing an expired one) and the malformed answers
/// before it, in one transaction.
pub async fn save_rephrasing(
    pool: &PgPool,
    query: &str,
    variant: PromptVariant,
    answer: &Answer<String>,
) -> sqlx::Result<()> {
    let mut tx = pool.begin().await?;
    insert_malformed(
        &mut tx,
        "rephrase",
        query,
        Some(variant.name()),
        &answer.refused,
        false,
    )
    .await?;
    let c = &answer.completion;
    sqlx::query(
        "INSERT INTO query_rephrasings
             (query, variant, rephrasing, model, latency_ms, prompt_tokens, completion_tokens, strict, raw_response)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
         ON CONFLICT (query, variant) DO UPDATE SET
             rephrasing = EXCLUDED.rephrasing, model = EXCLUDED.model, latency_ms = EXCLUDED.latency_ms,
             prompt_tokens = EXCLUDED.prompt_tokens, completion_tokens = EXCLUDED.completion_tokens,
             strict = EXCLUDED.strict, raw_response = EXCLUDED.raw_response, created_at = now()",
    )
    .bind(query)
    .bind(variant.name())
    .bind(&answer.value)
    .bind(&c.model)
    .bind(c.latency.as_secs_f64() * 1e3)
    .bind(c.usage.prompt_tokens as i64)
    .bind(c.usage.completion_tokens as i64)
    .bind(answer.strict)
    .bind(&c.raw)
    .execute(&mut *tx)
    .await?;
    tx.commit().await
}

/// Records answers that stayed malformed after the strict retry.
pub async fn save_dead(
    pool: &PgPool,
    task: &str,
    query: &str,
    variant: Option<&str>,
    refused: &[(Completion, ParseError)],
) -> sqlx::Result<()> {
    let mut tx = pool.begin().await?;
    insert_malformed(&mut tx, task, query, variant, refused, true).await?;
    tx.commit().await
}

/// The query is enriched: not due again until the TTL.
pub async fn finish(pool: &PgPool, query: &str) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE enrich_queries SET status = 'done', enriched_at = now(), lease_until = NULL, last_error = NULL
         WHERE query = $1",
    )
    .bind(query)
    .execute(pool)
    .await?;
    Ok(())
}

/// The LLM failed: try again after `delay`, keeping what is done.
pub async fn postpone(
    pool: &PgPool,
    query: &str,
    delay: Duration,
    error: &str,
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE enrich_queries SET next_attempt_at = now() + make_interval(secs => $2),
             lease_until = NULL, last_error = $3
         WHERE query = $1",
    )
    .bind(query)
    .bind(delay.as_secs_f64())
    .bind(error)
    .execute(pool)
    .await?;
    Ok(())
}

/// Every stored rephrasing of `query`, by variant, with the model.
pub async fn rephrasings(
    pool: &PgPool,
    query: &str,
) -> sqlx::Result<(BTreeMap<String, String>, String)> {
    let rows: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT variant, rephrasing, model FROM query_rephrasings WHERE query = $1 ORDER BY variant",
    )
    .bind(query)
    .fetch_all(pool)
    .await?;
    let model = rows.first().map(|r| r.2.clone()).unwrap_or_default();
    Ok((rows.into_iter().map(|(v, r, _)| (v, r)).collect(), model))
}

/// Queries waiting to be asked: `(pending, retrying)`, the second those
/// postponed after a failure (`last_error` set).
pub async fn waiting(pool: &PgPool) -> sqlx::Result<(u64, u64)> {
    let (pending, retrying): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE last_error IS NULL), count(*) FILTER (WHERE last_error IS NOT NULL)
         FROM enrich_queries WHERE status = 'pending'",
    )
    .fetch_one(pool)
    .await?;
    Ok((pending.max(0) as u64, retrying.max(0) as u64))
}
