//! What operators do to a canary, shared by the admin API and `kalonctl
//! canary`: read its status and history, and override it (promote, roll
//! back, pause, resume), each override a decision recorded with who and why.

use kalon_events::CanaryAction;
use serde::Serialize;
use sqlx::PgPool;

use crate::store::{self, Canary, DecisionRow, NewDecision, Status};

/// A canary with its decisions.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub canary: Canary,
    /// The candidate's share of traffic now.
    pub share: f64,
    pub last: Option<DecisionRow>,
    pub decisions: Vec<DecisionRow>,
}

/// The in-flight canary, else the latest one, with its moves (holds left
/// out but the latest decision, hold or not, in `last`).
pub async fn status(pool: &PgPool) -> sqlx::Result<Option<Report>> {
    let canary = match store::in_flight(pool).await? {
        Some(c) => Some(c),
        None => store::recent(pool, 1).await?.pop(),
    };
    match canary {
        Some(canary) => Ok(Some(report(pool, canary, false).await?)),
        None => Ok(None),
    }
}

/// The latest `limit` canaries, newest first, with their decisions.
pub async fn history(pool: &PgPool, limit: i64, holds: bool) -> sqlx::Result<Vec<Report>> {
    let mut out = Vec::new();
    for canary in store::recent(pool, limit).await? {
        out.push(report(pool, canary, holds).await?);
    }
    Ok(out)
}

async fn report(pool: &PgPool, canary: Canary, holds: bool) -> sqlx::Result<Report> {
    let decisions = store::decisions(pool, canary.id, !holds).await?;
    let last = store::last_decision(pool, canary.id).await?;
    let share = match canary.status {
        Status::Waiting => 0.0,
        _ => last.as_ref().map_or(0.0, |d| d.share),
    };
    Ok(Report {
        canary,
        share,
        last,
        decisions,
    })
}

/// Why an override was refused.
#[derive(Debug, thiserror::Error)]
pub enum OverrideError {
    #[error("no canary is in flight")]
    NoCanary,
    #[error("the canary in flight is {running}, not {asked}")]
    OtherCandidate { running: String, asked: String },
    #[error("{0}")]
    Refused(String),
    #[error("{0} is not an operator's action (promote, rollback, pause, resume)")]
    NotAnOverride(&'static str),
    #[error("give a reason (who acts and why is recorded)")]
    NoReason,
    #[error("give an actor (who acts and why is recorded)")]
    NoActor,
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// An operator's override of the in-flight canary (`candidate`, when given,
/// must be it). Returns the decision stored; the controller applies it.
pub async fn override_canary(
    pool: &PgPool,
    action: CanaryAction,
    candidate: Option<&str>,
    actor: &str,
    reason: &str,
) -> Result<DecisionRow, OverrideError> {
    if !matches!(
        action,
        CanaryAction::Promote | CanaryAction::Rollback | CanaryAction::Pause | CanaryAction::Resume
    ) {
        return Err(OverrideError::NotAnOverride(action.as_str()));
    }
    let (actor, reason) = (actor.trim(), reason.trim());
    if actor.is_empty() || actor.chars().count() > 128 {
        return Err(OverrideError::NoActor);
    }
    if reason.is_empty() || reason.chars().count() > 4000 {
        return Err(OverrideError::NoReason);
    }
    let canary = store::in_flight(pool)
        .await?
        .ok_or(OverrideError::NoCanary)?;
    if let Some(asked) = candidate {
        if asked != canary.candidate {
            return Err(OverrideError::OtherCandidate {
                running: canary.candidate,
                asked: asked.to_owned(),
            });
        }
    }
    let share = match action {
        CanaryAction::Promote => 1.0,
        CanaryAction::Rollback => 0.0,
        _ => store::last_decision(pool, canary.id)
            .await?
            .map_or(0.0, |d| d.share),
    };
    let decision = NewDecision {
        action,
        step_to: canary.step,
        share,
        automatic: false,
        actor: actor.to_owned(),
        reason: format!("manual {}: {reason}", action.as_str()),
        evidence: Vec::new(),
    };
    match store::decide(pool, &canary, canary.stable.as_deref(), &decision).await {
        Ok(row) => Ok(row),
        Err(store::DecideError::Db(e)) => Err(OverrideError::Db(e)),
        Err(store::DecideError::Stale(why) | store::DecideError::Refused(why)) => {
            Err(OverrideError::Refused(why))
        }
    }
}

/// One decision's figures as aligned lines (`kalonctl canary status`).
pub fn render_evidence(decision: &DecisionRow) -> String {
    let mut out = String::new();
    for e in &decision.evidence {
        let estimate = e
            .estimate
            .map_or("      n/a".into(), |x| format!("{x:+9.4}"));
        let interval = match (e.lower, e.upper) {
            (Some(l), Some(u)) => format!("[{l:+.4}, {u:+.4}]"),
            _ => "-".into(),
        };
        let statistic = e.statistic.map_or("-".into(), |s| format!("{s:.2}"));
        out.push_str(&format!(
            "  {:<20} {:<12} {:<21} {estimate} {:<20} stat {:>6} vs {:<6.2} p {:<7.3} n {}/{}{}\n",
            e.metric,
            format!("{:?}", e.kind).to_lowercase(),
            e.decision,
            interval,
            statistic,
            e.threshold,
            e.p_value,
            e.n_stable,
            e.n_candidate,
            if e.enough_data {
                ""
            } else {
                " (below the minimum sample)"
            },
        ));
    }
    out
}

/// A report as text: the canary, its latest decision with the figures
/// behind it, then its moves.
pub fn render(report: &Report) -> String {
    let c = &report.canary;
    let mut out = format!(
        "canary {}: {} against {}: {} at step {} ({:.1}% of traffic)\n",
        c.id,
        c.candidate,
        c.stable.as_deref().unwrap_or("(no stable yet)"),
        c.status.as_str().replace('_', " "),
        c.step,
        report.share * 100.0,
    );
    if let Some(note) = &c.note {
        out.push_str(&format!("note: {note}\n"));
    }
    if let Some(last) = &report.last {
        out.push_str(&format!(
            "last decision: {} at {} by {}{}: {}\n",
            last.action.as_str(),
            last.at.format("%Y-%m-%d %H:%M:%S UTC"),
            last.actor,
            if last.automatic { "" } else { " (manual)" },
            last.reason
        ));
        out.push_str(&render_evidence(last));
    }
    if !report.decisions.is_empty() {
        out.push_str("decisions:\n");
        for d in &report.decisions {
            out.push_str(&format!(
                "  {} {:<9} step {} -> {} share {:>5.1}% {}{}: {}\n",
                d.at.format("%Y-%m-%d %H:%M:%S"),
                d.action.as_str(),
                d.step_from,
                d.step_to,
                d.share * 100.0,
                d.actor,
                if d.automatic { "" } else { " (manual)" },
                d.reason
            ));
        }
    }
    out
}
