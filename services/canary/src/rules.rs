//! The decision rule: from one look's evidence to advance, promote, roll
//! back or hold. Pure, so every branch is tested without a database.
//!
//! In order:
//! 1. **Roll back** on any guardrail significantly worse than the stable
//!    version (error rate, dropped impressions, the LMM's relevance
//!    verdict, p99 latency beyond its allowed ratio).
//! 2. **Roll back** on a significant loss in any acting signal: the
//!    primary A/B metric, the interleaving preference, the LMM's aesthetic
//!    verdict. Secondary A/B metrics are reported, not acted on (acting on
//!    each would multiply the false rollbacks).
//! 3. At the budget (time or candidate sessions) undecided: the configured
//!    default (roll back unless configured to promote).
//! 4. **Hold** until the step has lasted its minimum time.
//! 5. Below the top step, **advance** when some acting signal shows the
//!    candidate non-inferior (or better) with enough data; at the top step
//!    **promote** when one shows it significantly better (or, configured
//!    `non-inferior`, no worse than the margin).
//! 6. Otherwise **hold**: too little traffic is never a decision.

use std::time::Duration;

use kalon_events::{CanaryAction, EvidenceKind, MetricEvidence};

use crate::config::{AtBudget, PromoteWhen};

/// The rule's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Rules {
    pub top_step: u32,
    pub min_step: Duration,
    pub budget: Duration,
    /// 0: no limit.
    pub budget_sessions: u64,
    pub at_budget: AtBudget,
    pub promote_when: PromoteWhen,
}

/// One look.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Look {
    /// Every figure, as published.
    pub evidence: Vec<MetricEvidence>,
    /// The metrics that may move the canary (the primary A/B metric,
    /// `interleaving`, `lmm_aesthetic`), by name.
    pub acting: Vec<String>,
    pub candidate_sessions: u64,
    pub step: u32,
    pub at_step: Duration,
    pub elapsed: Duration,
}

fn is(e: &MetricEvidence, decision: &str) -> bool {
    e.enough_data && e.decision == decision
}

fn describe(e: &MetricEvidence) -> String {
    let estimate = e.estimate.map_or("n/a".into(), |x| format!("{x:+.4}"));
    let interval = match (e.lower, e.upper) {
        (Some(l), Some(u)) => format!(" [{l:+.4}, {u:+.4}]"),
        _ => String::new(),
    };
    format!(
        "{} {} {estimate}{interval} (p {:.3}, n {}/{})",
        e.metric,
        e.decision.replace('_', " "),
        e.p_value,
        e.n_stable,
        e.n_candidate
    )
}

/// The action and why, in words.
pub fn decide(rules: &Rules, look: &Look) -> (CanaryAction, String) {
    let guards = look.evidence.iter().filter(|e| {
        e.kind == EvidenceKind::Guardrail
            || (e.kind == EvidenceKind::Lmm && e.metric == "lmm_relevance")
    });
    let breaches: Vec<String> = guards
        .filter(|e| is(e, "significantly_worse"))
        .map(describe)
        .collect();
    if !breaches.is_empty() {
        return (
            CanaryAction::Rollback,
            format!("guardrail breached: {}", breaches.join("; ")),
        );
    }
    let acting: Vec<&MetricEvidence> = look
        .evidence
        .iter()
        .filter(|e| look.acting.contains(&e.metric))
        .collect();
    let losses: Vec<String> = acting
        .iter()
        .filter(|e| is(e, "significantly_worse"))
        .map(|e| describe(e))
        .collect();
    if !losses.is_empty() {
        return (
            CanaryAction::Rollback,
            format!("significant loss: {}", losses.join("; ")),
        );
    }
    let over_sessions =
        rules.budget_sessions > 0 && look.candidate_sessions >= rules.budget_sessions;
    if look.elapsed >= rules.budget || over_sessions {
        let spent = if over_sessions {
            format!("{} candidate sessions", look.candidate_sessions)
        } else {
            format!("{} s", look.elapsed.as_secs())
        };
        let action = match rules.at_budget {
            AtBudget::Rollback => CanaryAction::Rollback,
            AtBudget::Promote => CanaryAction::Promote,
        };
        return (
            action,
            format!("budget spent ({spent}) without a decision: the configured default"),
        );
    }
    if look.at_step < rules.min_step {
        return (
            CanaryAction::Hold,
            format!(
                "step {} has run {} s of its minimum {} s",
                look.step,
                look.at_step.as_secs(),
                rules.min_step.as_secs()
            ),
        );
    }
    let non_inferior: Vec<&&MetricEvidence> = acting
        .iter()
        .filter(|e| is(e, "non_inferior") || is(e, "significantly_better"))
        .collect();
    let better: Vec<&&MetricEvidence> = acting
        .iter()
        .filter(|e| is(e, "significantly_better"))
        .collect();
    if look.step < rules.top_step {
        if let Some(e) = non_inferior.first() {
            return (
                CanaryAction::Advance,
                format!("no worse than the stable version: {}", describe(e)),
            );
        }
    } else {
        let shown = match rules.promote_when {
            PromoteWhen::Significant => better.first(),
            PromoteWhen::NonInferior => better.first().or(non_inferior.first()),
        };
        if let Some(e) = shown {
            return (
                CanaryAction::Promote,
                format!("at the top step: {}", describe(e)),
            );
        }
    }
    let waiting: Vec<String> = acting.iter().map(|e| describe(e)).collect();
    (
        CanaryAction::Hold,
        if waiting.is_empty() {
            "no evidence yet".to_owned()
        } else {
            format!("not enough evidence yet: {}", waiting.join("; "))
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metric(name: &str, kind: EvidenceKind, decision: &str) -> MetricEvidence {
        MetricEvidence {
            metric: name.into(),
            kind,
            decision: decision.into(),
            estimate: Some(0.01),
            lower: Some(-0.01),
            upper: Some(0.03),
            statistic: Some(1.0),
            threshold: 3.0,
            p_value: 0.4,
            alpha: 0.05,
            margin: 0.05,
            n_stable: 1000,
            n_candidate: 100,
            stable_mean: Some(0.4),
            candidate_mean: Some(0.41),
            enough_data: true,
        }
    }

    fn rules() -> Rules {
        Rules {
            top_step: 3,
            min_step: Duration::from_secs(60),
            budget: Duration::from_secs(3600),
            budget_sessions: 0,
            at_budget: AtBudget::Rollback,
            promote_when: PromoteWhen::Significant,
        }
    }

    fn look(step: u32, evidence: Vec<MetricEvidence>) -> Look {
        Look {
            evidence,
            acting: vec!["ctr".into(), "interleaving".into(), "lmm_aesthetic".into()],
            candidate_sessions: 100,
            step,
            at_step: Duration::from_secs(120),
            elapsed: Duration::from_secs(600),
        }
    }

    #[test]
    fn a_guardrail_breach_rolls_back_whatever_else_says() {
        let (action, reason) = decide(
            &rules(),
            &look(
                1,
                vec![
                    metric("ctr", EvidenceKind::Ab, "significantly_better"),
                    metric("error_rate", EvidenceKind::Guardrail, "significantly_worse"),
                ],
            ),
        );
        assert_eq!(action, CanaryAction::Rollback);
        assert!(reason.contains("error_rate"), "{reason}");
        let lmm = metric("lmm_relevance", EvidenceKind::Lmm, "significantly_worse");
        assert_eq!(
            decide(&rules(), &look(0, vec![lmm])).0,
            CanaryAction::Rollback
        );
    }

    #[test]
    fn a_significant_loss_in_an_acting_signal_rolls_back_a_secondary_one_does_not() {
        let loss = metric(
            "interleaving",
            EvidenceKind::Interleaving,
            "significantly_worse",
        );
        assert_eq!(
            decide(&rules(), &look(0, vec![loss])).0,
            CanaryAction::Rollback
        );
        let secondary = metric("rating", EvidenceKind::Ab, "significantly_worse");
        assert_eq!(
            decide(&rules(), &look(0, vec![secondary])).0,
            CanaryAction::Hold
        );
    }

    #[test]
    fn too_little_data_holds_never_decides() {
        let mut thin = metric("ctr", EvidenceKind::Ab, "significantly_worse");
        thin.enough_data = false;
        let (action, reason) = decide(&rules(), &look(3, vec![thin]));
        assert_eq!(action, CanaryAction::Hold);
        assert!(reason.contains("not enough evidence"), "{reason}");
        assert_eq!(decide(&rules(), &look(0, vec![])).0, CanaryAction::Hold);
    }

    #[test]
    fn advance_needs_the_minimum_time_and_non_inferiority() {
        let ok = metric("ctr", EvidenceKind::Ab, "non_inferior");
        let mut early = look(1, vec![ok.clone()]);
        early.at_step = Duration::from_secs(10);
        assert_eq!(decide(&rules(), &early).0, CanaryAction::Hold);
        assert_eq!(
            decide(&rules(), &look(1, vec![ok.clone()])).0,
            CanaryAction::Advance
        );
        // at the top step non-inferior is not enough when significance is asked for
        assert_eq!(
            decide(&rules(), &look(3, vec![ok.clone()])).0,
            CanaryAction::Hold
        );
        let lenient = Rules {
            promote_when: PromoteWhen::NonInferior,
            ..rules()
        };
        assert_eq!(
            decide(&lenient, &look(3, vec![ok])).0,
            CanaryAction::Promote
        );
        let better = metric(
            "interleaving",
            EvidenceKind::Interleaving,
            "significantly_better",
        );
        let (action, reason) = decide(&rules(), &look(3, vec![better]));
        assert_eq!(action, CanaryAction::Promote);
        assert!(reason.contains("interleaving"), "{reason}");
    }

    #[test]
    fn the_budget_ends_in_the_configured_default() {
        let mut spent = look(2, vec![metric("ctr", EvidenceKind::Ab, "inconclusive")]);
        spent.elapsed = Duration::from_secs(3600);
        assert_eq!(decide(&rules(), &spent).0, CanaryAction::Rollback);
        let promote = Rules {
            at_budget: AtBudget::Promote,
            ..rules()
        };
        assert_eq!(decide(&promote, &spent).0, CanaryAction::Promote);
        let sessions = Rules {
            budget_sessions: 50,
            ..rules()
        };
        assert_eq!(
            decide(&sessions, &look(0, vec![])).0,
            CanaryAction::Rollback,
            "100 candidate sessions spend a budget of 50"
        );
    }
}
