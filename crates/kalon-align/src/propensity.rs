//! Position bias estimated from the traffic, not assumed.
//!
//! Click pairs are weighted by the inverse of the probability that a person
//! examined the clicked rank ([`crate::feedback::Propensity`] is the fixed
//! `r^-eta` prior). This module estimates that examination curve from what
//! people did, under the position-based click model
//! `P(click d at rank r for q) = theta_r * attractiveness(q, d)`.
//!
//! # Method: intervention harvesting on adjacent ranks
//!
//! Whenever the same (query, image) is shown at rank `k` and at rank `k+1`
//! (search's exploration swap, `kalon_events::explore`, or two model
//! versions of a canary ranking it differently) its attractiveness cancels
//! out of the ratio of its click rates. Summed over every such pair,
//!
//! ```text
//! theta_{k+1} / theta_k = sum_{(q,d) in S_k} CTR(q,d,k+1) / sum_{(q,d) in S_k} CTR(q,d,k)
//! ```
//!
//! where `S_k` is the set of (query, image) seen at both `k` and `k+1` (the
//! *interventions* of link `k`) and `CTR(q,d,r) = clicked / shown` at that
//! rank. This is the adjacent-rank form of the harvested click-rate
//! estimator of Agarwal, Zaitsev, Wang, Li, Najork and Joachims, "Estimating
//! Position Bias without Intrusive Interventions" (WSDM 2019, section 4):
//! each (q, d) counts its clicks at a rank weighted by the inverse of how
//! often it was shown there, so a (q, d) shown mostly at one rank weighs no
//! more than one shown evenly; with randomised swaps of neighbours it is the
//! swap experiment of Joachims, Swaminathan and Schnabel, "Unbiased
//! Learning-to-Rank with Biased Feedback" (WSDM 2017, section 5) harvested
//! from ordinary traffic. Both sums have the same expected attractiveness
//! mass, so the ratio is consistent. The ratios are chained from
//! `theta_1 = 1`.
//!
//! A link with fewer than [`EstimatorConfig::min_interventions`]
//! interventions, or without a click at its upper rank, breaks the chain:
//! that rank and every rank below it are *not estimated*, and
//! [`Estimate::weight`] falls back to the prior there.
//!
//! # Confidence
//!
//! A percentile bootstrap over (query, image) groups: the groups (in sorted
//! order) are resampled with replacement [`EstimatorConfig::bootstrap`]
//! times with a SplitMix64 stream from [`EstimatorConfig::seed`], and the
//! whole chain is recomputed each time, so the interval at rank `r` carries
//! the uncertainty (and the correlation) of every link above it. The same
//! observations and config give the same interval, bit for bit.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::feedback::Propensity;

/// How often one (query, image) was shown at one rank, and clicked there.
/// Rows repeating the same (query, image, rank) are added up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Observation {
    pub query: String,
    pub image: String,
    /// The 1-based rank the person saw (an impression's `rank`, not its
    /// `model_rank`).
    pub rank: u32,
    pub shown: u64,
    /// Clicks at this rank; at most one per impression counts.
    pub clicked: u64,
}

/// rank -> (shown, clicked) of one (query, image).
type ByRank = BTreeMap<u32, (u64, u64)>;

/// Observations accumulated from result lists in memory (the simulator, tests;
/// the service can aggregate in SQL instead).
#[derive(Debug, Clone, Default)]
pub struct Tally {
    /// query -> image -> rank -> (shown, clicked); nested so that counting
    /// an existing entry allocates nothing.
    counts: BTreeMap<String, BTreeMap<String, ByRank>>,
}

impl Tally {
    /// One showing of `image` at `rank` for `query`, clicked or not.
    pub fn record(&mut self, query: &str, image: &str, rank: u32, clicked: bool) {
        if !self.counts.contains_key(query) {
            self.counts.insert(query.to_owned(), BTreeMap::new());
        }
        let images = self.counts.get_mut(query).expect("inserted above");
        if !images.contains_key(image) {
            images.insert(image.to_owned(), BTreeMap::new());
        }
        let ranks = images.get_mut(image).expect("inserted above");
        let entry = ranks.entry(rank).or_default();
        entry.0 += 1;
        entry.1 += u64::from(clicked);
    }

    /// The observations so far, sorted by (query, image, rank).
    pub fn observations(&self) -> Vec<Observation> {
        let mut out = Vec::new();
        for (query, images) in &self.counts {
            for (image, ranks) in images {
                for (&rank, &(shown, clicked)) in ranks {
                    out.push(Observation {
                        query: query.clone(),
                        image: image.clone(),
                        rank,
                        shown,
                        clicked,
                    });
                }
            }
        }
        out
    }
}

/// The estimator's settings; stored with every estimate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EstimatorConfig {
    /// Ranks 1..=max_rank are estimated.
    pub max_rank: u32,
    /// Fewest (query, image) interventions a link `(k, k+1)` needs before
    /// `theta_{k+1}` is reported.
    pub min_interventions: u64,
    /// Two-sided level of the bootstrap interval, in (0, 1).
    pub confidence: f64,
    /// Bootstrap resamples; 0 gives no interval.
    pub bootstrap: u32,
    /// Seed of the bootstrap's resampling.
    pub seed: u64,
}

impl Default for EstimatorConfig {
    fn default() -> Self {
        EstimatorConfig {
            max_rank: 10,
            min_interventions: 30,
            confidence: 0.95,
            bootstrap: 200,
            seed: 23,
        }
    }
}

/// The examination propensity at one rank, relative to rank 1.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RankEstimate {
    pub rank: u32,
    /// `theta_rank / theta_1`; `None` when not estimated (the caller uses
    /// the prior).
    pub theta: Option<f64>,
    /// The bootstrap interval's bounds (`None` when not estimated or no
    /// resample could compute this rank).
    pub low: Option<f64>,
    pub high: Option<f64>,
    /// (query, image) groups seen at both `rank - 1` and `rank`: the
    /// interventions of the link into this rank (0 at rank 1, the
    /// reference). `theta` rests on every link above it as well.
    pub interventions: u64,
    /// Every showing at this rank, and the clicks there (context: the naive
    /// click-through rate is `clicked / shown`).
    pub shown: u64,
    pub clicked: u64,
}

/// The estimated examination curve, with the numbers behind it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Estimate {
    /// `"adjacent_intervention_harvesting"`.
    pub method: String,
    pub config: EstimatorConfig,
    /// Ranks 1..=max_rank, in order.
    pub ranks: Vec<RankEstimate>,
    /// Distinct (query, image) groups observed at ranks 1..=max_rank.
    pub groups: u64,
    /// Bootstrap resamples that were used.
    pub resamples: u32,
}

/// The name of the method in [`Estimate::method`].
pub const METHOD: &str = "adjacent_intervention_harvesting";

impl Estimate {
    /// The estimated `theta_rank` (rank 1 is 1), if estimated.
    pub fn theta(&self, rank: u32) -> Option<f64> {
        self.rank(rank).and_then(|r| r.theta)
    }

    /// The estimate at `rank`, if within `1..=max_rank`.
    pub fn rank(&self, rank: u32) -> Option<&RankEstimate> {
        rank.checked_sub(1).and_then(|i| self.ranks.get(i as usize))
    }

    /// How deep the curve is estimated: ranks `1..=estimated_depth()`.
    pub fn estimated_depth(&self) -> u32 {
        self.ranks.iter().take_while(|r| r.theta.is_some()).count() as u32
    }

    /// The weight of a click at `rank`: the inverse estimated propensity,
    /// capped at `prior.max_weight`, or the prior's weight where the rank is
    /// not estimated (or outside the estimated range).
    pub fn weight(&self, rank: u32, prior: &Propensity) -> f64 {
        match self.theta(rank) {
            Some(theta) if theta > 0.0 => (1.0 / theta).min(prior.max_weight),
            Some(_) => prior.max_weight,
            None => prior.weight(rank),
        }
    }
}

impl fmt::Display for Estimate {
    /// A table: rank, theta, interval, interventions, naive CTR.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cell = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.3}"));
        writeln!(
            f,
            "{} over {} (query, image) groups, {:.0}% bootstrap interval of {} resamples",
            self.method,
            self.groups,
            100.0 * self.config.confidence,
            self.resamples
        )?;
        writeln!(f, "rank  theta  low    high   interventions  shown  ctr")?;
        for r in &self.ranks {
            let ctr = (r.shown > 0).then(|| r.clicked as f64 / r.shown as f64);
            writeln!(
                f,
                "{:>4}  {:<5}  {:<5}  {:<5}  {:>13}  {:>5}  {}",
                r.rank,
                cell(r.theta),
                cell(r.low),
                cell(r.high),
                r.interventions,
                r.shown,
                cell(ctr)
            )?;
        }
        Ok(())
    }
}

/// One link's interventions: (group index, CTR at k, CTR at k+1).
type Link = Vec<(usize, f64, f64)>;

/// Estimates the examination curve from `observations` (see the module
/// documentation for the method and the interval).
pub fn estimate(observations: &[Observation], config: &EstimatorConfig) -> Estimate {
    let max_rank = config.max_rank.max(1);
    // (query, image) -> rank -> (shown, clicked), ranks 1..=max_rank only
    let mut groups: BTreeMap<(&str, &str), ByRank> = BTreeMap::new();
    let mut per_rank = vec![(0u64, 0u64); max_rank as usize];
    for o in observations
        .iter()
        .filter(|o| (1..=max_rank).contains(&o.rank) && o.shown > 0)
    {
        let clicked = o.clicked.min(o.shown);
        let entry = groups
            .entry((o.query.as_str(), o.image.as_str()))
            .or_default()
            .entry(o.rank)
            .or_default();
        entry.0 += o.shown;
        entry.1 += clicked;
        let total = &mut per_rank[o.rank as usize - 1];
        total.0 += o.shown;
        total.1 += clicked;
    }
    let ctr = |(shown, clicked): (u64, u64)| clicked as f64 / shown as f64;
    let mut links: Vec<Link> = vec![Vec::new(); max_rank as usize - 1];
    for (g, ranks) in groups.values().enumerate() {
        for (&rank, &counts) in ranks {
            if let Some(&below) = ranks.get(&(rank + 1)) {
                if rank < max_rank {
                    links[rank as usize - 1].push((g, ctr(counts), ctr(below)));
                }
            }
        }
    }
    let enough: Vec<bool> = links
        .iter()
        .map(|l| l.len() as u64 >= config.min_interventions.max(1))
        .collect();
    let point = chain(&links, &enough, |_| 1.0);

    // percentile bootstrap over groups, the whole chain per resample
    let mut rng = SplitMix64(config.seed);
    let n_groups = groups.len();
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); max_rank as usize];
    let mut multiplicity = vec![0u32; n_groups];
    let resamples = if n_groups == 0 { 0 } else { config.bootstrap };
    for _ in 0..resamples {
        multiplicity.iter_mut().for_each(|m| *m = 0);
        for _ in 0..n_groups {
            multiplicity[(rng.next() % n_groups as u64) as usize] += 1;
        }
        let thetas = chain(&links, &enough, |g| f64::from(multiplicity[g]));
        for (r, theta) in thetas.into_iter().enumerate() {
            if let Some(theta) = theta {
                samples[r].push(theta);
            }
        }
    }
    let tail = (1.0 - config.confidence.clamp(0.0, 1.0)) / 2.0;
    let ranks = (1..=max_rank)
        .map(|rank| {
            let i = rank as usize - 1;
            let theta = point[i];
            let (low, high) = match theta {
                Some(_) if !samples[i].is_empty() => {
                    let s = &mut samples[i];
                    s.sort_by(f64::total_cmp);
                    (Some(quantile(s, tail)), Some(quantile(s, 1.0 - tail)))
                }
                _ => (None, None),
            };
            RankEstimate {
                rank,
                theta,
                low,
                high,
                interventions: if rank == 1 {
                    0
                } else {
                    links[i - 1].len() as u64
                },
                shown: per_rank[i].0,
                clicked: per_rank[i].1,
            }
        })
        .collect();
    Estimate {
        method: METHOD.to_owned(),
        config: config.clone(),
        ranks,
        groups: n_groups as u64,
        resamples,
    }
}

/// theta per rank from the links, each group weighted by `weight(group)`
/// (1 for the point estimate, its multiplicity in a bootstrap resample).
fn chain(links: &[Link], enough: &[bool], weight: impl Fn(usize) -> f64) -> Vec<Option<f64>> {
    let mut thetas = Vec::with_capacity(links.len() + 1);
    let mut theta = Some(1.0);
    thetas.push(theta);
    for (link, &enough) in links.iter().zip(enough) {
        theta = theta.and_then(|above| {
            if !enough {
                return None;
            }
            let (mut at_k, mut at_next) = (0.0, 0.0);
            for &(g, ctr_k, ctr_next) in link {
                let w = weight(g);
                at_k += w * ctr_k;
                at_next += w * ctr_next;
            }
            (at_k > 0.0).then(|| above * at_next / at_k)
        });
        thetas.push(theta);
    }
    thetas
}

/// The `q` quantile of sorted `values`, linearly interpolated.
fn quantile(values: &[f64], q: f64) -> f64 {
    let at = q * (values.len() - 1) as f64;
    let (lo, hi) = (at.floor() as usize, at.ceil() as usize);
    values[lo] + (values[hi] - values[lo]) * (at - lo as f64)
}

/// The relative click-through rate by rank, `CTR_r / CTR_1`, ignoring
/// interventions: what position bias looks like when relevance falling with
/// rank is mistaken for it (a diagnostic; it overstates the bias of a good
/// ranker).
pub fn naive_curve(observations: &[Observation], max_rank: u32) -> Vec<Option<f64>> {
    let mut per_rank = vec![(0u64, 0u64); max_rank as usize];
    for o in observations
        .iter()
        .filter(|o| (1..=max_rank).contains(&o.rank))
    {
        per_rank[o.rank as usize - 1].0 += o.shown;
        per_rank[o.rank as usize - 1].1 += o.clicked.min(o.shown);
    }
    let ctr: Vec<Option<f64>> = per_rank
        .iter()
        .map(|&(shown, clicked)| (shown > 0).then(|| clicked as f64 / shown as f64))
        .collect();
    match ctr.first().copied().flatten() {
        Some(first) if first > 0.0 => ctr.iter().map(|c| c.map(|c| c / first)).collect(),
        _ => vec![None; max_rank as usize],
    }
}

/// SplitMix64: a small, fixed generator, so a stored estimate can be
/// recomputed bit for bit whatever `rand` version is linked.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(query: &str, image: &str, rank: u32, shown: u64, clicked: u64) -> Observation {
        Observation {
            query: query.into(),
            image: image.into(),
            rank,
            shown,
            clicked,
        }
    }

    fn config(max_rank: u32, min_interventions: u64) -> EstimatorConfig {
        EstimatorConfig {
            max_rank,
            min_interventions,
            ..EstimatorConfig::default()
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn adjacent_ratios_are_chained_by_hand() {
        // link 1: a at ranks 1 and 2 (CTR 0.5, 0.25), b (0.4, 0.3)
        //   theta_2 = (0.25 + 0.3) / (0.5 + 0.4) = 0.55 / 0.9
        // link 2: c at ranks 2 and 3 (0.2, 0.1), d (0.6, 0.5)
        //   theta_3 = theta_2 * (0.1 + 0.5) / (0.2 + 0.6) = theta_2 * 0.75
        let data = [
            obs("q1", "a", 1, 10, 5),
            obs("q1", "a", 2, 4, 1),
            obs("q1", "b", 1, 5, 2),
            obs("q1", "b", 2, 10, 3),
            obs("q2", "c", 2, 10, 2),
            obs("q2", "c", 3, 10, 1),
            obs("q2", "d", 2, 5, 3),
            obs("q2", "d", 3, 2, 1),
            // e never moved: no intervention, only the totals
            obs("q2", "e", 1, 7, 7),
        ];
        let est = estimate(&data, &config(4, 2));
        let theta2 = 0.55 / 0.9;
        assert_eq!(est.theta(1), Some(1.0));
        assert!(close(est.theta(2).unwrap(), theta2));
        assert!(close(est.theta(3).unwrap(), theta2 * 0.75));
        assert_eq!(est.theta(4), None, "no (q, d) at ranks 3 and 4");
        assert_eq!(est.estimated_depth(), 3);
        let support: Vec<u64> = est.ranks.iter().map(|r| r.interventions).collect();
        assert_eq!(support, [0, 2, 2, 0]);
        assert_eq!((est.ranks[0].shown, est.ranks[0].clicked), (22, 14));
        assert_eq!(est.groups, 5);
        // each interval holds its point estimate
        for r in &est.ranks[..3] {
            let (low, high, theta) = (r.low.unwrap(), r.high.unwrap(), r.theta.unwrap());
            assert!(low <= theta + 1e-12 && theta <= high + 1e-12, "{r:?}");
        }
    }

    #[test]
    fn repeated_rows_add_up_and_the_order_of_rows_does_not_matter() {
        let split = [
            obs("q", "a", 1, 6, 3),
            obs("q", "a", 2, 2, 1),
            obs("q", "a", 1, 4, 2),
            obs("q", "a", 2, 2, 0),
        ];
        let whole = [obs("q", "a", 2, 4, 1), obs("q", "a", 1, 10, 5)];
        let a = estimate(&split, &config(2, 1));
        let b = estimate(&whole, &config(2, 1));
        assert_eq!(a, b);
        assert!(close(a.theta(2).unwrap(), 0.25 / 0.5));
    }

    #[test]
    fn too_few_interventions_break_the_chain_and_fall_back_to_the_prior() {
        let data = [
            obs("q", "a", 1, 10, 5),
            obs("q", "a", 2, 10, 4),
            obs("q", "b", 2, 10, 5),
            obs("q", "b", 3, 10, 4),
        ];
        let est = estimate(&data, &config(3, 2));
        assert_eq!(est.theta(2), None, "one intervention, two needed");
        assert_eq!(est.theta(3), None, "below a broken link");
        assert_eq!(est.estimated_depth(), 1);
        let prior = Propensity::default();
        assert_eq!(est.weight(1, &prior), 1.0);
        assert_eq!(est.weight(2, &prior), prior.weight(2));
        assert_eq!(est.weight(3, &prior), prior.weight(3));
        assert_eq!(est.weight(40, &prior), prior.weight(40), "beyond max_rank");

        let est = estimate(&data, &config(3, 1));
        assert!(close(est.theta(2).unwrap(), 0.8));
        assert!(close(est.theta(3).unwrap(), 0.8 * 0.8));
        assert!(close(est.weight(3, &prior), 1.0 / 0.64));
    }

    #[test]
    fn weights_are_capped_and_no_clicks_above_is_not_an_estimate() {
        let prior = Propensity {
            eta: 0.8,
            max_weight: 4.0,
        };
        // clicks at rank 1 only: theta_2 = 0, the weight is the cap
        let est = estimate(
            &[obs("q", "a", 1, 5, 5), obs("q", "a", 2, 5, 0)],
            &config(2, 1),
        );
        assert_eq!(est.theta(2), Some(0.0));
        assert_eq!(est.weight(2, &prior), 4.0);
        // no click at rank 1: the ratio is undefined, not estimated
        let est = estimate(
            &[obs("q", "a", 1, 5, 0), obs("q", "a", 2, 5, 1)],
            &config(2, 1),
        );
        assert_eq!(est.theta(2), None);
        assert_eq!(est.weight(2, &prior), prior.weight(2));
        // no observations at all
        let est = estimate(&[], &EstimatorConfig::default());
        assert_eq!(est.estimated_depth(), 1);
        assert_eq!(est.resamples, 0);
    }

    #[test]
    fn the_estimate_round_trips_through_json_and_is_deterministic() {
        let mut data = Vec::new();
        for q in 0..40 {
            for (rank, shown, clicked) in [(1, 20, 8), (2, 20, 6), (3, 20, 5)] {
                data.push(obs(&format!("q{q}"), "a", rank, shown, clicked + q % 3));
            }
        }
        let est = estimate(&data, &EstimatorConfig::default());
        assert_eq!(est, estimate(&data, &EstimatorConfig::default()));
        let json = serde_json::to_value(&est).unwrap();
        assert_eq!(json["method"], METHOD);
        assert_eq!(json["ranks"][1]["interventions"], 40);
        let back: Estimate = serde_json::from_value(json).unwrap();
        assert_eq!(back, est);
        // another seed: another interval, the same point estimate
        let other = estimate(
            &data,
            &EstimatorConfig {
                seed: 7,
                ..EstimatorConfig::default()
            },
        );
        assert_eq!(other.theta(3), est.theta(3));
        assert!(est.to_string().contains("interventions"));
    }

    #[test]
    fn a_tally_counts_showings_and_clicks_per_query_image_and_rank() {
        let mut tally = Tally::default();
        tally.record("q", "b", 2, true);
        tally.record("q", "a", 1, false);
        tally.record("q", "b", 2, false);
        tally.record("p", "b", 2, true);
        assert_eq!(
            tally.observations(),
            [
                obs("p", "b", 2, 1, 1),
                obs("q", "a", 1, 1, 0),
                obs("q", "b", 2, 2, 1)
            ]
        );
    }

    #[test]
    fn the_naive_curve_is_ctr_relative_to_rank_one() {
        let data = [
            obs("q", "a", 1, 10, 5),
            obs("q", "b", 2, 10, 2),
            obs("p", "c", 2, 10, 3),
        ];
        let naive = naive_curve(&data, 3);
        assert_eq!(naive[0], Some(1.0));
        assert!(close(naive[1].unwrap(), 0.25 / 0.5));
        assert_eq!(naive[2], None);
    }
}
