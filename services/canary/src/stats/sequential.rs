//! Anytime-valid sequential inference: tests the canary controller may look
//! at after every batch of users without inflating its false decisions.
//!
//! # Two-arm means: mSPRT with a normal mixture
//!
//! Johari, Pekelis, Walsh, "Always valid inference: continuous monitoring of
//! A/B tests", Operations Research 70(3), 2022 (arXiv 1512.04922, 2017).
//! For a difference of means `theta = mean(candidate) - mean(stable)`, with
//! estimate `d` and variance `V = s_stable^2 / n_stable + s_candidate^2 /
//! n_candidate`, the mixture likelihood ratio against `theta = theta0` with a
//! `N(theta0, tau^2)` mixing distribution is
//!
//! ```text
//! Lambda = sqrt(V / (V + tau^2)) * exp(tau^2 (d - theta0)^2 / (2 V (V + tau^2)))
//! ```
//!
//! (the paper's formula with `V = 2 sigma^2 / n` for equal arms). Under
//! `theta = theta0` it is a nonnegative martingale with mean 1, so by Ville's
//! inequality `P(Lambda >= 1/alpha at any look) <= alpha`: the always-valid
//! p-value is the running minimum of `1 / Lambda`, and the confidence
//! sequence is every `theta0` with `Lambda(theta0) < 1/alpha`, a band of
//! half-width
//!
//! ```text
//! r = sqrt(V (V + tau^2) / tau^2 * (2 ln(1/alpha) + ln((V + tau^2) / V)))
//! ```
//!
//! The arms need not be the same size: `d / V` is a Brownian motion with
//! drift `theta` in information time `1 / V` for any traffic split that does
//! not depend on the outcomes (the covariance of the estimate at two looks is
//! the variance at the later one), which is all the martingale needs. The
//! variances are estimated (the paper's plug-in, valid as the arms grow), so
//! a verdict waits for [`MsprtConfig::min_samples`] per arm, and each arm's
//! variance is floored at the variance of both arms pooled, so that a small
//! arm that has not yet shown any spread (no errors so far) does not look
//! certain.
//!
//! `tau` is the scale of effects the test is tuned for: the boundary is
//! tightest near the sample where `tau^2 ~ 8 V` (for alpha = 0.05) and it is
//! flat around that point. The default, `tau = 0.05` standard deviations of
//! the metric, is tightest near 3,200 candidate sessions when the candidate
//! is the small arm (6,400 per arm for an even split), the scale of a canary
//! step.
//!
//! # Interleaving preference: a sub-Gaussian normal-mixture boundary
//!
//! Howard, Ramdas, McAuliffe, Sekhon, "Time-uniform, nonparametric,
//! nonasymptotic confidence sequences", Annals of Statistics 49(2), 2021,
//! the normal-mixture boundary (Robbins 1970) for 1/4-sub-Gaussian
//! observations. A query whose clicks prefer one ranking is decisive; among
//! decisive queries the candidate wins with probability `p` (ties carry no
//! information and are skipped, which keeps the supermartingale: a tie adds
//! nothing to the sum nor to the intrinsic time). A win indicator in [0, 1]
//! is 1/4-sub-Gaussian by Hoeffding's lemma, so the same formula as above
//! with the known `V = 1 / (4 D)` over `D` decisive queries is a
//! confidence sequence for `p` that needs no variance estimate and no large
//! sample: it is valid from the first query. It is reported on the scale of
//! the mean preference among decisive queries, `2 p - 1` in [-1, 1] (0: no
//! preference). The bound is nearly tight at `p = 1/2`, the null that
//! matters. Its default `tau = 0.1` standard deviations (0.05 in `p`) is
//! tightest near 800 decisive queries.
//!
//! # Decisions
//!
//! [`decide`] and [`decide_preference`] turn a test into a [`Verdict`]:
//! significantly better or worse when the interval excludes no difference,
//! non-inferior when the candidate is shown to be no worse than the margin,
//! otherwise inconclusive. A verdict carries the numbers behind it.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Errors of this module: only invalid parameters, never data.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum Error {
    #[error("alpha must be in (0, 1), got {0}")]
    Alpha(f64),
    #[error("the non-inferiority margin must be finite and in [0, 1), got {0}")]
    Margin(f64),
    #[error("the mixing scale tau must be finite and positive, got {0}")]
    Tau(f64),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Running sums of one arm's per-unit outcomes (one value per session or
/// user), enough for every test here and mergeable per batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ArmSums {
    pub n: u64,
    pub sum: f64,
    pub sum_sq: f64,
}

impl ArmSums {
    pub fn from_values(values: impl IntoIterator<Item = f64>) -> Self {
        let mut sums = Self::default();
        for x in values {
            sums.push(x);
        }
        sums
    }

    pub fn push(&mut self, x: f64) {
        self.n += 1;
        self.sum += x;
        self.sum_sq += x * x;
    }

    /// Adds another batch's sums.
    pub fn merge(&mut self, other: &ArmSums) {
        self.n += other.n;
        self.sum += other.sum;
        self.sum_sq += other.sum_sq;
    }

    /// The mean; `None` for an empty arm.
    pub fn mean(&self) -> Option<f64> {
        (self.n > 0).then(|| self.sum / self.n as f64)
    }

    /// The sample variance (denominator `n - 1`); `None` below two values.
    pub fn variance(&self) -> Option<f64> {
        if self.n < 2 {
            return None;
        }
        let n = self.n as f64;
        // clamped: sum_sq - sum^2/n can round below zero for constant data
        Some(((self.sum_sq - self.sum * self.sum / n) / (n - 1.0)).max(0.0))
    }
}

/// The mixing distribution's standard deviation `tau`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tau {
    /// In standard deviations of one observation (for two arms the pooled
    /// sample standard deviation; for the preference the sub-Gaussian 1/2).
    Sd(f64),
    /// In the metric's own units.
    Absolute(f64),
}

impl Tau {
    fn validate(self) -> Result<()> {
        let (Tau::Sd(t) | Tau::Absolute(t)) = self;
        if t.is_finite() && t > 0.0 {
            Ok(())
        } else {
            Err(Error::Tau(t))
        }
    }

    /// `tau^2` for observations with standard deviation `sd`.
    fn squared(self, sd: f64) -> f64 {
        match self {
            Tau::Sd(t) => (t * sd).powi(2),
            Tau::Absolute(t) => t * t,
        }
    }
}

/// Settings of the two-arm mSPRT.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MsprtConfig {
    pub tau: Tau,
    /// Units each arm needs before a verdict other than inconclusive: the
    /// variances are estimated, which the guarantee needs to be close.
    pub min_samples: u64,
}

impl Default for MsprtConfig {
    fn default() -> Self {
        Self {
            tau: Tau::Sd(0.05),
            min_samples: 100,
        }
    }
}

/// Settings of the interleaving preference's confidence sequence.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PreferenceConfig {
    pub tau: Tau,
    /// Decisive queries needed before a verdict other than inconclusive.
    /// The bound is valid from the first query, so 0 is safe; a floor only
    /// keeps a verdict from resting on a handful of people.
    pub min_decisive: u64,
}

impl Default for PreferenceConfig {
    fn default() -> Self {
        Self {
            tau: Tau::Sd(0.1),
            min_decisive: 0,
        }
    }
}

/// A closed interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Interval {
    pub lower: f64,
    pub upper: f64,
}

impl Interval {
    pub fn contains(&self, x: f64) -> bool {
        self.lower <= x && x <= self.upper
    }

    /// Empty when the running intersection of a confidence sequence has
    /// crossed over, which only happens when the model's assumptions fail.
    pub fn is_empty(&self) -> bool {
        self.lower > self.upper
    }
}

/// One look at a normal-mixture test of `estimate = theta0`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MixtureTest {
    /// The estimate (for two arms: candidate mean minus stable mean).
    pub estimate: f64,
    /// Its standard error, `sqrt(V)`.
    pub std_error: f64,
    /// `tau^2` of the mixing distribution, in the estimate's units squared.
    pub tau2: f64,
    /// `ln Lambda` against the null `theta0` (log scale: it stays finite).
    pub statistic: f64,
    /// `min(1, 1 / Lambda)` at this look; the always-valid p-value is the
    /// running minimum over looks (see [`Running`]).
    pub p_value: f64,
    /// The `1 - alpha` confidence sequence at this look.
    pub interval: Interval,
}

/// `ln Lambda` for an estimate `d` away from the null, variance `v`.
fn log_mixture_lr(d: f64, v: f64, tau2: f64) -> f64 {
    0.5 * (v / (v + tau2)).ln() + tau2 * d * d / (2.0 * v * (v + tau2))
}

/// Half-width of the confidence sequence: the `theta0` where
/// `ln Lambda(theta0) = ln(1/alpha)`.
fn half_width(v: f64, tau2: f64, alpha: f64) -> f64 {
    (v * (v + tau2) / tau2 * (2.0 * (1.0 / alpha).ln() + ((v + tau2) / v).ln())).sqrt()
}

fn mixture_test(estimate: f64, theta0: f64, v: f64, tau2: f64, alpha: f64) -> MixtureTest {
    let statistic = log_mixture_lr(estimate - theta0, v, tau2);
    let r = half_width(v, tau2, alpha);
    MixtureTest {
        estimate,
        std_error: v.sqrt(),
        tau2,
        statistic,
        p_value: (-statistic).exp().min(1.0),
        interval: Interval {
            lower: estimate - r,
            upper: estimate + r,
        },
    }
}

fn validate_alpha(alpha: f64) -> Result<()> {
    if alpha > 0.0 && alpha < 1.0 {
        Ok(())
    } else {
        Err(Error::Alpha(alpha))
    }
}

/// The mSPRT of `candidate - c * stable = 0` (`c = 1`: no difference; other
/// `c` tests a relative margin). `None` while an arm has under two values or
/// neither arm nor their pool shows any spread.
fn msprt_contrast(
    stable: &ArmSums,
    candidate: &ArmSums,
    c: f64,
    tau: Tau,
    alpha: f64,
) -> Option<MixtureTest> {
    let (mean_s, mean_c) = (stable.mean()?, candidate.mean()?);
    let (var_s, var_c) = (stable.variance()?, candidate.variance()?);
    let mut pooled = *stable;
    pooled.merge(candidate);
    let var_pooled = pooled.variance()?;
    let v = var_c.max(var_pooled) / candidate.n as f64
        + c * c * var_s.max(var_pooled) / stable.n as f64;
    let tau2 = tau.squared(var_pooled.sqrt());
    if !(v > 0.0 && tau2 > 0.0) {
        return None;
    }
    Some(mixture_test(mean_c - c * mean_s, 0.0, v, tau2, alpha))
}

/// The mSPRT for the difference of means, candidate minus stable, at this
/// look: `Lambda` against no difference, its p-value and the `1 - alpha`
/// confidence sequence for the difference.
pub fn msprt(
    stable: &ArmSums,
    candidate: &ArmSums,
    tau: Tau,
    alpha: f64,
) -> Result<Option<MixtureTest>> {
    tau.validate()?;
    validate_alpha(alpha)?;
    Ok(msprt_contrast(stable, candidate, 1.0, tau, alpha))
}

/// Per-query interleaving preferences, counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreferenceCounts {
    /// Every interleaved query, ties included.
    pub queries: u64,
    /// Queries whose clicks preferred the candidate (preference 1).
    pub candidate_wins: u64,
    /// Queries whose clicks preferred the stable version (preference -1).
    pub stable_wins: u64,
}

impl PreferenceCounts {
    /// Counts one query's preference: 1 candidate, -1 stable, 0 tie (any
    /// other value counts by its sign).
    pub fn push(&mut self, preference: i8) {
        self.queries += 1;
        match preference.signum() {
            1 => self.candidate_wins += 1,
            -1 => self.stable_wins += 1,
            _ => {}
        }
    }

    pub fn merge(&mut self, other: &PreferenceCounts) {
        self.queries += other.queries;
        self.candidate_wins += other.candidate_wins;
        self.stable_wins += other.stable_wins;
    }

    /// Queries with a preference either way.
    pub fn decisive(&self) -> u64 {
        self.candidate_wins + self.stable_wins
    }

    /// Mean preference over all queries, ties as 0; `None` before any.
    pub fn mean_preference(&self) -> Option<f64> {
        (self.queries > 0)
            .then(|| (self.candidate_wins as f64 - self.stable_wins as f64) / self.queries as f64)
    }
}

/// Confidence sequence for `p`, the candidate's win probability among
/// decisive queries, tested against `p0`; `None` before a decisive query.
fn preference_test_p(
    counts: &PreferenceCounts,
    p0: f64,
    tau: Tau,
    alpha: f64,
) -> Option<MixtureTest> {
    let decisive = counts.decisive();
    if decisive == 0 {
        return None;
    }
    let p_hat = counts.candidate_wins as f64 / decisive as f64;
    // a win indicator is 1/4-sub-Gaussian: sd 1/2, V = 1 / (4 D)
    let v = 0.25 / decisive as f64;
    Some(mixture_test(p_hat, p0, v, tau.squared(0.5), alpha))
}

/// Maps a test on `p` to the mean preference among decisive queries,
/// `2 p - 1`, the interval clipped to [-1, 1].
fn to_preference_scale(t: MixtureTest) -> MixtureTest {
    MixtureTest {
        estimate: 2.0 * t.estimate - 1.0,
        std_error: 2.0 * t.std_error,
        tau2: 4.0 * t.tau2,
        interval: Interval {
            lower: (2.0 * t.interval.lower - 1.0).max(-1.0),
            upper: (2.0 * t.interval.upper - 1.0).min(1.0),
        },
        ..t
    }
}

/// The interleaving preference at this look, on the scale of the mean
/// preference among decisive queries (`2 p - 1`, 0: none), tested against 0.
pub fn preference_test(
    counts: &PreferenceCounts,
    tau: Tau,
    alpha: f64,
) -> Result<Option<MixtureTest>> {
    tau.validate()?;
    validate_alpha(alpha)?;
    Ok(preference_test_p(counts, 0.5, tau, alpha).map(to_preference_scale))
}

/// The always-valid view of a sequence of looks: the running minimum of the
/// p-value and the running intersection of the confidence sequence.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Running {
    pub looks: u64,
    pub p_value: f64,
    pub interval: Option<Interval>,
}

impl Default for Running {
    fn default() -> Self {
        Self {
            looks: 0,
            p_value: 1.0,
            interval: None,
        }
    }
}

impl Running {
    pub fn observe(&mut self, test: &MixtureTest) {
        self.looks += 1;
        self.p_value = self.p_value.min(test.p_value);
        self.interval = Some(match self.interval {
            None => test.interval,
            Some(i) => Interval {
                lower: i.lower.max(test.interval.lower),
                upper: i.upper.min(test.interval.upper),
            },
        });
    }
}

/// Which way a metric improves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Click-through, reciprocal rank, ratings, preference.
    HigherIsBetter,
    /// Abandonment, error rate, latency.
    LowerIsBetter,
}

/// What a metric's verdict is judged against.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Criterion {
    pub better: Direction,
    /// Non-inferiority margin relative to the stable arm's mean: 0.02 means
    /// the candidate is acceptable when no more than 2% worse. Assumes a
    /// positive stable mean (rates, ratings, latencies).
    pub margin: f64,
    pub alpha: f64,
}

impl Criterion {
    fn validate(&self) -> Result<()> {
        validate_alpha(self.alpha)?;
        if self.margin.is_finite() && (0.0..1.0).contains(&self.margin) {
            Ok(())
        } else {
            Err(Error::Margin(self.margin))
        }
    }
}

/// A metric's classification.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    SignificantlyBetter,
    SignificantlyWorse,
    /// Not shown different, but shown no worse than the margin.
    NonInferior,
    /// Not enough evidence for anything yet.
    Inconclusive,
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Decision::SignificantlyBetter => "significantly better",
            Decision::SignificantlyWorse => "significantly worse",
            Decision::NonInferior => "non-inferior",
            Decision::Inconclusive => "inconclusive",
        })
    }
}

/// Which test produced a verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// Two-arm mSPRT, normal mixture (Johari et al.).
    Msprt,
    /// Interleaving preference, sub-Gaussian normal mixture (Howard et al.).
    PreferenceMixture,
}

/// The data a verdict rests on.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Samples {
    TwoArm {
        stable: u64,
        candidate: u64,
        stable_mean: Option<f64>,
        candidate_mean: Option<f64>,
    },
    Interleaved {
        queries: u64,
        candidate_wins: u64,
        stable_wins: u64,
    },
}

/// One metric's explained verdict at one look: the decision and every number
/// behind it. This is what explained canary decisions publish.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    pub decision: Decision,
    pub method: Method,
    pub better: Direction,
    pub alpha: f64,
    /// Candidate minus stable (two arms) or the mean preference among
    /// decisive queries (interleaving, positive: the candidate); `None`
    /// before there is data.
    pub estimate: Option<f64>,
    /// The `1 - alpha` confidence sequence for the estimate at this look.
    pub interval: Option<Interval>,
    /// `ln Lambda` against no difference.
    pub statistic: Option<f64>,
    /// `ln(1 / alpha)`: a difference is significant when the statistic
    /// reaches it.
    pub threshold: f64,
    /// `min(1, 1 / Lambda)` at this look.
    pub p_value: f64,
    /// The configured margin: relative to the stable mean for two arms, in
    /// preference units for interleaving.
    pub margin: f64,
    /// The margin in the estimate's units (two arms: `-margin * stable
    /// mean` when higher is better, `+` when lower is): the line
    /// non-inferiority is judged against.
    pub non_inferiority_bound: Option<f64>,
    /// `ln Lambda` against "worse by exactly the margin".
    pub non_inferiority_statistic: Option<f64>,
    /// Shown no worse than the margin (also true for significantly better).
    pub non_inferior: bool,
    /// False while below the configured minimum sample: the decision is
    /// then inconclusive whatever the numbers say.
    pub enough_data: bool,
    pub samples: Samples,
}

/// Rejection of `theta = null` in the direction `better` at level alpha.
fn shows(test: &MixtureTest, threshold: f64, better: Direction, above: bool) -> bool {
    let side = match (better, above) {
        (Direction::HigherIsBetter, true) | (Direction::LowerIsBetter, false) => 1.0,
        _ => -1.0,
    };
    test.statistic >= threshold && test.estimate * side > 0.0
}

fn classify(
    test: Option<&MixtureTest>,
    ni: Option<&MixtureTest>,
    threshold: f64,
    better: Direction,
    enough_data: bool,
) -> (Decision, bool) {
    let Some(test) = test.filter(|_| enough_data) else {
        return (Decision::Inconclusive, false);
    };
    // `ni` tests "worse by exactly the margin", so rejecting it towards
    // better means no worse than the margin
    let non_inferior = ni.is_some_and(|ni| shows(ni, threshold, better, true));
    let decision = if shows(test, threshold, better, true) {
        Decision::SignificantlyBetter
    } else if shows(test, threshold, better, false) {
        Decision::SignificantlyWorse
    } else if non_inferior {
        Decision::NonInferior
    } else {
        Decision::Inconclusive
    };
    (
        decision,
        non_inferior || decision == Decision::SignificantlyBetter,
    )
}

/// One metric's verdict from the two arms' running sums at this look.
///
/// Significance is the two-sided mSPRT of no difference. Non-inferiority is
/// the mSPRT of the contrast `candidate - (1 - margin) * stable` (higher is
/// better; `1 + margin` when lower is), so the margin is relative to the
/// stable arm's true mean rather than to its estimate; each is an
/// always-valid level-alpha test.
pub fn decide(
    stable: &ArmSums,
    candidate: &ArmSums,
    criterion: &Criterion,
    config: &MsprtConfig,
) -> Result<Verdict> {
    criterion.validate()?;
    config.tau.validate()?;
    let Criterion {
        better,
        margin,
        alpha,
    } = *criterion;
    let test = msprt_contrast(stable, candidate, 1.0, config.tau, alpha);
    let c = match better {
        Direction::HigherIsBetter => 1.0 - margin,
        Direction::LowerIsBetter => 1.0 + margin,
    };
    let ni = msprt_contrast(stable, candidate, c, config.tau, alpha);
    let threshold = (1.0 / alpha).ln();
    let enough_data = stable.n >= config.min_samples && candidate.n >= config.min_samples;
    let (decision, non_inferior) =
        classify(test.as_ref(), ni.as_ref(), threshold, better, enough_data);
    let estimate = stable.mean().zip(candidate.mean()).map(|(s, c)| c - s);
    let non_inferiority_bound = stable.mean().map(|s| match better {
        Direction::HigherIsBetter => -margin * s,
        Direction::LowerIsBetter => margin * s,
    });
    Ok(Verdict {
        decision,
        method: Method::Msprt,
        better,
        alpha,
        estimate,
        interval: test.map(|t| t.interval),
        statistic: test.map(|t| t.statistic),
        threshold,
        p_value: test.map_or(1.0, |t| t.p_value),
        margin,
        non_inferiority_bound,
        non_inferiority_statistic: ni.map(|t| t.statistic),
        non_inferior,
        enough_data,
        samples: Samples::TwoArm {
            stable: stable.n,
            candidate: candidate.n,
            stable_mean: stable.mean(),
            candidate_mean: candidate.mean(),
        },
    })
}

/// The interleaving preference's verdict at this look. `margin` is in
/// preference units (the mean preference among decisive queries may be as
/// low as `-margin` for non-inferiority); higher is better.
pub fn decide_preference(
    counts: &PreferenceCounts,
    margin: f64,
    alpha: f64,
    config: &PreferenceConfig,
) -> Result<Verdict> {
    Criterion {
        better: Direction::HigherIsBetter,
        margin,
        alpha,
    }
    .validate()?;
    config.tau.validate()?;
    let test = preference_test_p(counts, 0.5, config.tau, alpha).map(to_preference_scale);
    // mean preference -margin is p = (1 - margin) / 2
    let ni = preference_test_p(counts, (1.0 - margin) / 2.0, config.tau, alpha);
    let threshold = (1.0 / alpha).ln();
    let enough_data = counts.decisive() >= config.min_decisive;
    let better = Direction::HigherIsBetter;
    // the null of `ni` is p0, not 0: compare the estimate to it through the
    // sign `shows` reads
    let ni = ni.map(|t| MixtureTest {
        estimate: t.estimate - (1.0 - margin) / 2.0,
        ..t
    });
    let (decision, non_inferior) =
        classify(test.as_ref(), ni.as_ref(), threshold, better, enough_data);
    Ok(Verdict {
        decision,
        method: Method::PreferenceMixture,
        better,
        alpha,
        estimate: test.map(|t| t.estimate),
        interval: test.map(|t| t.interval),
        statistic: test.map(|t| t.statistic),
        threshold,
        p_value: test.map_or(1.0, |t| t.p_value),
        margin,
        non_inferiority_bound: Some(-margin),
        non_inferiority_statistic: ni.map(|t| t.statistic),
        non_inferior,
        enough_data,
        samples: Samples::Interleaved {
            queries: counts.queries,
            candidate_wins: counts.candidate_wins,
            stable_wins: counts.stable_wins,
        },
    })
}

impl fmt::Display for Verdict {
    /// One line for logs and the CLI, e.g. `significantly better: +1.0000
    /// [+0.6204, +1.3796], ln LR 21.99 >= 3.00 (p 2.8e-10, alpha 0.05), margin
    /// -0.0300; n stable 400 / candidate 400`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.decision)?;
        if !self.enough_data {
            write!(f, " (below the minimum sample)")?;
        }
        if let (Some(e), Some(i), Some(s)) = (self.estimate, self.interval, self.statistic) {
            let cmp = if s >= self.threshold { ">=" } else { "<" };
            let p = if self.p_value < 1e-3 {
                format!("{:.1e}", self.p_value)
            } else {
                format!("{:.3}", self.p_value)
            };
            write!(
                f,
                ": {e:+.4} [{:+.4}, {:+.4}], ln LR {s:.2} {cmp} {:.2} (p {p}, alpha {})",
                i.lower, i.upper, self.threshold, self.alpha
            )?;
        }
        if let Some(b) = self.non_inferiority_bound {
            write!(f, ", margin {b:+.4}")?;
        }
        match self.samples {
            Samples::TwoArm {
                stable, candidate, ..
            } => write!(f, "; n stable {stable} / candidate {candidate}"),
            Samples::Interleaved {
                queries,
                candidate_wins,
                stable_wins,
            } => write!(
                f,
                "; {queries} queries, candidate won {candidate_wins}, stable won {stable_wins}"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    const LN_20: f64 = 2.995_732_273_553_991; // ln(1 / 0.05)

    fn close(actual: f64, expected: f64, tol: f64) {
        assert!(
            (actual - expected).abs() <= tol,
            "{actual} is not within {tol} of {expected}"
        );
    }

    fn criterion(better: Direction, margin: f64) -> Criterion {
        Criterion {
            better,
            margin,
            alpha: 0.05,
        }
    }

    #[test]
    fn arm_sums_mean_variance_and_merge() {
        let mut a = ArmSums::from_values([1.0, 2.0]);
        a.merge(&ArmSums::from_values([3.0, 4.0]));
        assert_eq!(a, ArmSums::from_values([1.0, 2.0, 3.0, 4.0]));
        // mean 10 / 4; variance (30 - 10^2 / 4) / 3 = 5 / 3
        assert_eq!(a.mean(), Some(2.5));
        close(a.variance().unwrap(), 5.0 / 3.0, 1e-12);
        assert_eq!(ArmSums::default().mean(), None);
        assert_eq!(ArmSums::from_values([7.0]).variance(), None);
        assert_eq!(ArmSums::from_values([0.1; 3]).variance(), Some(0.0));
    }

    #[test]
    fn msprt_by_hand_with_each_arms_own_variance() {
        // stable [0, 4]: mean 2, s^2 = (16 - 16/2) / 1 = 8
        // candidate [1, 5]: mean 3, s^2 = (26 - 36/2) / 1 = 8
        // pooled [0, 4, 1, 5]: (42 - 100/4) / 3 = 17/3 < 8, so no floor
        // V = 8/2 + 8/2 = 8, d = 1, tau^2 = 1
        // ln Lambda = 0.5 ln(8/9) + 1 * 1 / (2 * 8 * 9)
        //           = -0.0588915 + 0.0069444 = -0.0519471
        // r = sqrt(8 * 9 / 1 * (2 ln 20 + ln(9/8)))
        //   = sqrt(72 * (5.9914645 + 0.1177830)) = sqrt(439.8658) = 20.972978
        let stable = ArmSums::from_values([0.0, 4.0]);
        let candidate = ArmSums::from_values([1.0, 5.0]);
        let t = msprt(&stable, &candidate, Tau::Absolute(1.0), 0.05)
            .unwrap()
            .unwrap();
        close(t.estimate, 1.0, 1e-12);
        close(t.std_error, 8f64.sqrt(), 1e-12);
        close(t.statistic, -0.051_947_073_4, 1e-9);
        assert_eq!(t.p_value, 1.0, "Lambda < 1 caps the p-value at 1");
        close(t.interval.lower, 1.0 - 20.972_978_47, 1e-7);
        close(t.interval.upper, 1.0 + 20.972_978_47, 1e-7);
    }

    #[test]
    fn msprt_by_hand_with_the_pooled_variance_floor() {
        // stable [1, 2, 3, 4]: mean 2.5, s^2 = 5/3
        // candidate [3, 4, 5, 6]: mean 4.5, s^2 = (86 - 18^2/4) / 3 = 5/3
        // pooled: n 8, sum 28, sum_sq 116: s^2 = (116 - 28^2/8) / 7 = 18/7,
        // above both, so each arm uses 18/7: V = 18/7 * (1/4 + 1/4) = 9/7
        // d = 2, tau^2 = 1, V + tau^2 = 16/7
        // ln Lambda = 0.5 ln(9/16) + 4 / (2 * 9/7 * 16/7)
        //           = -0.2876821 + 196/288 = -0.2876821 + 0.6805556 = 0.3928735
        // Lambda = 0.75 * e^0.6805556 = 1.4812309, p = 1 / 1.4812309 = 0.6751
        // r = sqrt(9/7 * 16/7 / 1 * (5.9914645 + ln(16/9)))
        //   = sqrt(2.9387755 * 6.5668294) = 4.3929984
        let stable = ArmSums::from_values([1.0, 2.0, 3.0, 4.0]);
        let candidate = ArmSums::from_values([3.0, 4.0, 5.0, 6.0]);
        let t = msprt(&stable, &candidate, Tau::Absolute(1.0), 0.05)
            .unwrap()
            .unwrap();
        close(t.std_error.powi(2), 9.0 / 7.0, 1e-12);
        close(t.statistic, 0.392_873_483_1, 1e-9);
        close(t.p_value, 1.0 / 1.481_230_976_7, 1e-9);
        close(t.interval.lower, 2.0 - 4.392_998_445, 1e-8);
    }

    #[test]
    fn msprt_by_hand_for_click_through_with_tau_in_sds() {
        // clicks per session, 100 sessions per arm
        // stable 30 clicks: s^2 = (30 - 30^2/100) / 99 = 21/99 = 0.2121212
        // candidate 45: s^2 = (45 - 45^2/100) / 99 = 24.75/99 = 0.25
        // pooled 75 of 200: s^2 = (75 - 75^2/200) / 199 = 46.875/199 = 0.2355528
        // stable floored to 0.2355528; V = (0.2355528 + 0.25) / 100 = 0.0048555
        // tau = 0.1 sd: tau^2 = 0.01 * 0.2355528 = 0.0023555
        // ln Lambda = 0.5 ln(0.0048555 / 0.0072111)
        //             + 0.0023555 * 0.15^2 / (2 * 0.0048555 * 0.0072111)
        //           = -0.1977786 + 0.7568723 = 0.5590937 < ln 20: inconclusive
        // non-inferiority at margin 0.1: contrast 0.45 - 0.9 * 0.30 = 0.18,
        // V = 0.25/100 + 0.81 * 0.2355528/100 = 0.0044080, ln Lambda = 1.0658845
        let stable = ArmSums {
            n: 100,
            sum: 30.0,
            sum_sq: 30.0,
        };
        let candidate = ArmSums {
            n: 100,
            sum: 45.0,
            sum_sq: 45.0,
        };
        let config = MsprtConfig {
            tau: Tau::Sd(0.1),
            min_samples: 100,
        };
        let t = msprt(&stable, &candidate, config.tau, 0.05)
            .unwrap()
            .unwrap();
        close(t.std_error.powi(2), 0.004_855_527_638, 1e-12);
        close(t.tau2, 0.002_355_527_638, 1e-12);
        close(t.statistic, 0.559_093_666_1, 1e-9);
        close(t.interval.upper - t.estimate, 0.308_120_571_1, 1e-9);
        let v = decide(
            &stable,
            &candidate,
            &criterion(Direction::HigherIsBetter, 0.1),
            &config,
        )
        .unwrap();
        assert_eq!(v.decision, Decision::Inconclusive);
        close(v.non_inferiority_statistic.unwrap(), 1.065_884_514_1, 1e-9);
        close(v.non_inferiority_bound.unwrap(), -0.03, 1e-12);
        assert!(v.enough_data && !v.non_inferior);
        assert_eq!(v.threshold, LN_20);
    }

    #[test]
    fn an_arm_without_spread_borrows_the_pooled_variance() {
        // an error-rate guardrail: stable 0 errors in 100, candidate 100 in
        // 100; neither arm has spread, the pool does: (100 - 100^2/200) / 199
        // = 50/199 = 0.2512563, V = 0.2512563 * 2/100 = 0.0050251
        // tau^2 = 0.25, d = 1:
        // ln Lambda = 0.5 ln(0.0050251 / 0.2550251) + 0.25 / (2 * 0.0050251 * 0.2550251)
        //           = -1.9634910 + 97.5394441 = 95.5759531
        let stable = ArmSums::from_values([0.0; 100]);
        let candidate = ArmSums::from_values([1.0; 100]);
        let config = MsprtConfig {
            tau: Tau::Absolute(0.5),
            min_samples: 100,
        };
        let v = decide(
            &stable,
            &candidate,
            &criterion(Direction::LowerIsBetter, 0.1),
            &config,
        )
        .unwrap();
        close(v.statistic.unwrap(), 95.575_953_058, 1e-6);
        assert_eq!(v.decision, Decision::SignificantlyWorse);
        assert!(!v.non_inferior);
        assert_eq!(v.p_value, (-v.statistic.unwrap()).exp());
        close(v.interval.unwrap().lower, 1.0 - 0.225_483_740_3, 1e-9);
    }

    #[test]
    fn no_spread_anywhere_and_too_little_data_are_inconclusive() {
        let config = MsprtConfig::default();
        let c = criterion(Direction::HigherIsBetter, 0.02);
        let flat = ArmSums::from_values([1.0; 500]);
        let v = decide(&flat, &flat, &c, &config).unwrap();
        assert_eq!(v.decision, Decision::Inconclusive);
        assert_eq!((v.estimate, v.interval, v.p_value), (Some(0.0), None, 1.0));

        // a difference that would be significant, on 99 sessions a side
        let stable = ArmSums::from_values((0..99).map(|i| (i % 2) as f64));
        let candidate = ArmSums::from_values((0..99).map(|i| (i % 2) as f64 + 5.0));
        let v = decide(&stable, &candidate, &c, &config).unwrap();
        assert!(v.statistic.unwrap() > v.threshold);
        assert_eq!(v.decision, Decision::Inconclusive);
        assert!(!v.enough_data);
        let empty = decide(&ArmSums::default(), &candidate, &c, &config).unwrap();
        assert_eq!((empty.estimate, empty.statistic), (None, None));
    }

    #[test]
    fn decisions_follow_the_direction_that_is_better() {
        let config = MsprtConfig::default();
        let stable = ArmSums::from_values((0..400).map(|i| (i % 4) as f64));
        let higher = ArmSums::from_values((0..400).map(|i| (i % 4) as f64 + 1.0));
        let up = criterion(Direction::HigherIsBetter, 0.02);
        let down = criterion(Direction::LowerIsBetter, 0.02);
        let v = decide(&stable, &higher, &up, &config).unwrap();
        assert_eq!(v.decision, Decision::SignificantlyBetter);
        assert!(v.non_inferior);
        let v = decide(&stable, &higher, &down, &config).unwrap();
        assert_eq!(v.decision, Decision::SignificantlyWorse);
        let v = decide(&higher, &stable, &down, &config).unwrap();
        assert_eq!(v.decision, Decision::SignificantlyBetter);
        // identical arms, large margin: shown no worse than 50% of the mean
        let v = decide(
            &stable,
            &stable,
            &criterion(Direction::LowerIsBetter, 0.5),
            &config,
        );
        assert_eq!(v.unwrap().decision, Decision::NonInferior);
    }

    #[test]
    fn preference_by_hand() {
        // 100 queries: candidate won 30, stable 10, 60 ties: D = 40,
        // p = 30/40 = 0.75, V = 1/(4 * 40) = 0.00625, tau = 0.1 in p
        // (0.2 sds of 1/2): tau^2 = 0.01, V + tau^2 = 0.01625
        // ln Lambda(p0 = 1/2) = 0.5 ln(0.00625/0.01625) + 0.01 * 0.25^2 / (2 * 0.00625 * 0.01625)
        //                     = -0.4777557 + 3.0769231 = 2.5991674 < ln 20
        // p-value e^-2.5991674 = 0.0743354
        // r = sqrt(0.00625 * 0.01625 / 0.01 * (5.9914645 + ln 2.6)) = 0.2656223
        // p in [0.4843777, 1.0156223], mean preference 2p - 1 in [-0.0312447, 1]
        // margin 0.1: p0 = 0.45, ln Lambda = -0.4777557 + 0.01 * 0.3^2 / 0.000203125
        //           = -0.4777557 + 4.4307692 = 3.9530135 >= ln 20: non-inferior
        let mut counts = PreferenceCounts::default();
        for p in [1i8; 30].into_iter().chain([-1; 10]).chain([0; 60]) {
            counts.push(p);
        }
        assert_eq!(counts.decisive(), 40);
        assert_eq!(counts.mean_preference(), Some(0.2));
        let t = preference_test(&counts, Tau::Absolute(0.1), 0.05)
            .unwrap()
            .unwrap();
        close(t.estimate, 0.5, 1e-12);
        close(t.statistic, 2.599_167_354_4, 1e-9);
        close(t.p_value, 0.074_335_447_5, 1e-9);
        close(t.interval.lower, -0.031_244_670_3, 1e-9);
        assert_eq!(t.interval.upper, 1.0);
        let config = PreferenceConfig {
            tau: Tau::Sd(0.2),
            min_decisive: 0,
        };
        let v = decide_preference(&counts, 0.1, 0.05, &config).unwrap();
        assert_eq!(v.statistic, Some(t.statistic));
        close(v.non_inferiority_statistic.unwrap(), 3.953_013_508_3, 1e-9);
        assert_eq!(v.decision, Decision::NonInferior);
        let v = decide_preference(&counts, 0.0, 0.05, &config).unwrap();
        assert_eq!(v.decision, Decision::Inconclusive);

        // candidate 40, stable 10: D = 50, p = 0.8, V = 0.005, V + tau^2 = 0.015
        // ln Lambda = 0.5 ln(1/3) + 0.01 * 0.09 / (2 * 0.005 * 0.015)
        //           = -0.5493061 + 6 = 5.4506939 >= ln 20
        // r = sqrt(0.005 * 0.015 / 0.01 * (5.9914645 + ln 3)) = 0.2305983,
        // lower 2 * (0.8 - 0.2305983) - 1 = 0.1388034
        let counts = PreferenceCounts {
            queries: 50,
            candidate_wins: 40,
            stable_wins: 10,
        };
        let v = decide_preference(&counts, 0.0, 0.05, &config).unwrap();
        close(v.statistic.unwrap(), 5.450_693_855_7, 1e-9);
        close(v.interval.unwrap().lower, 0.138_803_398_7, 1e-9);
        assert_eq!(v.decision, Decision::SignificantlyBetter);
        let flipped = PreferenceCounts {
            queries: 50,
            candidate_wins: 10,
            stable_wins: 40,
        };
        let v = decide_preference(&flipped, 0.1, 0.05, &config).unwrap();
        assert_eq!(v.decision, Decision::SignificantlyWorse);
        assert!(!v.non_inferior);
        let none = decide_preference(&PreferenceCounts::default(), 0.1, 0.05, &config).unwrap();
        assert_eq!(
            (none.decision, none.estimate),
            (Decision::Inconclusive, None)
        );
    }

    #[test]
    fn invalid_parameters_are_refused() {
        let a = ArmSums::from_values([0.0, 1.0]);
        assert_eq!(msprt(&a, &a, Tau::Sd(0.1), 0.0), Err(Error::Alpha(0.0)));
        assert_eq!(msprt(&a, &a, Tau::Sd(-1.0), 0.05), Err(Error::Tau(-1.0)));
        let c = criterion(Direction::HigherIsBetter, 1.0);
        let config = MsprtConfig::default();
        assert_eq!(decide(&a, &a, &c, &config), Err(Error::Margin(1.0)));
        let config = PreferenceConfig::default();
        let counts = PreferenceCounts::default();
        assert!(decide_preference(&counts, 0.1, 1.5, &config).is_err());
    }

    #[test]
    fn running_keeps_the_minimum_p_and_the_intersection() {
        let mut running = Running::default();
        let look = |estimate, p_value, lower, upper| MixtureTest {
            estimate,
            std_error: 1.0,
            tau2: 1.0,
            statistic: -f64::ln(p_value),
            p_value,
            interval: Interval { lower, upper },
        };
        running.observe(&look(0.5, 0.2, -1.0, 2.0));
        running.observe(&look(0.1, 0.6, -0.5, 2.5));
        assert_eq!(running.looks, 2);
        assert_eq!(running.p_value, 0.2);
        assert_eq!(
            running.interval,
            Some(Interval {
                lower: -0.5,
                upper: 2.0
            })
        );
        assert!(!running.interval.unwrap().is_empty());
    }

    #[test]
    fn a_verdict_serialises_and_explains_itself() {
        let stable = ArmSums::from_values((0..400).map(|i| (i % 4) as f64));
        let candidate = ArmSums::from_values((0..400).map(|i| (i % 4) as f64 + 1.0));
        let c = criterion(Direction::HigherIsBetter, 0.02);
        let v = decide(&stable, &candidate, &c, &MsprtConfig::default()).unwrap();
        let json = serde_json::to_value(v).unwrap();
        assert_eq!(json["decision"], "significantly_better");
        assert_eq!(json["samples"]["kind"], "two_arm");
        assert_eq!(json["samples"]["candidate"], 400);
        let back: Verdict = serde_json::from_value(json).unwrap();
        assert_eq!(back, v);
        assert_eq!(
            v.to_string(),
            "significantly better: +1.0000 [+0.6204, +1.3796], ln LR 21.99 >= 3.00 \
             (p 2.8e-10, alpha 0.05), margin -0.0300; n stable 400 / candidate 400"
        );
        let config: MsprtConfig =
            serde_json::from_str(r#"{"tau": {"sd": 0.1}, "min_samples": 50}"#).unwrap();
        assert_eq!(config.tau, Tau::Sd(0.1));
        assert_eq!(
            serde_json::from_str::<PreferenceConfig>("{}").unwrap(),
            PreferenceConfig::default()
        );
        assert!(serde_json::from_str::<MsprtConfig>(r#"{"tua": 1}"#).is_err());
    }

    /// An A/A (or A/B) experiment with peeking: users arrive in batches, each
    /// joins the candidate with probability `share`, and the verdict is
    /// computed after every batch. Returns the first decisive verdict's
    /// decision of each run (`Inconclusive` or `NonInferior` if none).
    fn simulate(
        seed: u64,
        runs: usize,
        batches: usize,
        batch: usize,
        share: f64,
        criterion: &Criterion,
        draw: impl FnMut(&mut StdRng, bool) -> f64,
    ) -> Vec<Decision> {
        simulate_with_naive(seed, runs, batches, batch, share, criterion, draw)
            .into_iter()
            .map(|(decision, _)| decision)
            .collect()
    }

    /// [`simulate`], also saying per run whether a fixed-horizon z-test at
    /// 1.96 (what peeking must not be done with) rejected at any look.
    fn simulate_with_naive(
        seed: u64,
        runs: usize,
        batches: usize,
        batch: usize,
        share: f64,
        criterion: &Criterion,
        mut draw: impl FnMut(&mut StdRng, bool) -> f64,
    ) -> Vec<(Decision, bool)> {
        let mut rng = StdRng::seed_from_u64(seed);
        let config = MsprtConfig::default();
        (0..runs)
            .map(|_| {
                let (mut stable, mut candidate) = (ArmSums::default(), ArmSums::default());
                let mut last = Decision::Inconclusive;
                let mut naive = false;
                for _ in 0..batches {
                    for _ in 0..batch {
                        let is_candidate = rng.random_bool(share);
                        let x = draw(&mut rng, is_candidate);
                        if is_candidate {
                            candidate.push(x);
                        } else {
                            stable.push(x);
                        }
                    }
                    if let (Some(vs), Some(vc)) = (stable.variance(), candidate.variance()) {
                        let se = (vs / stable.n as f64 + vc / candidate.n as f64).sqrt();
                        let d = candidate.mean().unwrap() - stable.mean().unwrap();
                        naive |= se > 0.0 && (d / se).abs() > 1.96;
                    }
                    if !SIGNIFICANT.contains(&last) {
                        last = decide(&stable, &candidate, criterion, &config)
                            .unwrap()
                            .decision;
                    }
                }
                (last, naive)
            })
            .collect()
    }

    fn rate(decisions: &[Decision], which: &[Decision]) -> f64 {
        decisions.iter().filter(|d| which.contains(d)).count() as f64 / decisions.len() as f64
    }

    const SIGNIFICANT: [Decision; 2] =
        [Decision::SignificantlyBetter, Decision::SignificantlyWorse];

    #[test]
    fn a_a_with_peeking_after_every_batch_stays_within_alpha() {
        // 1,000 A/A runs of a click-through metric (p = 0.3) with a 10%
        // canary, 40 looks of 250 users (10,000 users, ~1,000 in the canary)
        let c = criterion(Direction::HigherIsBetter, 0.05);
        let runs = simulate_with_naive(24, 1_000, 40, 250, 0.1, &c, |rng, _| {
            f64::from(u8::from(rng.random_bool(0.3)))
        });
        let decisions: Vec<Decision> = runs.iter().map(|r| r.0).collect();
        let false_rate = rate(&decisions, &SIGNIFICANT);
        let naive_rate = runs.iter().filter(|r| r.1).count() as f64 / runs.len() as f64;
        println!(
            "A/A click-through: false decisions {false_rate} at alpha 0.05 \
             (a z-test at 1.96 peeked at as often: {naive_rate})"
        );
        assert!(false_rate <= c.alpha, "false-decision rate {false_rate}");
        // the simulation can see the harm of peeking: the fixed-horizon test
        // looked at 40 times is wrong far more often than its 5%
        assert!(naive_rate > 2.0 * c.alpha, "naive rate {naive_rate}");
    }

    #[test]
    fn a_a_on_a_skewed_metric_and_a_rare_guardrail_stays_within_alpha() {
        // reciprocal rank of the first click: no click 60%, else 1/rank with
        // a geometric rank; an even split, 400 runs of 30 looks of 100 users
        let c = criterion(Direction::HigherIsBetter, 0.05);
        let decisions = simulate(25, 400, 30, 100, 0.5, &c, |rng, _| {
            if rng.random_bool(0.6) {
                return 0.0;
            }
            let mut rank = 1.0;
            while rng.random_bool(0.5) {
                rank += 1.0;
            }
            1.0 / rank
        });
        let rr_rate = rate(&decisions, &SIGNIFICANT);
        // a 1% error rate on a 5% canary: the candidate often shows no error
        // at all early on, which the pooled-variance floor must not trust
        let g = criterion(Direction::LowerIsBetter, 0.5);
        let decisions = simulate(26, 400, 30, 200, 0.05, &g, |rng, _| {
            f64::from(u8::from(rng.random_bool(0.01)))
        });
        let guard_rate = rate(&decisions, &SIGNIFICANT);
        println!("A/A reciprocal rank {rr_rate}, rare guardrail {guard_rate} at alpha 0.05");
        assert!(rr_rate <= 0.05 && guard_rate <= 0.05);
    }

    #[test]
    fn a_real_difference_is_detected() {
        // click-through 0.30 -> 0.33 (10% relative), even split, 20 looks of
        // 1,000 users: detected as better in at least 80% of 200 runs, never
        // as worse; the mirror image 0.30 -> 0.27 as worse
        let c = criterion(Direction::HigherIsBetter, 0.02);
        let better = simulate(27, 200, 20, 1_000, 0.5, &c, |rng, cand| {
            f64::from(u8::from(rng.random_bool(if cand { 0.33 } else { 0.30 })))
        });
        let worse = simulate(28, 200, 20, 1_000, 0.5, &c, |rng, cand| {
            f64::from(u8::from(rng.random_bool(if cand { 0.27 } else { 0.30 })))
        });
        let power_better = rate(&better, &[Decision::SignificantlyBetter]);
        let power_worse = rate(&worse, &[Decision::SignificantlyWorse]);
        println!("power: better {power_better}, worse {power_worse}");
        assert!(power_better >= 0.8 && power_worse >= 0.8);
        assert_eq!(rate(&better, &[Decision::SignificantlyWorse]), 0.0);
        assert_eq!(rate(&worse, &[Decision::SignificantlyBetter]), 0.0);
    }

    /// Per-query preferences with peeking after every batch: 60% ties, and
    /// among decisive queries the candidate wins with probability `p_win`.
    fn simulate_preference(seed: u64, runs: usize, p_win: f64) -> Vec<Decision> {
        let mut rng = StdRng::seed_from_u64(seed);
        let config = PreferenceConfig::default();
        (0..runs)
            .map(|_| {
                let mut counts = PreferenceCounts::default();
                let mut last = Decision::Inconclusive;
                for _ in 0..40 {
                    for _ in 0..50 {
                        counts.push(match (rng.random_bool(0.4), rng.random_bool(p_win)) {
                            (false, _) => 0,
                            (true, true) => 1,
                            (true, false) => -1,
                        });
                    }
                    last = decide_preference(&counts, 0.05, 0.05, &config)
                        .unwrap()
                        .decision;
                    if SIGNIFICANT.contains(&last) {
                        break;
                    }
                }
                last
            })
            .collect()
    }

    #[test]
    fn preference_a_a_stays_within_alpha_and_a_preference_is_detected() {
        // 1,000 A/A runs of 40 looks at 50 queries (2,000 queries, ~800
        // decisive); then a candidate winning 60% of decisive queries
        let aa = rate(&simulate_preference(29, 1_000, 0.5), &SIGNIFICANT);
        let power = rate(
            &simulate_preference(30, 200, 0.6),
            &[Decision::SignificantlyBetter],
        );
        println!("preference: A/A false decisions {aa} at alpha 0.05, power {power}");
        assert!(aa <= 0.05, "false-decision rate {aa}");
        assert!(power >= 0.8, "power {power}");
    }
}
