//! Per-version serving figures since the process started, served read-only
//! at `GET /v1/stats`: what the canary controller compares between the
//! stable version and the candidate (error rate, latency, interleaved
//! pages, impressions lost on the way to the bus).
//!
//! [`ServingStats`] is the JSON contract; the canary mirrors it field for
//! field rather than linking this service. Counters live in one
//! [`Serving`] per process behind a mutex held for a hash lookup and a few
//! additions, so recording costs next to nothing next to a search.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Upper bounds (inclusive, milliseconds) of the latency buckets; a last
/// bucket without a bound (`null` in JSON) takes everything slower.
pub const LATENCY_BOUNDS_MS: [u64; 20] = [
    1, 2, 3, 5, 7, 10, 15, 20, 30, 50, 75, 100, 150, 200, 300, 500, 750, 1000, 2000, 5000,
];

/// Number of latency buckets, the unbounded last one included.
pub const LATENCY_BUCKETS: usize = LATENCY_BOUNDS_MS.len() + 1;

/// `GET /v1/stats`: cumulative figures since `started_at`, one entry per
/// model version that is loaded or has been routed to, by version name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServingStats {
    /// When this process started counting.
    pub started_at: DateTime<Utc>,
    pub versions: Vec<VersionStats>,
}

/// One model version's figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VersionStats {
    pub model_version: String,
    /// Searches routed (or pinned) to this version and answered, whatever
    /// the status.
    pub requests: u64,
    /// Of those, answered with a server error (the encoder or the index
    /// failed).
    pub errors: u64,
    /// Of the successful ones, answered with a team-draft interleaved page
    /// (this version the candidate).
    pub interleaved: u64,
    /// Impressions of this version the producer lost (buffer full, broker
    /// away).
    pub impressions_dropped: u64,
    /// Bucket upper bounds in milliseconds ([`LATENCY_BOUNDS_MS`]), the last
    /// `null` (no bound).
    pub latency_ms_buckets: Vec<Option<u64>>,
    /// Successful searches per bucket (not cumulative): a latency of `x` ms
    /// counts in the first bucket whose bound is `>= x`. Sums to the
    /// successful requests that were not interleaved (an interleaved page
    /// searches two versions, so its time is not this version's own).
    pub latency_counts: Vec<u64>,
}

#[derive(Debug, Default, Clone)]
struct Counters {
    requests: u64,
    errors: u64,
    interleaved: u64,
    impressions_dropped: u64,
    latency: [u64; LATENCY_BUCKETS],
}

/// How one routed search ended, for [`Serving::record`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Answered 200; `interleaved` when the page was a team draft.
    Ok { interleaved: bool },
    /// Answered with a client error after routing (no readable words).
    Refused,
    /// Answered with a server error.
    Failed,
}

/// The process's counters.
#[derive(Debug)]
pub struct Serving {
    started_at: DateTime<Utc>,
    versions: Mutex<HashMap<String, Counters>>,
}

impl Default for Serving {
    fn default() -> Self {
        Serving {
            started_at: Utc::now(),
            versions: Mutex::default(),
        }
    }
}

/// The bucket of a latency: the first whose bound is at least `ms`.
pub fn bucket_of(latency: Duration) -> usize {
    let ms = latency.as_secs_f64() * 1000.0;
    LATENCY_BOUNDS_MS
        .iter()
        .position(|bound| ms <= *bound as f64)
        .unwrap_or(LATENCY_BOUNDS_MS.len())
}

impl Serving {
    fn with<R>(&self, version: &str, f: impl FnOnce(&mut Counters) -> R) -> R {
        let mut versions = self.versions.lock().unwrap_or_else(|e| e.into_inner());
        match versions.get_mut(version) {
            Some(counters) => f(counters),
            None => f(versions.entry(version.to_owned()).or_default()),
        }
    }

    /// Counts one search routed to `version`, answered after `latency`.
    pub fn record(&self, version: &str, outcome: Outcome, latency: Duration) {
        self.with(version, |c| {
            c.requests += 1;
            match outcome {
                Outcome::Ok { interleaved } => {
                    c.interleaved += u64::from(interleaved);
                    // an interleaved page searches two versions: its time is
                    // not the candidate's own, so it stays out of the latency
                    // the canary's guardrail compares
                    if !interleaved {
                        c.latency[bucket_of(latency)] += 1;
                    }
                }
                Outcome::Refused => {}
                Outcome::Failed => c.errors += 1,
            }
        });
    }

    /// Counts `n` impressions of `version` lost by the producer.
    pub fn dropped(&self, version: &str, n: u64) {
        self.with(version, |c| c.impressions_dropped += n);
    }

    /// The figures so far, by version name; every version in `loaded`
    /// appears, with zeros if nothing reached it yet.
    pub fn snapshot<'a>(&self, loaded: impl IntoIterator<Item = &'a str>) -> ServingStats {
        let mut counted: Vec<(String, Counters)> = {
            let versions = self.versions.lock().unwrap_or_else(|e| e.into_inner());
            versions
                .iter()
                .map(|(v, c)| (v.clone(), c.clone()))
                .collect()
        };
        for version in loaded {
            if !counted.iter().any(|(v, _)| v == version) {
                counted.push((version.to_owned(), Counters::default()));
            }
        }
        counted.sort_by(|a, b| a.0.cmp(&b.0));
        let bounds: Vec<Option<u64>> = LATENCY_BOUNDS_MS
            .iter()
            .copied()
            .map(Some)
            .chain([None])
            .collect();
        ServingStats {
            started_at: self.started_at,
            versions: counted
                .into_iter()
                .map(|(model_version, c)| VersionStats {
                    model_version,
                    requests: c.requests,
                    errors: c.errors,
                    interleaved: c.interleaved,
                    impressions_dropped: c.impressions_dropped,
                    latency_ms_buckets: bounds.clone(),
                    latency_counts: c.latency.to_vec(),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_fall_into_the_first_bucket_at_least_as_slow() {
        let ms = |x: f64| Duration::from_secs_f64(x / 1000.0);
        assert_eq!(bucket_of(Duration::ZERO), 0);
        assert_eq!(bucket_of(ms(1.0)), 0);
        assert_eq!(bucket_of(ms(1.01)), 1);
        assert_eq!(bucket_of(ms(4.0)), 3);
        assert_eq!(bucket_of(ms(5000.0)), 19);
        assert_eq!(bucket_of(ms(5000.5)), 20);
        assert_eq!(bucket_of(Duration::from_secs(3600)), LATENCY_BUCKETS - 1);
    }

    #[test]
    fn counters_are_per_version_and_the_json_has_the_documented_shape() {
        let serving = Serving::default();
        let ms = Duration::from_millis;
        serving.record("v1", Outcome::Ok { interleaved: false }, ms(4));
        serving.record("v1", Outcome::Ok { interleaved: false }, ms(12_000));
        // an interleaved page counts, but not in this version's latency
        serving.record("v1", Outcome::Ok { interleaved: true }, ms(3));
        serving.record("v1", Outcome::Failed, ms(1));
        serving.record("v1", Outcome::Refused, ms(1));
        serving.dropped("v2", 3);
        let stats = serving.snapshot(["v0", "v1"]);
        let names: Vec<&str> = stats
            .versions
            .iter()
            .map(|v| v.model_version.as_str())
            .collect();
        assert_eq!(names, ["v0", "v1", "v2"]);
        let v1 = &stats.versions[1];
        assert_eq!((v1.requests, v1.errors, v1.interleaved), (5, 1, 1));
        assert_eq!(v1.latency_counts.len(), LATENCY_BUCKETS);
        assert_eq!(v1.latency_counts.iter().sum::<u64>(), 2);
        assert_eq!((v1.latency_counts[3], v1.latency_counts[20]), (1, 1));
        assert_eq!(stats.versions[2].impressions_dropped, 3);
        assert_eq!(stats.versions[0].requests, 0);

        let json = serde_json::to_value(&stats).unwrap();
        let v = &json["versions"][1];
        assert_eq!(v["latency_ms_buckets"][0], 1);
        assert_eq!(v["latency_ms_buckets"][19], 5000);
        assert!(v["latency_ms_buckets"][20].is_null());
        for field in [
            "model_version",
            "requests",
            "errors",
            "interleaved",
            "impressions_dropped",
            "latency_ms_buckets",
            "latency_counts",
        ] {
            assert!(!v[field].is_null(), "{field}");
        }
        assert!(json["started_at"].as_str().unwrap().contains('T'));
        let back: ServingStats = serde_json::from_value(json).unwrap();
        assert_eq!(back, stats);
    }
}
