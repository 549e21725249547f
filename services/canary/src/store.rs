//! The controller's state in Postgres: one `canaries` row per candidate,
//! every decision in `canary_decisions` (also the outbox of
//! `canary.decision.v1`). A decision and the canary's new state are written
//! in one transaction, and what a decision implies for the deployments is
//! applied afterwards by [`crate::rollout::reconcile`], idempotently: a
//! controller killed anywhere resumes from the stored state, never
//! deciding or applying a step twice.

use chrono::{DateTime, Utc};
use kalon_events::{CanaryAction, CanaryDecision, MetricEvidence};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use uuid::Uuid;

/// Where a canary is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Registered with a passed gate; waits for its turn (and its index).
    Waiting,
    Running,
    /// Frozen at its step by an operator.
    Paused,
    Promoted,
    RolledBack,
    Superseded,
}

impl Status {
    pub const ALL: [Status; 6] = [
        Status::Waiting,
        Status::Running,
        Status::Paused,
        Status::Promoted,
        Status::RolledBack,
        Status::Superseded,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Waiting => "waiting",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Promoted => "promoted",
            Status::RolledBack => "rolled_back",
            Status::Superseded => "superseded",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        Self::ALL.into_iter().find(|x| x.as_str() == s)
    }

    pub fn in_flight(self) -> bool {
        matches!(self, Status::Running | Status::Paused)
    }

    pub fn finished(self) -> bool {
        matches!(
            self,
            Status::Promoted | Status::RolledBack | Status::Superseded
        )
    }
}

/// One `canaries` row.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Canary {
    pub id: i64,
    pub candidate: String,
    pub stable: Option<String>,
    pub status: Status,
    pub step: u32,
    pub step_started_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub note: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

type CanaryTuple = (
    i64,
    String,
    Option<String>,
    String,
    i32,
    Option<DateTime<Utc>>,
    Option<DateTime<Utc>>,
    Option<DateTime<Utc>>,
    Option<String>,
    DateTime<Utc>,
    DateTime<Utc>,
);

const CANARY_COLUMNS: &str = "id, candidate, stable, status, step, step_started_at, started_at, \
     finished_at, note, created_at, updated_at";

fn canary(row: CanaryTuple) -> Canary {
    let (id, candidate, stable, status, step, step_started_at, started_at, finished_at, note, c, u) =
        row;
    Canary {
        id,
        candidate,
        stable,
        status: Status::parse(&status).unwrap_or(Status::Waiting),
        step: step.max(0) as u32,
        step_started_at,
        started_at,
        finished_at,
        note,
        created_at: c,
        updated_at: u,
    }
}

async fn canaries_where(
    pool: &PgPool,
    filter: &str,
    arg: Option<&str>,
) -> sqlx::Result<Vec<Canary>> {
    let sql = format!("SELECT {CANARY_COLUMNS} FROM canaries {filter}");
    let mut query = sqlx::query_as::<_, CanaryTuple>(&sql);
    if let Some(arg) = arg {
        query = query.bind(arg);
    }
    Ok(query
        .fetch_all(pool)
        .await?
        .into_iter()
        .map(canary)
        .collect())
}

/// Queues a candidate (a registered version whose gate passed). Returns
/// whether it is new: a re-delivered registration queues nothing.
pub async fn enqueue(pool: &PgPool, candidate: &str) -> sqlx::Result<bool> {
    let done = sqlx::query(
        "INSERT INTO canaries (candidate) SELECT $1
         WHERE EXISTS (SELECT 1 FROM model_versions WHERE version = $1)
         ON CONFLICT (candidate) DO NOTHING",
    )
    .bind(candidate)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() > 0)
}

/// The canary in flight (running or paused), if any.
pub async fn in_flight(pool: &PgPool) -> sqlx::Result<Option<Canary>> {
    Ok(
        canaries_where(pool, "WHERE status IN ('running', 'paused')", None)
            .await?
            .pop(),
    )
}

/// Waiting candidates, oldest first.
pub async fn waiting(pool: &PgPool) -> sqlx::Result<Vec<Canary>> {
    canaries_where(pool, "WHERE status = 'waiting' ORDER BY id", None).await
}

pub async fn by_candidate(pool: &PgPool, candidate: &str) -> sqlx::Result<Option<Canary>> {
    Ok(
        canaries_where(pool, "WHERE candidate = $1", Some(candidate))
            .await?
            .pop(),
    )
}

/// Finished canaries whose end is not yet applied (a crash, or a failed
/// apply), oldest first.
pub async fn unsettled(pool: &PgPool) -> sqlx::Result<Vec<Canary>> {
    canaries_where(
        pool,
        "WHERE status IN ('promoted', 'rolled_back', 'superseded') AND settled_at IS NULL ORDER BY id",
        None,
    )
    .await
}

/// Records that a finished canary's end is applied. True the first time
/// (false when it was already settled).
pub async fn settle(pool: &PgPool, id: i64) -> sqlx::Result<bool> {
    let settled =
        sqlx::query("UPDATE canaries SET settled_at = now() WHERE id = $1 AND settled_at IS NULL")
            .bind(id)
            .execute(pool)
            .await?;
    Ok(settled.rows_affected() > 0)
}

/// The latest canaries, newest first.
pub async fn recent(pool: &PgPool, limit: i64) -> sqlx::Result<Vec<Canary>> {
    canaries_where(
        pool,
        &format!("ORDER BY id DESC LIMIT {}", limit.max(1)),
        None,
    )
    .await
}

/// Why a waiting canary does not start (shown by status).
pub async fn set_note(pool: &PgPool, id: i64, note: Option<&str>) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE canaries SET note = $2, updated_at = now()
         WHERE id = $1 AND note IS DISTINCT FROM $2",
    )
    .bind(id)
    .bind(note)
    .execute(pool)
    .await?;
    Ok(())
}

/// One `canary_decisions` row.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DecisionRow {
    pub id: i64,
    pub event_id: Uuid,
    pub canary_id: i64,
    pub candidate: String,
    pub stable: Option<String>,
    pub action: CanaryAction,
    pub step_from: u32,
    pub step_to: u32,
    pub share: f64,
    pub automatic: bool,
    pub actor: String,
    pub reason: String,
    pub evidence: Vec<MetricEvidence>,
    pub at: DateTime<Utc>,
    pub published_at: Option<DateTime<Utc>>,
}

impl DecisionRow {
    /// Its `canary.decision.v1` event (the same on every re-publication).
    pub fn event(&self) -> CanaryDecision {
        CanaryDecision {
            event_id: self.event_id,
            occurred_at: self.at,
            canary_id: self.canary_id,
            candidate: self.candidate.clone(),
            stable: self.stable.clone(),
            action: self.action,
            step_from: self.step_from,
            step_to: self.step_to,
            share: self.share,
            automatic: self.automatic,
            actor: self.actor.clone(),
            reason: self.reason.clone(),
            evidence: self.evidence.clone(),
        }
    }
}

type DecisionTuple = (
    i64,
    Uuid,
    i64,
    String,
    Option<String>,
    String,
    i32,
    i32,
    f64,
    bool,
    String,
    String,
    serde_json::Value,
    DateTime<Utc>,
    Option<DateTime<Utc>>,
);

const DECISION_COLUMNS: &str = "id, event_id, canary_id, candidate, stable, action, step_from, \
     step_to, share, automatic, actor, reason, evidence, at, published_at";

fn decision(row: DecisionTuple) -> DecisionRow {
    let (id, event_id, canary_id, candidate, stable, action, from, to, share, automatic, actor) = (
        row.0, row.1, row.2, row.3, row.4, row.5, row.6, row.7, row.8, row.9, row.10,
    );
    DecisionRow {
        id,
        event_id,
        canary_id,
        candidate,
        stable,
        action: CanaryAction::parse(&action).unwrap_or(CanaryAction::Hold),
        step_from: from.max(0) as u32,
        step_to: to.max(0) as u32,
        share,
        automatic,
        actor,
        reason: row.11,
        // written by this module from the typed evidence
        evidence: serde_json::from_value(row.12).unwrap_or_default(),
        at: row.13,
        published_at: row.14,
    }
}

/// A canary's decisions, oldest first (`hold`s included unless `moves_only`).
pub async fn decisions(
    pool: &PgPool,
    canary_id: i64,
    moves_only: bool,
) -> sqlx::Result<Vec<DecisionRow>> {
    let filter = if moves_only {
        "AND action <> 'hold'"
    } else {
        ""
    };
    let sql = format!(
        "SELECT {DECISION_COLUMNS} FROM canary_decisions WHERE canary_id = $1 {filter} ORDER BY id"
    );
    Ok(sqlx::query_as::<_, DecisionTuple>(&sql)
        .bind(canary_id)
        .fetch_all(pool)
        .await?
        .into_iter()
        .map(decision)
        .collect())
}

/// The latest decision of a canary.
pub async fn last_decision(pool: &PgPool, canary_id: i64) -> sqlx::Result<Option<DecisionRow>> {
    let sql = format!(
        "SELECT {DECISION_COLUMNS} FROM canary_decisions WHERE canary_id = $1 ORDER BY id DESC LIMIT 1"
    );
    Ok(sqlx::query_as::<_, DecisionTuple>(&sql)
        .bind(canary_id)
        .fetch_optional(pool)
        .await?
        .map(decision))
}

/// Decisions not yet on the topic, oldest first.
pub async fn unpublished(pool: &PgPool, limit: i64) -> sqlx::Result<Vec<DecisionRow>> {
    let sql = format!(
        "SELECT {DECISION_COLUMNS} FROM canary_decisions WHERE published_at IS NULL
         ORDER BY id LIMIT $1"
    );
    Ok(sqlx::query_as::<_, DecisionTuple>(&sql)
        .bind(limit)
        .fetch_all(pool)
        .await?
        .into_iter()
        .map(decision)
        .collect())
}

pub async fn mark_published(pool: &PgPool, ids: &[i64]) -> sqlx::Result<()> {
    sqlx::query("UPDATE canary_decisions SET published_at = now() WHERE id = ANY($1)")
        .bind(ids)
        .execute(pool)
        .await?;
    Ok(())
}

/// A decision about to be taken.
#[derive(Debug, Clone, PartialEq)]
pub struct NewDecision {
    pub action: CanaryAction,
    pub step_to: u32,
    pub share: f64,
    pub automatic: bool,
    pub actor: String,
    pub reason: String,
    pub evidence: Vec<MetricEvidence>,
}

/// The canary's status once `action` is taken from `from`, or why it cannot
/// be taken.
pub fn next_status(from: Status, action: CanaryAction) -> Result<Status, String> {
    use CanaryAction as A;
    let to = match (from, action) {
        (Status::Waiting, A::Start) => Status::Running,
        (Status::Running, A::Hold | A::Advance) => Status::Running,
        (Status::Running | Status::Paused, A::Promote) => Status::Promoted,
        (Status::Running | Status::Paused, A::Rollback) => Status::RolledBack,
        (Status::Running | Status::Paused, A::Supersede) => Status::Superseded,
        (Status::Running, A::Pause) => Status::Paused,
        (Status::Paused, A::Resume) => Status::Running,
        (from, action) => {
            return Err(format!(
                "a {} canary cannot {}",
                from.as_str().replace('_', " "),
                action.as_str()
            ))
        }
    };
    Ok(to)
}

/// Why a decision was not written.
#[derive(Debug, thiserror::Error)]
pub enum DecideError {
    #[error(transparent)]
    Db(#[from] sqlx::Error),
    /// The canary moved on since it was read (another decision, an
    /// operator): nothing was written.
    #[error("the canary changed since it was read: {0}")]
    Stale(String),
    #[error("{0}")]
    Refused(String),
}

/// Writes `decision` for `seen` and moves the canary, in one transaction,
/// only if the canary is still as `seen` (status and step): a decision is
/// taken against the state it was computed from, once.
pub async fn decide(
    pool: &PgPool,
    seen: &Canary,
    stable: Option<&str>,
    decision: &NewDecision,
) -> Result<DecisionRow, DecideError> {
    let to = next_status(seen.status, decision.action).map_err(DecideError::Refused)?;
    let mut tx = pool.begin().await?;
    let now: (String, i32) =
        sqlx::query_as("SELECT status, step FROM canaries WHERE id = $1 FOR UPDATE")
            .bind(seen.id)
            .fetch_one(&mut *tx)
            .await?;
    if now != (seen.status.as_str().to_owned(), seen.step as i32) {
        return Err(DecideError::Stale(format!(
            "it is {} at step {}",
            now.0, now.1
        )));
    }
    let evidence = serde_json::to_value(&decision.evidence).expect("evidence serializes");
    let sql = format!(
        "INSERT INTO canary_decisions (event_id, canary_id, candidate, stable, action, step_from,
             step_to, share, automatic, actor, reason, evidence)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
         ON CONFLICT DO NOTHING
         RETURNING {DECISION_COLUMNS}"
    );
    let row: Option<DecisionTuple> = sqlx::query_as(&sql)
        .bind(Uuid::now_v7())
        .bind(seen.id)
        .bind(&seen.candidate)
        .bind(stable)
        .bind(decision.action.as_str())
        .bind(seen.step as i32)
        .bind(decision.step_to as i32)
        .bind(decision.share)
        .bind(decision.automatic)
        .bind(&decision.actor)
        .bind(&decision.reason)
        .bind(evidence)
        .fetch_optional(&mut *tx)
        .await?;
    let Some(row) = row else {
        return Err(DecideError::Stale(format!(
            "{} to step {} was already decided",
            decision.action.as_str(),
            decision.step_to
        )));
    };
    let step_changed = decision.step_to != seen.step || decision.action == CanaryAction::Resume;
    sqlx::query(
        "UPDATE canaries SET status = $2, step = $3, stable = coalesce($4, stable),
             step_started_at = CASE WHEN $5 OR step_started_at IS NULL THEN now() ELSE step_started_at END,
             started_at = coalesce(started_at, CASE WHEN $2 = 'running' THEN now() END),
             finished_at = CASE WHEN $2 IN ('promoted', 'rolled_back', 'superseded') THEN now() END,
             note = NULL, updated_at = now()
         WHERE id = $1",
    )
    .bind(seen.id)
    .bind(to.as_str())
    .bind(decision.step_to as i32)
    .bind(stable)
    .bind(step_changed)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(decision_row(row))
}

fn decision_row(row: DecisionTuple) -> DecisionRow {
    decision(row)
}

/// The counts behind `kalonctl canary status`: decisions by action.
pub async fn action_counts(pool: &PgPool, canary_id: i64) -> sqlx::Result<Vec<(String, i64)>> {
    sqlx::query_as(
        "SELECT action, count(*) FROM canary_decisions WHERE canary_id = $1
         GROUP BY action ORDER BY action",
    )
    .bind(canary_id)
    .fetch_all(pool)
    .await
}
