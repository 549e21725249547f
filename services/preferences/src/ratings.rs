//! Rating pairs: for a query and aspect, an image rated higher on average
//! beats one rated lower (weight: the mean star difference / 4).
//!
//! A pass finds the (query, aspect) groups with ratings not yet marked and
//! rebuilds each group from all its ratings: pairs already stored take the
//! new weight, pairs the new means no longer support are deleted, new ones
//! are added, and the new ratings are marked, in one transaction. The
//! table therefore always says what all the ratings say, however the
//! ratings were split over passes (or a restart). A rating of an image no
//! version in the registry knows is refused (`unknown_image`).

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use kalon_align::feedback::{rating_pairs, StarRating};
use sqlx::PgPool;
use uuid::Uuid;

use crate::store::{self, Mark, OnConflict, PairRow};

pub const UNKNOWN_IMAGE: &str = "unknown_image";

pub use kalon_align::feedback::RatingRules;

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RatingPass {
    pub ratings: u64,
    pub groups: u64,
    pub pairs: u64,
    pub new_pairs: u64,
    pub refused: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, sqlx::FromRow)]
struct RatingRow {
    event_id: Uuid,
    query: String,
    aspect: String,
    image_id: String,
    stars: i16,
}

pub async fn pass(
    pool: &PgPool,
    lookback: chrono::Duration,
    batch: usize,
    rules: RatingRules,
) -> anyhow::Result<RatingPass> {
    let now: DateTime<Utc> = store::now(pool).await?;
    let groups: Vec<(String, String)> = sqlx::query_as(
        "SELECT DISTINCT r.query, r.aspect FROM ratings r
         WHERE r.occurred_at > $1
           AND NOT EXISTS (SELECT 1 FROM preference_inputs m
                           WHERE m.source = 'rating' AND m.ref = r.event_id::text)",
    )
    .bind(now - lookback)
    .fetch_all(pool)
    .await?;
    let mut report = RatingPass::default();
    for chunk in groups.chunks(batch.max(1)) {
        build_groups(pool, chunk, rules, &mut report).await?;
    }
    Ok(report)
}

async fn build_groups(
    pool: &PgPool,
    groups: &[(String, String)],
    rules: RatingRules,
    report: &mut RatingPass,
) -> anyhow::Result<()> {
    let queries: Vec<&str> = groups
        .iter()
        .map(|(q, _)| q.as_str())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let wanted: BTreeSet<(&str, &str)> = groups
        .iter()
        .map(|(q, a)| (q.as_str(), a.as_str()))
        .collect();
    // reads and writes in one transaction under one lock: two builders (a
    // leader that lost its lock mid-pass and its successor) cannot write a
    // group from an older reading over a newer one
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('kalon.preferences.ratings'))")
        .execute(&mut *tx)
        .await?;
    let ratings: Vec<RatingRow> = sqlx::query_as(
        "SELECT event_id, query, aspect, image_id, stars FROM ratings WHERE query = ANY($1)",
    )
    .bind(&queries)
    .fetch_all(&mut *tx)
    .await?;
    let ratings: Vec<RatingRow> = ratings
        .into_iter()
        .filter(|r| wanted.contains(&(r.query.as_str(), r.aspect.as_str())))
        .collect();
    let images: Vec<&str> = ratings
        .iter()
        .map(|r| r.image_id.as_str())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let known: BTreeSet<String> = sqlx::query_scalar(
        "SELECT DISTINCT e.image_id FROM image_embeddings e
         WHERE e.model_version IN (SELECT version FROM model_versions
                                   WHERE state IN ('indexed', 'canary', 'promoted'))
           AND e.image_id = ANY($1)",
    )
    .bind(&images)
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .collect();
    let events: Vec<String> = ratings.iter().map(|r| r.event_id.to_string()).collect();
    // ref -> outcome: a rating refused once stays out, so the table says the
    // same however the ratings were split over passes
    let marked: BTreeMap<String, String> = sqlx::query_as(
        "SELECT ref, outcome FROM preference_inputs WHERE source = 'rating' AND ref = ANY($1)",
    )
    .bind(&events)
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .collect();
    let mut marks = Vec::new();
    let mut by_group: BTreeMap<(&str, &str), Vec<StarRating>> = BTreeMap::new();
    for (rating, id) in ratings.iter().zip(&events) {
        let stars = u8::try_from(rating.stars).unwrap_or(0);
        match marked.get(id).map(String::as_str) {
            Some("paired") => {}
            Some(_) => continue,
            None if rating.query.trim().is_empty() => {
                marks.push(Mark::refused(
                    id.clone(),
                    crate::clicks::BLANK_QUERY,
                    "the rating's query is blank",
                ));
                continue;
            }
            None if !known.contains(&rating.image_id) => {
                marks.push(Mark::refused(
                    id.clone(),
                    UNKNOWN_IMAGE,
                    format!("no indexed version knows image {}", rating.image_id),
                ));
                continue;
            }
            None => marks.push(Mark::paired(id.clone())),
        }
        by_group
            .entry((rating.query.as_str(), rating.aspect.as_str()))
            .or_default()
            .push(StarRating {
                event_id: id,
                query: &rating.query,
                image_id: &rating.image_id,
                stars,
            });
    }
    let mut rows = Vec::new();
    for ((_, aspect), ratings) in &by_group {
        for mut pair in rating_pairs(ratings, rules) {
            let identity = serde_json::json!({"rule": "mean_stars", "aspect": aspect});
            let id = store::pair_id(&pair, &identity);
            if let Some(object) = pair.provenance.as_object_mut() {
                object.insert("rule".into(), "mean_stars".into());
                object.insert("aspect".into(), (*aspect).into());
            }
            rows.push(PairRow {
                id,
                pair,
                model_version: None,
                variant: None,
            });
        }
    }
    report.groups += groups.len() as u64;
    report.ratings += marks.len() as u64;
    for mark in marks.iter().filter(|m| m.outcome != "paired") {
        *report.refused.entry(mark.outcome.clone()).or_default() += 1;
    }
    report.pairs += rows.len() as u64;
    // what the ratings no longer support goes
    let keep: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
    let (group_queries, group_aspects): (Vec<&str>, Vec<&str>) = wanted.iter().copied().unzip();
    sqlx::query(
        "DELETE FROM preference_pairs p
         USING UNNEST($1::text[], $2::text[]) AS g(query, aspect)
         WHERE p.source = 'rating' AND p.query = g.query
           AND p.provenance->>'aspect' = g.aspect AND NOT (p.id = ANY($3))",
    )
    .bind(&group_queries)
    .bind(&group_aspects)
    .bind(&keep)
    .execute(&mut *tx)
    .await?;
    report.new_pairs += store::insert_pairs(&mut tx, &rows, OnConflict::Refresh).await?;
    store::mark(&mut tx, "rating", &marks).await?;
    tx.commit().await?;
    Ok(())
}
