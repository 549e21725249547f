//! Click pairs: each impression joined with the clicks that refer to it (by
//! `request_id`), once the list is quiet.
//!
//! A pass reads the clicks not yet marked in `preference_inputs` that
//! arrived at least the quiet time ago, and for their requests the
//! impression and every click. A request is built when neither its
//! impression nor any of its clicks arrived within the quiet time: its
//! pairs (skip-above, skip-next over all valid clicks) and the marks of its
//! new clicks commit together. A click that comes after its list was built
//! is unmarked, so a later pass builds the list again: the pairs already
//! stored have the same ids and stay as they were, the new click's pairs
//! are added. A click whose impression has not arrived after the expiry is
//! marked `impression_never_arrived`; a click whose rank is outside the
//! list or names another image than the list shows there is marked with
//! that reason. Pairs made before a late click are kept (they were true of
//! what was known; the trainer reads pairs, not lists).

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use futures::StreamExt;
use kalon_align::feedback::{click_pairs, ClickWeight, ClickedList};
use serde::Deserialize;
use sqlx::PgPool;
use uuid::Uuid;

use crate::store::{self, Mark, OnConflict, PairRow};

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ClickPass {
    /// Clicks marked (paired or refused).
    pub clicks: u64,
    /// Result lists built.
    pub lists: u64,
    /// Pairs made, and of them new to the table.
    pub pairs: u64,
    pub new_pairs: u64,
    /// Clicks refused, by reason, in this pass.
    pub refused: BTreeMap<String, u64>,
    /// Clicks still waiting (list not quiet, or impression not yet here),
    /// and how long the oldest of them has been here, in seconds.
    pub waiting: u64,
    pub oldest_waiting_s: f64,
}

impl ClickPass {
    fn merge(&mut self, other: ClickPass) {
        self.clicks += other.clicks;
        self.lists += other.lists;
        self.pairs += other.pairs;
        self.new_pairs += other.new_pairs;
        for (reason, count) in other.refused {
            *self.refused.entry(reason).or_default() += count;
        }
        self.waiting += other.waiting;
        self.oldest_waiting_s = self.oldest_waiting_s.max(other.oldest_waiting_s);
    }

    fn wait(&mut self, clicks: &[&ClickRow], now: DateTime<Utc>) {
        for click in clicks {
            self.waiting += 1;
            let age = (now - click.ingested_at).num_milliseconds() as f64 / 1000.0;
            self.oldest_waiting_s = self.oldest_waiting_s.max(age);
        }
    }
}

/// The join's timing.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub quiet: chrono::Duration,
    pub expire_after: chrono::Duration,
    pub lookback: chrono::Duration,
}

#[derive(Debug, Clone, sqlx::FromRow)]
struct ClickRow {
    event_id: Uuid,
    request_id: String,
    image_id: String,
    rank: i32,
    ingested_at: DateTime<Utc>,
}

#[derive(Debug, Clone, sqlx::FromRow)]
struct ImpressionRow {
    request_id: String,
    event_id: Uuid,
    query: String,
    model_version: String,
    variant: String,
    results: String,
    ingested_at: DateTime<Utc>,
}

#[derive(Deserialize)]
struct Shown {
    image_id: String,
    rank: u32,
}

/// Reasons a click is refused.
pub const NEVER_ARRIVED: &str = "impression_never_arrived";
pub const RANK_OUTSIDE: &str = "rank_outside_list";
pub const OTHER_IMAGE: &str = "image_not_at_rank";
pub const BAD_IMPRESSION: &str = "impression_unreadable";
pub const BLANK_QUERY: &str = "blank_query";

/// One pass over the pending clicks; `weight` turns a rank into the click's
/// inverse propensity.
pub async fn pass(
    pool: &PgPool,
    timing: Timing,
    batch: usize,
    weight: &(dyn ClickWeight + Sync),
) -> anyhow::Result<ClickPass> {
    let now = store::now(pool).await?;
    // only clicks that are themselves quiet can close a list
    let pending: Vec<(String,)> = sqlx::query_as(
        "SELECT DISTINCT c.request_id FROM clicks c
         WHERE c.occurred_at > $1 AND c.ingested_at <= $2
           AND NOT EXISTS (SELECT 1 FROM preference_inputs m
                           WHERE m.source = 'click' AND m.ref = c.event_id::text)",
    )
    .bind(now - timing.lookback)
    .bind(now - timing.quiet)
    .fetch_all(pool)
    .await?;
    let requests: Vec<String> = pending.into_iter().map(|(r,)| r).collect();
    // chunks are disjoint sets of lists: several in flight at once, each in
    // its own transaction
    let mut chunks = Vec::new();
    for chunk in requests.chunks(batch.max(1)) {
        chunks.push(build_chunk(pool, chunk, now, timing, weight));
    }
    let mut built = futures::stream::iter(chunks).buffer_unordered(WRITERS);
    let mut report = ClickPass::default();
    while let Some(part) = built.next().await {
        report.merge(part?);
    }
    Ok(report)
}

/// Chunks of lists built at once.
const WRITERS: usize = 4;

async fn build_chunk(
    pool: &PgPool,
    requests: &[String],
    now: DateTime<Utc>,
    timing: Timing,
    weight: &(dyn ClickWeight + Sync),
) -> anyhow::Result<ClickPass> {
    let mut part = ClickPass::default();
    build_requests(pool, requests, now, timing, weight, &mut part).await?;
    Ok(part)
}

async fn build_requests(
    pool: &PgPool,
    requests: &[String],
    now: DateTime<Utc>,
    timing: Timing,
    weight: &(dyn ClickWeight + Sync),
    report: &mut ClickPass,
) -> anyhow::Result<()> {
    let impressions: Vec<ImpressionRow> = sqlx::query_as(
        "SELECT DISTINCT ON (request_id) request_id, event_id, query, model_version, variant,
                results::text AS results, ingested_at
         FROM impressions WHERE request_id = ANY($1)
         ORDER BY request_id, occurred_at, event_id",
    )
    .bind(requests)
    .fetch_all(pool)
    .await?;
    let clicks: Vec<ClickRow> = sqlx::query_as(
        "SELECT event_id, request_id, image_id, rank, ingested_at FROM clicks
         WHERE request_id = ANY($1)",
    )
    .bind(requests)
    .fetch_all(pool)
    .await?;
    let marked: BTreeSet<String> = sqlx::query_scalar(
        "SELECT ref FROM preference_inputs WHERE source = 'click' AND ref = ANY($1)",
    )
    .bind(
        clicks
            .iter()
            .map(|c| c.event_id.to_string())
            .collect::<Vec<_>>(),
    )
    .fetch_all(pool)
    .await?
    .into_iter()
    .collect();
    let mut by_request: BTreeMap<&str, Vec<&ClickRow>> = BTreeMap::new();
    for click in &clicks {
        by_request.entry(&click.request_id).or_default().push(click);
    }
    let impressions: BTreeMap<&str, &ImpressionRow> = impressions
        .iter()
        .map(|i| (i.request_id.as_str(), i))
        .collect();
    let mut rows = Vec::new();
    let mut marks = Vec::new();
    for (request, clicks) in by_request {
        let new: Vec<&ClickRow> = clicks
            .iter()
            .copied()
            .filter(|c| !marked.contains(&c.event_id.to_string()))
            .collect();
        if new.is_empty() {
            continue;
        }
        let Some(impression) = impressions.get(request) else {
            for click in new {
                if now - click.ingested_at >= timing.expire_after {
                    marks.push(Mark::refused(
                        click.event_id.to_string(),
                        NEVER_ARRIVED,
                        format!(
                            "no impression with request_id {request} within {} s",
                            timing.expire_after.num_seconds()
                        ),
                    ));
                } else {
                    report.wait(&[click], now);
                }
            }
            continue;
        };
        let last = clicks
            .iter()
            .map(|c| c.ingested_at)
            .chain([impression.ingested_at])
            .max()
            .unwrap_or(impression.ingested_at);
        let oldest_new = new.iter().map(|c| c.ingested_at).min().unwrap_or(now);
        // a list that never goes quiet (clicked every few minutes) is built
        // anyway once its oldest new click is as old as the expiry
        if now - last < timing.quiet && now - oldest_new < timing.expire_after {
            report.wait(&new, now);
            continue;
        }
        let (list_rows, list_marks) = build_list(impression, &clicks, &marked, weight);
        report.lists += 1;
        rows.extend(list_rows);
        marks.extend(list_marks);
    }
    for mark in marks.iter().filter(|m| m.outcome != "paired") {
        *report.refused.entry(mark.outcome.clone()).or_default() += 1;
    }
    report.clicks += marks.len() as u64;
    report.pairs += rows.len() as u64;
    let mut tx = pool.begin().await?;
    report.new_pairs += store::insert_pairs(&mut tx, &rows, OnConflict::Keep).await?;
    store::mark(&mut tx, "click", &marks).await?;
    tx.commit().await?;
    Ok(())
}

/// The pairs of one closed list and the marks of its clicks not yet marked.
fn build_list(
    impression: &ImpressionRow,
    clicks: &[&ClickRow],
    marked: &BTreeSet<String>,
    weight: &(dyn ClickWeight + Sync),
) -> (Vec<PairRow>, Vec<Mark>) {
    let mut marks = Vec::new();
    if impression.query.trim().is_empty() {
        // a pair needs a query (a producer that bypassed search sent a blank one)
        for click in clicks {
            if !marked.contains(&click.event_id.to_string()) {
                marks.push(Mark::refused(
                    click.event_id.to_string(),
                    BLANK_QUERY,
                    format!("impression {} has a blank query", impression.event_id),
                ));
            }
        }
        return (Vec::new(), marks);
    }
    let shown: Vec<Shown> = match serde_json::from_str(&impression.results) {
        Ok(shown) => shown,
        Err(error) => {
            for click in clicks {
                if !marked.contains(&click.event_id.to_string()) {
                    marks.push(Mark::refused(
                        click.event_id.to_string(),
                        BAD_IMPRESSION,
                        format!("impression {}: {error}", impression.event_id),
                    ));
                }
            }
            return (Vec::new(), marks);
        }
    };
    // the list as shown: rank order (the event's ranks, not its array order)
    let mut ordered: Vec<&Shown> = shown.iter().collect();
    ordered.sort_by_key(|s| s.rank);
    let results: Vec<String> = ordered.iter().map(|s| s.image_id.clone()).collect();
    let mut clicked = BTreeSet::new();
    // the first click event of each rank, for provenance
    let mut first_event: BTreeMap<u32, Uuid> = BTreeMap::new();
    for click in clicks {
        let id = click.event_id.to_string();
        let rank = u32::try_from(click.rank).unwrap_or(0);
        let at = ordered.iter().find(|s| s.rank == rank);
        let refusal = match at {
            None => Some((
                RANK_OUTSIDE,
                format!(
                    "rank {} is not in the list of {} results",
                    click.rank,
                    ordered.len()
                ),
            )),
            Some(s) if s.image_id != click.image_id => Some((
                OTHER_IMAGE,
                format!(
                    "the list shows {} at rank {}, the click names {}",
                    s.image_id, rank, click.image_id
                ),
            )),
            Some(_) => None,
        };
        match refusal {
            Some((reason, detail)) => {
                if !marked.contains(&id) {
                    marks.push(Mark::refused(id, reason, detail));
                }
            }
            None => {
                // ranks as positions in the ordered list (they are 1..=n
                // when the event's ranks are, which search's always are)
                let position = ordered.iter().position(|s| s.rank == rank).unwrap_or(0) as u32 + 1;
                clicked.insert(position);
                let first = first_event.entry(position).or_insert(click.event_id);
                *first = (*first).min(click.event_id);
                if !marked.contains(&id) {
                    marks.push(Mark::paired(id));
                }
            }
        }
    }
    let clicked: Vec<u32> = clicked.into_iter().collect();
    let list = ClickedList {
        request_id: &impression.request_id,
        query: &impression.query,
        results: &results,
        clicked: &clicked,
    };
    let rows = click_pairs(&list, weight)
        .into_iter()
        .map(|mut pair| {
            let identity = pair.provenance.clone();
            let id = store::pair_id(&pair, &identity);
            let winner_rank = identity["winner_rank"].as_u64().unwrap_or(0) as u32;
            // the request id names the impression; the winner's click event
            if let Some(object) = pair.provenance.as_object_mut() {
                if let Some(event) = first_event.get(&winner_rank) {
                    object.insert("click_event".into(), event.to_string().into());
                }
            }
            PairRow {
                id,
                pair,
                model_version: Some(impression.model_version.clone()),
                variant: Some(impression.variant.clone()),
            }
        })
        .collect();
    (rows, marks)
}
