//! Guardrails from the search replicas' own counters (`GET /v1/stats`):
//! error rate, dropped impressions and p99 latency per version, each
//! compared with the stable version over the same window. Replicas count
//! from their start, so the first reading of a canary is its baseline
//! (re-taken when a replica restarts).

use std::collections::HashMap;
use std::time::Duration;

use kalon_events::{EvidenceKind, MetricEvidence};
use serde::Deserialize;

use crate::evidence::evidence;
use crate::stats::sequential::{decide, ArmSums, Criterion, Direction, MsprtConfig};

/// Search's `/v1/stats` (services/search/src/stats.rs), the fields read.
#[derive(Debug, Clone, Deserialize)]
pub struct ServingStats {
    pub started_at: String,
    pub versions: Vec<VersionStats>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct VersionStats {
    pub model_version: String,
    pub requests: u64,
    pub errors: u64,
    #[serde(default)]
    pub interleaved: u64,
    pub impressions_dropped: u64,
    /// Upper bounds in ms; the last is `null` (no bound).
    pub latency_ms_buckets: Vec<Option<f64>>,
    /// Successful requests per bucket.
    pub latency_counts: Vec<u64>,
}

impl VersionStats {
    fn minus(&self, base: &VersionStats) -> VersionStats {
        let counts = self
            .latency_counts
            .iter()
            .enumerate()
            .map(|(i, c)| c.saturating_sub(base.latency_counts.get(i).copied().unwrap_or(0)))
            .collect();
        VersionStats {
            model_version: self.model_version.clone(),
            requests: self.requests.saturating_sub(base.requests),
            errors: self.errors.saturating_sub(base.errors),
            interleaved: self.interleaved.saturating_sub(base.interleaved),
            impressions_dropped: self
                .impressions_dropped
                .saturating_sub(base.impressions_dropped),
            latency_ms_buckets: self.latency_ms_buckets.clone(),
            latency_counts: counts,
        }
    }

    fn add(&mut self, other: &VersionStats) {
        self.requests += other.requests;
        self.errors += other.errors;
        self.interleaved += other.interleaved;
        self.impressions_dropped += other.impressions_dropped;
        if self.latency_counts.is_empty() {
            self.latency_ms_buckets = other.latency_ms_buckets.clone();
            self.latency_counts = vec![0; other.latency_counts.len()];
        }
        if self.latency_ms_buckets == other.latency_ms_buckets {
            for (a, b) in self.latency_counts.iter_mut().zip(&other.latency_counts) {
                *a += b;
            }
        }
    }

    /// The upper bound of the bucket holding the `q` quantile (the last
    /// finite bound for the open bucket); `None` without requests.
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        let total: u64 = self.latency_counts.iter().sum();
        if total == 0 {
            return None;
        }
        let want = (q * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        let mut last_finite = 0.0;
        for (bound, count) in self.latency_ms_buckets.iter().zip(&self.latency_counts) {
            if let Some(b) = bound {
                last_finite = *b;
            }
            seen += count;
            if seen >= want {
                return Some(bound.unwrap_or(last_finite));
            }
        }
        Some(last_finite)
    }
}

/// Baselines per replica for the canary being watched.
#[derive(Debug, Default)]
pub struct Guardrails {
    canary: Option<i64>,
    /// url -> (replica start, counters at the first reading)
    baselines: HashMap<String, (String, HashMap<String, VersionStats>)>,
    client: Option<reqwest::Client>,
}

/// The guardrails' settings.
#[derive(Debug, Clone, Copy)]
pub struct GuardrailRules {
    pub alpha: f64,
    pub min_requests: u64,
    pub p99_ratio: f64,
    pub p99_slack_ms: f64,
}

impl Guardrails {
    /// Reads every replica and sums the window's counters per version.
    /// Replicas that do not answer are skipped (logged).
    pub async fn read(&mut self, canary: i64, urls: &[String]) -> HashMap<String, VersionStats> {
        if self.canary != Some(canary) {
            self.canary = Some(canary);
            self.baselines.clear();
        }
        let client = self
            .client
            .get_or_insert_with(|| {
                kalon_telemetry::install_crypto_provider();
                reqwest::Client::builder()
                    .timeout(Duration::from_secs(3))
                    .build()
                    .expect("an HTTP client")
            })
            .clone();
        let mut total: HashMap<String, VersionStats> = HashMap::new();
        for url in urls {
            let stats = match fetch(&client, url).await {
                Ok(stats) => stats,
                Err(error) => {
                    tracing::warn!(url, %error, "search stats unavailable; guardrails without this replica");
                    continue;
                }
            };
            let now: HashMap<String, VersionStats> = stats
                .versions
                .into_iter()
                .map(|v| (v.model_version.clone(), v))
                .collect();
            let base = self
                .baselines
                .entry(url.clone())
                .or_insert_with(|| (stats.started_at.clone(), now.clone()));
            if base.0 != stats.started_at {
                // the replica restarted: its counters began again at zero
                *base = (stats.started_at.clone(), HashMap::new());
            }
            for (version, v) in &now {
                let delta = match base.1.get(version) {
                    Some(b) => v.minus(b),
                    None => v.clone(),
                };
                total
                    .entry(version.clone())
                    .or_insert_with(|| VersionStats {
                        model_version: version.clone(),
                        ..VersionStats::default()
                    })
                    .add(&delta);
            }
        }
        total
    }
}

async fn fetch(client: &reqwest::Client, url: &str) -> anyhow::Result<ServingStats> {
    let response = client
        .get(format!("{}/v1/stats", url.trim_end_matches('/')))
        .send()
        .await?
        .error_for_status()?;
    Ok(serde_json::from_slice(&response.bytes().await?)?)
}

fn rate(events: u64, n: u64) -> ArmSums {
    ArmSums {
        n,
        sum: events as f64,
        sum_sq: events as f64,
    }
}

/// The guardrail verdicts for the window's counters.
pub fn evidence_for(
    stats: &HashMap<String, VersionStats>,
    stable: &str,
    candidate: &str,
    rules: GuardrailRules,
) -> anyhow::Result<Vec<MetricEvidence>> {
    let empty = VersionStats::default();
    let s = stats.get(stable).unwrap_or(&empty);
    let c = stats.get(candidate).unwrap_or(&empty);
    let config = MsprtConfig {
        min_samples: rules.min_requests,
        ..MsprtConfig::default()
    };
    // only a significant rise acts; the margin matters for nothing here
    let criterion = Criterion {
        better: Direction::LowerIsBetter,
        margin: 0.0,
        alpha: rules.alpha,
    };
    let mut out = Vec::new();
    let errors = decide(
        &rate(s.errors, s.requests),
        &rate(c.errors, c.requests),
        &criterion,
        &config,
    )?;
    out.push(evidence("error_rate", EvidenceKind::Guardrail, &errors));
    let ok = |v: &VersionStats| v.requests.saturating_sub(v.errors);
    let dropped = decide(
        &rate(s.impressions_dropped, ok(s)),
        &rate(c.impressions_dropped, ok(c)),
        &criterion,
        &config,
    )?;
    out.push(evidence(
        "impressions_dropped",
        EvidenceKind::Guardrail,
        &dropped,
    ));
    out.push(p99(s, c, rules));
    Ok(out)
}

/// p99 latency: a breach when the candidate's exceeds the stable's by the
/// allowed ratio and slack, with both arms past the minimum.
fn p99(s: &VersionStats, c: &VersionStats, rules: GuardrailRules) -> MetricEvidence {
    let (ps, pc) = (s.quantile_ms(0.99), c.quantile_ms(0.99));
    let n = |v: &VersionStats| v.latency_counts.iter().sum::<u64>();
    let enough = n(s) >= rules.min_requests && n(c) >= rules.min_requests;
    let ratio = match (ps, pc) {
        (Some(ps), Some(pc)) if ps > 0.0 => Some(pc / ps),
        _ => None,
    };
    let breach = match (ps, pc) {
        (Some(ps), Some(pc)) => pc > ps * rules.p99_ratio && pc - ps > rules.p99_slack_ms,
        _ => false,
    };
    let decision = match (enough, breach) {
        (false, _) => "inconclusive",
        (true, true) => "significantly_worse",
        (true, false) => "non_inferior",
    };
    MetricEvidence {
        metric: "p99_latency_ms".into(),
        kind: EvidenceKind::Guardrail,
        decision: decision.into(),
        estimate: ps.zip(pc).map(|(s, c)| c - s),
        lower: None,
        upper: None,
        statistic: ratio,
        threshold: rules.p99_ratio,
        p_value: if breach && enough { 0.0 } else { 1.0 },
        alpha: rules.alpha,
        margin: rules.p99_ratio - 1.0,
        n_stable: n(s),
        n_candidate: n(c),
        stable_mean: ps,
        candidate_mean: pc,
        enough_data: enough,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(requests: u64, errors: u64, counts: Vec<u64>) -> VersionStats {
        VersionStats {
            model_version: "v".into(),
            requests,
            errors,
            interleaved: 0,
            impressions_dropped: 0,
            latency_ms_buckets: vec![Some(5.0), Some(10.0), Some(50.0), None],
            latency_counts: counts,
        }
    }

    #[test]
    fn quantiles_come_from_the_buckets() {
        let v = version(100, 0, vec![90, 9, 1, 0]);
        assert_eq!(v.quantile_ms(0.5), Some(5.0));
        assert_eq!(v.quantile_ms(0.99), Some(10.0));
        assert_eq!(v.quantile_ms(1.0), Some(50.0));
        let open = version(10, 0, vec![0, 0, 0, 10]);
        assert_eq!(
            open.quantile_ms(0.99),
            Some(50.0),
            "the open bucket: its floor"
        );
        assert_eq!(version(0, 0, vec![0; 4]).quantile_ms(0.99), None);
    }

    #[test]
    fn errors_and_slow_candidates_breach_and_thin_arms_do_not() {
        let rules = GuardrailRules {
            alpha: 0.05,
            min_requests: 200,
            p99_ratio: 1.5,
            p99_slack_ms: 20.0,
        };
        let stats = |s: VersionStats, c: VersionStats| {
            HashMap::from([("s".to_string(), s), ("c".to_string(), c)])
        };
        let healthy = stats(
            version(5000, 5, vec![4000, 995, 0, 0]),
            version(1000, 1, vec![800, 199, 0, 0]),
        );
        let out = evidence_for(&healthy, "s", "c", rules).unwrap();
        assert!(
            out.iter().all(|e| e.decision != "significantly_worse"),
            "{out:?}"
        );
        let failing = stats(
            version(5000, 5, vec![4000, 995, 0, 0]),
            version(1000, 200, vec![700, 100, 0, 0]),
        );
        let out = evidence_for(&failing, "s", "c", rules).unwrap();
        assert_eq!(out[0].metric, "error_rate");
        assert_eq!(out[0].decision, "significantly_worse");
        let slow = stats(
            version(5000, 0, vec![4000, 1000, 0, 0]),
            version(1000, 0, vec![0, 0, 0, 1000]),
        );
        let out = evidence_for(&slow, "s", "c", rules).unwrap();
        assert_eq!(out[2].decision, "significantly_worse", "{:?}", out[2]);
        let thin = stats(
            version(5000, 0, vec![4000, 1000, 0, 0]),
            version(10, 5, vec![0, 0, 0, 5]),
        );
        let out = evidence_for(&thin, "s", "c", rules).unwrap();
        assert!(out.iter().all(|e| e.decision == "inconclusive"), "{out:?}");
    }
}
