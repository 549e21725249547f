//! A model version's lifecycle: the states it passes through, the one table
//! of legal moves between them, and the only code that changes
//! `model_versions.state` (every change also writes a `model_transitions`
//! row: who, why, and the figures behind it).
//!
//! ```text
//! trained      -> gated_passed | gated_failed
//! gated_passed -> indexed | retired
//! gated_failed -> retired
//! indexed      -> canary | promoted (a person, without a canary) | retired
//! canary       -> promoted | rolled_back
//! promoted     -> retired
//! rolled_back  -> retired
//! ```
//!
//! A person's `kalonctl index` enters a version as `indexed`; the trainer's
//! enter as `trained` ([`register_trained`]). At most one version is
//! `promoted`: moving a version there retires the one before it in the same
//! transaction (and a unique index enforces it).

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::postgres::{PgArgumentBuffer, PgTypeInfo, PgValueRef};
use sqlx::{PgConnection, PgPool, Postgres};
use uuid::Uuid;

use crate::artifact::StoredArtifact;
use crate::store::{self, ModelVersion};

/// Where a model version is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// The trainer made it; its offline gate has not run yet.
    Trained,
    /// The offline gate passed; it may be indexed.
    GatedPassed,
    /// The offline gate failed; it is never offered to traffic.
    GatedFailed,
    /// Its catalog embeddings are in Postgres; it may be deployed.
    Indexed,
    /// It takes a share of live traffic under evaluation.
    Canary,
    /// The version in charge (at most one).
    Promoted,
    /// Its canary lost; it takes no more traffic.
    RolledBack,
    /// Out of service for good.
    Retired,
}

/// `to` is a legal next state of `from` exactly when the pair is listed.
const LEGAL: &[(State, State)] = &[
    (State::Trained, State::GatedPassed),
    (State::Trained, State::GatedFailed),
    (State::GatedPassed, State::Indexed),
    (State::GatedPassed, State::Retired),
    (State::GatedFailed, State::Retired),
    (State::Indexed, State::Canary),
    // a person promoting without a canary (the first model, say)
    (State::Indexed, State::Promoted),
    (State::Indexed, State::Retired),
    (State::Canary, State::Promoted),
    (State::Canary, State::RolledBack),
    (State::Promoted, State::Retired),
    (State::RolledBack, State::Retired),
];

/// Whether a version in `from` may move to `to`.
pub fn can_go(from: State, to: State) -> bool {
    LEGAL.contains(&(from, to))
}

impl State {
    pub const ALL: [State; 8] = [
        State::Trained,
        State::GatedPassed,
        State::GatedFailed,
        State::Indexed,
        State::Canary,
        State::Promoted,
        State::RolledBack,
        State::Retired,
    ];

    /// The name the `state` column holds.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Trained => "trained",
            State::GatedPassed => "gated_passed",
            State::GatedFailed => "gated_failed",
            State::Indexed => "indexed",
            State::Canary => "canary",
            State::Promoted => "promoted",
            State::RolledBack => "rolled_back",
            State::Retired => "retired",
        }
    }

    pub fn parse(name: &str) -> Result<State, UnknownState> {
        State::ALL
            .into_iter()
            .find(|s| s.as_str() == name)
            .ok_or_else(|| UnknownState(name.to_owned()))
    }

    /// The states this one may move to, in [`State::ALL`] order.
    pub fn next(self) -> Vec<State> {
        State::ALL
            .into_iter()
            .filter(|to| can_go(self, *to))
            .collect()
    }

    /// Whether a version in this state may be given traffic
    /// (`store::set_deployment` refuses the others).
    pub fn may_serve(self) -> bool {
        !matches!(
            self,
            State::Trained | State::GatedFailed | State::RolledBack | State::Retired
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown model version state {0:?}")]
pub struct UnknownState(pub String);

impl FromStr for State {
    type Err = UnknownState;
    fn from_str(s: &str) -> Result<State, UnknownState> {
        State::parse(s)
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// the column is text: a state reads and writes as its name
impl sqlx::Type<Postgres> for State {
    fn type_info() -> PgTypeInfo {
        <&str as sqlx::Type<Postgres>>::type_info()
    }
    fn compatible(ty: &PgTypeInfo) -> bool {
        <&str as sqlx::Type<Postgres>>::compatible(ty)
    }
}

impl<'r> sqlx::Decode<'r, Postgres> for State {
    fn decode(value: PgValueRef<'r>) -> Result<Self, sqlx::error::BoxDynError> {
        let name = <&str as sqlx::Decode<Postgres>>::decode(value)?;
        Ok(State::parse(name)?)
    }
}

impl sqlx::Encode<'_, Postgres> for State {
    fn encode_by_ref(
        &self,
        buf: &mut PgArgumentBuffer,
    ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
        <&str as sqlx::Encode<Postgres>>::encode(self.as_str(), buf)
    }
}

/// One row of `model_transitions`.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct Transition {
    pub id: i64,
    pub model_version: String,
    /// `None` for the row that created the version.
    pub from_state: Option<State>,
    pub to_state: State,
    pub actor: String,
    pub reason: String,
    /// The figures behind the move (a gate's, a canary's); `{}` if none.
    pub evidence: serde_json::Value,
    pub at: DateTime<Utc>,
}

fn names(states: &[State]) -> String {
    if states.is_empty() {
        return "nothing (a final state)".into();
    }
    states
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    #[error(transparent)]
    Db(#[from] sqlx::Error),
    #[error("model version {0} is not registered")]
    Unknown(String),
    #[error("model version {version} cannot go from {from} to {to}; from {from} it may go to {}", names(.legal))]
    Illegal {
        version: String,
        from: State,
        to: State,
        legal: Vec<State>,
    },
    #[error("a transition of {0} needs an actor (who or what moves it)")]
    NoActor(String),
    #[error("a transition of {0} needs a reason")]
    NoReason(String),
    #[error("{what} already exists ({constraint})")]
    AlreadyExists { what: String, constraint: String },
    #[error("the artifact {uri} is {artifact}-d, the version was registered as {dimension}-d")]
    Dimension {
        uri: String,
        artifact: usize,
        dimension: usize,
    },
    #[error("parent version {0} is not registered")]
    UnknownParent(String),
}

pub type Result<T, E = LifecycleError> = std::result::Result<T, E>;

/// 23505 (unique violation) as [`LifecycleError::AlreadyExists`].
fn unique_violation(error: sqlx::Error, what: impl FnOnce() -> String) -> LifecycleError {
    match &error {
        sqlx::Error::Database(e) if e.code().as_deref() == Some("23505") => {
            LifecycleError::AlreadyExists {
                what: what(),
                constraint: e.constraint().unwrap_or("unique").to_owned(),
            }
        }
        _ => LifecycleError::Db(error),
    }
}

const TRANSITION_COLUMNS: &str =
    "id, model_version, from_state, to_state, actor, reason, evidence, at";

/// Writes one `model_transitions` row (the state column is the caller's).
async fn record(
    conn: &mut PgConnection,
    version: &str,
    from: Option<State>,
    to: State,
    actor: &str,
    reason: &str,
    evidence: &serde_json::Value,
) -> Result<Transition> {
    Ok(sqlx::query_as(&format!(
        "INSERT INTO model_transitions (model_version, from_state, to_state, actor, reason, evidence)
         VALUES ($1, $2, $3, $4, $5, $6) RETURNING {TRANSITION_COLUMNS}"
    ))
    .bind(version)
    .bind(from)
    .bind(to)
    .bind(actor)
    .bind(reason)
    .bind(evidence)
    .fetch_one(&mut *conn)
    .await?)
}

fn check_who(version: &str, actor: &str, reason: &str) -> Result<()> {
    if actor.trim().is_empty() {
        return Err(LifecycleError::NoActor(version.to_owned()));
    }
    if reason.trim().is_empty() {
        return Err(LifecycleError::NoReason(version.to_owned()));
    }
    Ok(())
}

/// Moves `version` to `to` and records why, in one transaction. Refuses an
/// illegal move (the error names both states and the legal next ones) and
/// a missing actor or reason; the state is then unchanged. Moving a version
/// to `promoted` retires the version promoted before (see [`promote`]).
pub async fn transition(
    pool: &PgPool,
    version: &str,
    to: State,
    actor: &str,
    reason: &str,
    evidence: serde_json::Value,
) -> Result<Transition> {
    let mut tx = pool.begin().await?;
    let done = transition_in(&mut tx, version, to, actor, reason, evidence).await?;
    tx.commit().await?;
    Ok(done.transition)
}

/// What a transition did: the version's own row, and for a promotion the
/// rows of the versions it retired.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Moved {
    pub transition: Transition,
    pub retired: Vec<Transition>,
}

/// [`transition`] inside the caller's transaction (so it commits or rolls
/// back with the caller's other writes, e.g. a deployment change).
pub async fn transition_in(
    conn: &mut PgConnection,
    version: &str,
    to: State,
    actor: &str,
    reason: &str,
    evidence: serde_json::Value,
) -> Result<Moved> {
    check_who(version, actor, reason)?;
    if to == State::Promoted {
        // one promotion at a time, so each sees the one before it
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('kalon.model_versions.promote'))")
            .execute(&mut *conn)
            .await?;
    }
    let from: State =
        sqlx::query_scalar("SELECT state FROM model_versions WHERE version = $1 FOR UPDATE")
            .bind(version)
            .fetch_optional(&mut *conn)
            .await?
            .ok_or_else(|| LifecycleError::Unknown(version.to_owned()))?;
    if !can_go(from, to) {
        return Err(LifecycleError::Illegal {
            version: version.to_owned(),
            from,
            to,
            legal: from.next(),
        });
    }
    let mut retired = Vec::new();
    if to == State::Promoted {
        let previous: Vec<String> = sqlx::query_scalar(
            "SELECT version FROM model_versions WHERE state = 'promoted' AND version <> $1
             ORDER BY version FOR UPDATE",
        )
        .bind(version)
        .fetch_all(&mut *conn)
        .await?;
        for old in previous {
            set_state(conn, &old, State::Retired).await?;
            let why = format!("superseded by {version}: {reason}");
            let evidence = serde_json::json!({ "superseded_by": version });
            retired.push(
                record(
                    conn,
                    &old,
                    Some(State::Promoted),
                    State::Retired,
                    actor,
                    &why,
                    &evidence,
                )
                .await?,
            );
        }
    }
    set_state(conn, version, to).await?;
    let transition = record(conn, version, Some(from), to, actor, reason, &evidence).await?;
    Ok(Moved {
        transition,
        retired,
    })
}

async fn set_state(conn: &mut PgConnection, version: &str, to: State) -> Result<()> {
    sqlx::query("UPDATE model_versions SET state = $2 WHERE version = $1")
        .bind(version)
        .bind(to)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Promotes `version` (from `indexed` or `canary`) and retires the version
/// promoted before it, each with its own transition row, in one transaction.
pub async fn promote(
    pool: &PgPool,
    version: &str,
    actor: &str,
    reason: &str,
    evidence: serde_json::Value,
) -> Result<Moved> {
    let mut tx = pool.begin().await?;
    let moved = transition_in(&mut tx, version, State::Promoted, actor, reason, evidence).await?;
    tx.commit().await?;
    Ok(moved)
}

/// Records a trained version's offline gate: its figures and verdict in the
/// version's `gate` column and the move to `gated_passed` or `gated_failed`
/// (the figures as the transition's evidence), in one transaction.
pub async fn gate(
    pool: &PgPool,
    version: &str,
    passed: bool,
    figures: serde_json::Value,
    actor: &str,
    reason: &str,
) -> Result<Transition> {
    let to = if passed {
        State::GatedPassed
    } else {
        State::GatedFailed
    };
    let mut tx = pool.begin().await?;
    let moved = transition_in(&mut tx, version, to, actor, reason, figures.clone()).await?;
    sqlx::query("UPDATE model_versions SET gate = $2 WHERE version = $1")
        .bind(version)
        .bind(&figures)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(moved.transition)
}

/// The promoted version, if any.
pub async fn promoted(pool: &PgPool) -> sqlx::Result<Option<ModelVersion>> {
    store::versions_where(pool, "state = 'promoted'")
        .await
        .map(|mut v| v.pop())
}

/// A version's transitions, oldest first.
pub async fn history(pool: &PgPool, version: &str) -> sqlx::Result<Vec<Transition>> {
    sqlx::query_as(&format!(
        "SELECT {TRANSITION_COLUMNS} FROM model_transitions WHERE model_version = $1 ORDER BY id"
    ))
    .bind(version)
    .fetch_all(pool)
    .await
}

/// A trained version to register (the trainer's).
#[derive(Debug, Clone)]
pub struct NewVersion {
    pub parent: Option<String>,
    pub training_run_id: Option<Uuid>,
    pub artifact: StoredArtifact,
    pub dimension: usize,
    pub actor: String,
    pub reason: String,
}

/// The name the registry gives a trained version:
/// `m-YYYYMMDD-HHMMSS-<first 8 hex of its artifact's sha256>`.
pub fn version_name(at: DateTime<Utc>, sha256: &str) -> String {
    let short: String = sha256.chars().take(8).collect();
    format!("m-{}-{short}", at.format("%Y%m%d-%H%M%S"))
}

/// Registers a trained version in state `trained` (with its creating
/// transition) and returns the name the registry gave it.
pub async fn register_trained(pool: &PgPool, new: NewVersion) -> Result<String> {
    let mut tx = pool.begin().await?;
    let name = register_trained_in(&mut tx, new).await?;
    tx.commit().await?;
    Ok(name)
}

/// [`register_trained`] inside the caller's transaction.
pub async fn register_trained_in(conn: &mut PgConnection, new: NewVersion) -> Result<String> {
    let name = version_name(Utc::now(), &new.artifact.sha256);
    check_who(&name, &new.actor, &new.reason)?;
    if new.artifact.embedding_dim != new.dimension {
        return Err(LifecycleError::Dimension {
            uri: new.artifact.uri.clone(),
            artifact: new.artifact.embedding_dim,
            dimension: new.dimension,
        });
    }
    if let Some(parent) = &new.parent {
        let known: Option<String> =
            sqlx::query_scalar("SELECT version FROM model_versions WHERE version = $1")
                .bind(parent)
                .fetch_optional(&mut *conn)
                .await?;
        if known.is_none() {
            return Err(LifecycleError::UnknownParent(parent.clone()));
        }
    }
    sqlx::query(
        "INSERT INTO model_versions
           (version, parent, embedding_dim, state, artifact_uri, artifact_sha256, training_run_id)
         VALUES ($1, $2, $3, 'trained', $4, $5, $6)",
    )
    .bind(&name)
    .bind(&new.parent)
    .bind(new.dimension as i32)
    .bind(&new.artifact.uri)
    .bind(&new.artifact.sha256)
    .bind(new.training_run_id)
    .execute(&mut *conn)
    .await
    .map_err(|e| {
        unique_violation(e, || match new.training_run_id {
            Some(run) => format!("model version {name} or a version of training run {run}"),
            None => format!("model version {name}"),
        })
    })?;
    let evidence = serde_json::json!({
        "artifact_uri": new.artifact.uri,
        "artifact_sha256": new.artifact.sha256,
        "files": new.artifact.files,
        "bytes": new.artifact.bytes,
        "training_run_id": new.training_run_id,
    });
    record(
        conn,
        &name,
        None,
        State::Trained,
        &new.actor,
        &new.reason,
        &evidence,
    )
    .await?;
    Ok(name)
}

/// The creating transition of a version a person registered from an
/// encoder directory (`store::register_version`).
pub(crate) async fn record_registered(conn: &mut PgConnection, version: &str) -> Result<()> {
    record(
        conn,
        version,
        None,
        State::Indexed,
        "kalonctl index",
        "registered by a person from an encoder directory",
        &serde_json::json!({}),
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_match_serde() {
        for s in State::ALL {
            assert_eq!(State::parse(s.as_str()).unwrap(), s);
            assert_eq!(s.to_string().parse::<State>().unwrap(), s);
            assert_eq!(
                serde_json::to_value(s).unwrap(),
                serde_json::json!(s.as_str())
            );
        }
        assert!(State::parse("deployed").is_err());
    }

    #[test]
    fn the_legal_table_is_the_documented_one() {
        assert_eq!(LEGAL.len(), 12);
        assert!(State::Retired.next().is_empty());
        assert_eq!(State::Canary.next(), [State::Promoted, State::RolledBack]);
        // nothing goes back to trained, nothing stays put
        for s in State::ALL {
            assert!(!can_go(s, State::Trained));
            assert!(!can_go(s, s));
        }
    }

    #[test]
    fn a_trained_versions_name_is_a_valid_version_name() {
        let at = DateTime::parse_from_rfc3339("2026-12-07T10:11:12Z")
            .unwrap()
            .with_timezone(&Utc);
        let name = version_name(at, &"ab".repeat(32));
        assert_eq!(name, "m-20261207-101112-abababab");
        assert!(store::valid_name(&name));
    }
}
