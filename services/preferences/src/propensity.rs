//! Position bias from the traffic: how often each (query, image) was shown
//! at each rank and clicked there, aggregated in Postgres over a window of
//! impressions and clicks, and the intervention-harvesting estimator
//! (`kalon_align::propensity`) run on it. Its interventions are search's
//! randomised adjacent swaps (`--explore-rate`, recorded as `model_rank` in
//! the impression) and the canary's natural ones (two versions showing the
//! same image at different ranks). Each estimate is stored with its
//! intervals; click pairs are weighted with the newest, capped, and with
//! the prior where a rank is not estimated.

use chrono::{DateTime, Utc};
use kalon_align::feedback::{ClickWeight, Propensity};
use kalon_align::propensity::{estimate, Estimate, EstimatorConfig, Observation};
use sqlx::PgPool;

use crate::config::PreferencesConfig;

/// The examination curve click pairs are weighted with.
#[derive(Debug, Clone)]
pub struct Curve {
    prior: Propensity,
    estimate: Option<(i64, Estimate)>,
}

impl Curve {
    /// The prior alone (nothing estimated yet).
    pub fn prior(prior: Propensity) -> Curve {
        Curve {
            prior,
            estimate: None,
        }
    }

    pub fn with_estimate(prior: Propensity, id: i64, estimate: Estimate) -> Curve {
        Curve {
            prior,
            estimate: Some((id, estimate)),
        }
    }

    /// The newest stored estimate over `prior`, if there is one.
    pub async fn latest(pool: &PgPool, prior: Propensity) -> anyhow::Result<Option<Curve>> {
        let Some((id, value)) = crate::store::latest_estimate(pool).await? else {
            return Ok(None);
        };
        let estimate: Estimate = serde_json::from_value(value)?;
        Ok(Some(Curve::with_estimate(prior, id, estimate)))
    }

    /// The stored estimate's id, when one is used.
    pub fn id(&self) -> Option<i64> {
        self.estimate.as_ref().map(|(id, _)| *id)
    }

    /// The examination propensity used at ranks 1..=depth (estimated or prior).
    pub fn examination(&self, depth: u32) -> Vec<(u32, f64)> {
        (1..=depth)
            .map(|rank| {
                let theta = self
                    .estimate
                    .as_ref()
                    .and_then(|(_, e)| e.theta(rank))
                    .unwrap_or_else(|| 1.0 / f64::from(rank).powf(self.prior.eta));
                (rank, theta)
            })
            .collect()
    }
}

impl ClickWeight for Curve {
    fn weight(&self, rank: u32) -> f64 {
        match &self.estimate {
            Some((_, estimate)) => estimate.weight(rank, &self.prior),
            None => self.prior.weight(rank),
        }
    }
}

/// What the window held.
#[derive(Debug, Clone)]
pub struct Observed {
    pub observations: Vec<Observation>,
    pub impressions: i64,
    pub clicks: i64,
}

/// Shown and clicked counts per (query, image, rank) for the impressions
/// that occurred in `(since, until]`, ranks 1..=depth; at most one click per
/// impression and rank counts.
pub async fn observe(
    pool: &PgPool,
    since: DateTime<Utc>,
    until: DateTime<Utc>,
    depth: u32,
) -> sqlx::Result<Observed> {
    let rows: Vec<(String, String, i32, i64, i64)> = sqlx::query_as(
        // the clicks of each impression by its request id (an index lookup
        // per impression: no plan over a join of every shown result with
        // every click, which the planner may nest when statistics lag)
        "SELECT i.query, r.image_id, r.rank, count(*),
                count(*) FILTER (WHERE r.rank = ANY(c.ranks))
         FROM impressions i
         CROSS JOIN LATERAL (SELECT coalesce(array_agg(DISTINCT k.rank), '{}') AS ranks
                             FROM clicks k WHERE k.request_id = i.request_id) c
         CROSS JOIN LATERAL json_to_recordset(i.results) r(image_id text, rank int)
         WHERE i.occurred_at > $1 AND i.occurred_at <= $2 AND r.rank <= $3
         GROUP BY 1, 2, 3",
    )
    .bind(since)
    .bind(until)
    .bind(depth as i32)
    .fetch_all(pool)
    .await?;
    let (impressions,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM impressions WHERE occurred_at > $1 AND occurred_at <= $2",
    )
    .bind(since)
    .bind(until)
    .fetch_one(pool)
    .await?;
    let clicks = rows.iter().map(|r| r.4).sum();
    Ok(Observed {
        observations: rows
            .into_iter()
            .map(|(query, image, rank, shown, clicked)| Observation {
                query,
                image,
                rank: rank.max(1) as u32,
                shown: shown as u64,
                clicked: clicked as u64,
            })
            .collect(),
        impressions,
        clicks,
    })
}

/// Estimates from the configured window and stores the estimate; returns its
/// id, or None when the window held no impressions.
pub async fn estimate_and_store(
    pool: &PgPool,
    config: &PreferencesConfig,
) -> anyhow::Result<Option<i64>> {
    let until = crate::store::now(pool).await?;
    let since = until - chrono::Duration::hours(config.propensity_window_h as i64);
    let Observed {
        observations,
        impressions,
        clicks,
    } = observe(pool, since, until, config.propensity_depth).await?;
    if impressions == 0 {
        return Ok(None);
    }
    let settings = EstimatorConfig {
        max_rank: config.propensity_depth,
        min_interventions: config.propensity_min_interventions,
        ..EstimatorConfig::default()
    };
    let estimate = tokio::task::spawn_blocking(move || estimate(&observations, &settings)).await?;
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO propensity_estimates
           (method, window_start, window_end, impressions, clicks, estimate)
         VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
    )
    .bind(&estimate.method)
    .bind(since)
    .bind(until)
    .bind(impressions)
    .bind(clicks)
    .bind(serde_json::to_value(&estimate)?)
    .fetch_one(pool)
    .await?;
    Ok(Some(id))
}
