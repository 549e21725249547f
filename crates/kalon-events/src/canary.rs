//! `canary.decision.v1`: every decision of the canary controller (or of an
//! operator overriding it), with the figures behind it.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::event::{rfc3339, strict_uuid, text};
use crate::payload::{name, TopicPayload};
use crate::topics::CANARY_DECISION_TOPIC;

/// What a decision does to the canary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CanaryAction {
    /// The candidate gets its first step of traffic.
    Start,
    /// Not enough evidence yet: the step stays.
    Hold,
    /// The candidate moves to the next step of the ladder.
    Advance,
    /// The candidate becomes the stable version and takes all traffic.
    Promote,
    /// The candidate's traffic goes to zero; it is marked rolled back.
    Rollback,
    /// An operator froze the canary at its step.
    Pause,
    Resume,
    /// A newer candidate replaced this one before it finished.
    Supersede,
}

impl CanaryAction {
    pub const ALL: [CanaryAction; 8] = [
        CanaryAction::Start,
        CanaryAction::Hold,
        CanaryAction::Advance,
        CanaryAction::Promote,
        CanaryAction::Rollback,
        CanaryAction::Pause,
        CanaryAction::Resume,
        CanaryAction::Supersede,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CanaryAction::Start => "start",
            CanaryAction::Hold => "hold",
            CanaryAction::Advance => "advance",
            CanaryAction::Promote => "promote",
            CanaryAction::Rollback => "rollback",
            CanaryAction::Pause => "pause",
            CanaryAction::Resume => "resume",
            CanaryAction::Supersede => "supersede",
        }
    }

    pub fn parse(s: &str) -> Option<CanaryAction> {
        Self::ALL.into_iter().find(|a| a.as_str() == s)
    }
}

/// Which kind of evidence a figure is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EvidenceKind {
    /// A user-level outcome compared between the arms (session as unit).
    Ab,
    /// Error rate, latency, dropped impressions: relative to the stable arm.
    Guardrail,
    /// Team-draft interleaving: clicks credited per query.
    Interleaving,
    /// The order-consistent LMM judge on both versions' top-k rows.
    Lmm,
}

/// One metric's figures at the decision: what it was compared with and how.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricEvidence {
    /// e.g. `ctr`, `reciprocal_rank`, `error_rate`, `interleaving`,
    /// `lmm_aesthetic`.
    pub metric: String,
    pub kind: EvidenceKind,
    /// `significantly_better`, `significantly_worse`, `non_inferior` or
    /// `inconclusive`.
    pub decision: String,
    /// Candidate minus stable, or the mean preference for the candidate.
    #[serde(default)]
    pub estimate: Option<f64>,
    /// The anytime-valid `1 - alpha` interval of the estimate.
    #[serde(default)]
    pub lower: Option<f64>,
    #[serde(default)]
    pub upper: Option<f64>,
    /// The test statistic (`ln` likelihood ratio; a ratio for p99 latency).
    #[serde(default)]
    pub statistic: Option<f64>,
    /// What the statistic is compared with.
    pub threshold: f64,
    pub p_value: f64,
    pub alpha: f64,
    /// The configured margin (relative to the stable mean for two arms).
    pub margin: f64,
    /// Units: sessions (A/B), queries (interleaving, LMM), requests
    /// (guardrails).
    pub n_stable: u64,
    pub n_candidate: u64,
    #[serde(default)]
    pub stable_mean: Option<f64>,
    #[serde(default)]
    pub candidate_mean: Option<f64>,
    /// False while below the minimum sample: never decided from noise.
    pub enough_data: bool,
}

/// `canary.decision.v1`, keyed by the candidate version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CanaryDecision {
    #[serde(with = "strict_uuid")]
    pub event_id: Uuid,
    #[serde(with = "rfc3339")]
    pub occurred_at: DateTime<Utc>,
    pub canary_id: i64,
    pub candidate: String,
    #[serde(default)]
    pub stable: Option<String>,
    pub action: CanaryAction,
    /// Ladder step before and after (0-based).
    pub step_from: u32,
    pub step_to: u32,
    /// The candidate's share of traffic after the decision, in [0, 1].
    pub share: f64,
    /// False for an operator's override.
    pub automatic: bool,
    /// `kalon-canary` or the operator who acted.
    pub actor: String,
    pub reason: String,
    pub evidence: Vec<MetricEvidence>,
}

impl TopicPayload for CanaryDecision {
    const TOPIC: &'static str = CANARY_DECISION_TOPIC;

    fn validate(&self) -> Result<(), String> {
        name("candidate", &self.candidate)?;
        if let Some(stable) = &self.stable {
            name("stable", stable)?;
        }
        if self.canary_id < 1 {
            return Err(format!("canary_id {} is not positive", self.canary_id));
        }
        if !(0.0..=1.0).contains(&self.share) {
            return Err(format!("share {} is not in [0, 1]", self.share));
        }
        text("actor", &self.actor, 128)?;
        text("reason", &self.reason, 4096)?;
        if self.evidence.len() > 64 {
            return Err(format!(
                "{} evidence items, at most 64",
                self.evidence.len()
            ));
        }
        for e in &self.evidence {
            text("evidence[].metric", &e.metric, 64)?;
            if !matches!(
                e.decision.as_str(),
                "significantly_better" | "significantly_worse" | "non_inferior" | "inconclusive"
            ) {
                return Err(format!("evidence[].decision {:?} is unknown", e.decision));
            }
            let finite = [e.threshold, e.p_value, e.alpha, e.margin]
                .into_iter()
                .chain(
                    [e.estimate, e.lower, e.upper, e.statistic]
                        .into_iter()
                        .flatten(),
                )
                .chain([e.stable_mean, e.candidate_mean].into_iter().flatten())
                .all(f64::is_finite);
            if !finite {
                return Err(format!("evidence {:?} holds a non-finite number", e.metric));
            }
        }
        Ok(())
    }
}
