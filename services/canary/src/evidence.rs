//! The evidence behind a look: user-level A/B outcomes per arm (the session
//! as unit) and the interleaving preference, both read from ingest's tables
//! (impressions, clicks, ratings) for the canary's window; the guardrails
//! from search's `/v1/stats` ([`crate::guardrails`]); the LMM judge's
//! verdicts from `canary_judgments` ([`crate::lmm`]). Each becomes typed
//! [`MetricEvidence`] for the decision rule and for the published verdict.

use chrono::{DateTime, Utc};
use kalon_events::interleave::{credit, Team};
use kalon_events::{EvidenceKind, MetricEvidence};
use sqlx::PgPool;

use crate::stats::sequential::{
    decide, decide_preference, ArmSums, Criterion, Decision, Direction, MsprtConfig,
    PreferenceConfig, PreferenceCounts, Samples, Verdict,
};

/// The two versions compared and the time window counted.
#[derive(Debug, Clone)]
pub struct Window {
    pub stable: String,
    pub candidate: String,
    pub since: DateTime<Utc>,
    /// Impressions younger than the settle time are left for a later look.
    pub until: DateTime<Utc>,
}

/// Per-arm sums of the per-session A/B outcomes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AbSums {
    /// In [`AB_METRICS`] order, (stable, candidate).
    pub metrics: Vec<(ArmSums, ArmSums)>,
}

/// The A/B outcomes, each a per-session mean over its searches, with the
/// way it improves.
pub const AB_METRICS: [(&str, Direction); 5] = [
    ("ctr", Direction::HigherIsBetter),
    ("top3_clicks", Direction::HigherIsBetter),
    ("reciprocal_rank", Direction::HigherIsBetter),
    ("abandonment", Direction::LowerIsBetter),
    ("rating", Direction::HigherIsBetter),
];

impl AbSums {
    pub fn get(&self, metric: &str) -> Option<&(ArmSums, ArmSums)> {
        let i = AB_METRICS.iter().position(|(m, _)| *m == metric)?;
        self.metrics.get(i)
    }

    /// Candidate sessions counted (for the budget).
    pub fn candidate_sessions(&self) -> u64 {
        self.metrics.first().map_or(0, |(_, c)| c.n)
    }
}

/// Per-session outcomes of the window's non-interleaved searches of both
/// versions.
pub async fn ab_sums(pool: &PgPool, window: &Window) -> sqlx::Result<AbSums> {
    let versions = [window.stable.as_str(), window.candidate.as_str()];
    let rows: Vec<(String, f64, f64, f64)> = sqlx::query_as(
        "WITH imp AS (
             SELECT i.request_id, i.session_id, i.model_version
             FROM impressions i
             WHERE i.occurred_at >= $1 AND i.occurred_at < $2
               AND i.model_version = ANY($3)
               AND (i.results -> 0 ->> 'team') IS NULL
         ), req AS (
             SELECT imp.session_id, imp.model_version,
                    min(c.rank) AS first_rank,
                    count(DISTINCT c.rank) FILTER (WHERE c.rank <= 3) AS top3
             FROM imp LEFT JOIN clicks c
               ON c.request_id = imp.request_id AND c.occurred_at >= $1
             GROUP BY imp.request_id, imp.session_id, imp.model_version
         )
         SELECT model_version,
                avg((first_rank IS NOT NULL)::int)::float8,
                avg(top3)::float8,
                avg(coalesce(1.0 / first_rank, 0))::float8
         FROM req GROUP BY model_version, session_id",
    )
    .bind(window.since)
    .bind(window.until)
    .bind(&versions[..])
    .fetch_all(pool)
    .await?;
    let mut sums = vec![(ArmSums::default(), ArmSums::default()); AB_METRICS.len()];
    for (version, ctr, top3, rr) in rows {
        let candidate = version == window.candidate;
        // the first four metrics; the rating comes from its own query
        for (pair, value) in sums.iter_mut().zip([ctr, top3, rr, 1.0 - ctr]) {
            if candidate {
                pair.1.push(value);
            } else {
                pair.0.push(value);
            }
        }
    }
    let ratings: Vec<(String, f64)> = sqlx::query_as(
        "SELECT i.model_version, avg(r.stars)::float8
         FROM impressions i JOIN ratings r ON r.request_id = i.request_id
         WHERE i.occurred_at >= $1 AND i.occurred_at < $2
           AND i.model_version = ANY($3)
           AND (i.results -> 0 ->> 'team') IS NULL
           AND r.aspect = 'aesthetic'
         GROUP BY i.model_version, i.session_id",
    )
    .bind(window.since)
    .bind(window.until)
    .bind(&versions[..])
    .fetch_all(pool)
    .await?;
    let rating = AB_METRICS.len() - 1;
    for (version, stars) in ratings {
        if version == window.candidate {
            sums[rating].1.push(stars);
        } else {
            sums[rating].0.push(stars);
        }
    }
    Ok(AbSums { metrics: sums })
}

/// The interleaved searches of the candidate in the window, each credited
/// to the team whose results were clicked.
pub async fn interleaving_counts(pool: &PgPool, window: &Window) -> sqlx::Result<PreferenceCounts> {
    let rows: Vec<(Vec<String>, Vec<i32>)> = sqlx::query_as(
        "SELECT ARRAY(SELECT coalesce(r ->> 'team', '') FROM json_array_elements(i.results) r
                      ORDER BY (r ->> 'rank')::int),
                ARRAY(SELECT DISTINCT c.rank FROM clicks c
                      WHERE c.request_id = i.request_id AND c.occurred_at >= $1)
         FROM impressions i
         WHERE i.occurred_at >= $1 AND i.occurred_at < $2
           AND i.model_version = $3
           AND (i.results -> 0 ->> 'team') IS NOT NULL",
    )
    .bind(window.since)
    .bind(window.until)
    .bind(&window.candidate)
    .fetch_all(pool)
    .await?;
    let mut counts = PreferenceCounts::default();
    for (teams, clicked) in rows {
        counts.push(preference(&teams, &clicked));
    }
    Ok(counts)
}

/// One interleaved page's preference: `teams` by shown position, `clicked`
/// the 1-based ranks clicked.
pub fn preference(teams: &[String], clicked: &[i32]) -> i8 {
    let page: Vec<((), Team)> = teams
        .iter()
        .map(|t| {
            let team = if t == "candidate" { Team::B } else { Team::A };
            ((), team)
        })
        .collect();
    let ranks: Vec<usize> = clicked
        .iter()
        .filter(|&&r| r >= 1)
        .map(|&r| r as usize - 1)
        .collect();
    credit(&page, &ranks).preference
}

/// A verdict as published evidence.
pub fn evidence(metric: &str, kind: EvidenceKind, verdict: &Verdict) -> MetricEvidence {
    let (n_stable, n_candidate, stable_mean, candidate_mean) = match verdict.samples {
        Samples::TwoArm {
            stable,
            candidate,
            stable_mean,
            candidate_mean,
        } => (stable, candidate, stable_mean, candidate_mean),
        Samples::Interleaved {
            candidate_wins,
            stable_wins,
            ..
        } => (stable_wins, candidate_wins, None, None),
    };
    MetricEvidence {
        metric: metric.to_owned(),
        kind,
        decision: decision_name(verdict.decision).to_owned(),
        estimate: verdict.estimate.filter(|x| x.is_finite()),
        lower: verdict.interval.map(|i| i.lower).filter(|x| x.is_finite()),
        upper: verdict.interval.map(|i| i.upper).filter(|x| x.is_finite()),
        statistic: verdict.statistic.filter(|x| x.is_finite()),
        threshold: verdict.threshold,
        p_value: verdict.p_value.clamp(0.0, 1.0),
        alpha: verdict.alpha,
        margin: verdict.margin,
        n_stable,
        n_candidate,
        stable_mean: stable_mean.filter(|x| x.is_finite()),
        candidate_mean: candidate_mean.filter(|x| x.is_finite()),
        enough_data: verdict.enough_data,
    }
}

pub fn decision_name(decision: Decision) -> &'static str {
    match decision {
        Decision::SignificantlyBetter => "significantly_better",
        Decision::SignificantlyWorse => "significantly_worse",
        Decision::NonInferior => "non_inferior",
        Decision::Inconclusive => "inconclusive",
    }
}

/// The A/B verdicts, primary metric first.
pub fn ab_evidence(
    sums: &AbSums,
    primary: &str,
    margin: f64,
    alpha: f64,
    min_sessions: u64,
) -> anyhow::Result<Vec<MetricEvidence>> {
    let config = MsprtConfig {
        min_samples: min_sessions,
        ..MsprtConfig::default()
    };
    let mut out = Vec::new();
    for (i, (metric, better)) in AB_METRICS.iter().enumerate() {
        let (stable, candidate) = &sums.metrics[i];
        let criterion = Criterion {
            better: *better,
            margin,
            alpha,
        };
        let verdict = decide(stable, candidate, &criterion, &config)?;
        out.push(evidence(metric, EvidenceKind::Ab, &verdict));
    }
    if let Some(i) = out.iter().position(|e| e.metric == primary) {
        out.swap(0, i);
    }
    Ok(out)
}

/// The interleaving preference's verdict.
pub fn interleaving_evidence(
    counts: &PreferenceCounts,
    margin: f64,
    alpha: f64,
    min_decisive: u64,
) -> anyhow::Result<MetricEvidence> {
    let config = PreferenceConfig {
        min_decisive,
        ..PreferenceConfig::default()
    };
    let verdict = decide_preference(counts, margin, alpha, &config)?;
    Ok(evidence(
        "interleaving",
        EvidenceKind::Interleaving,
        &verdict,
    ))
}
