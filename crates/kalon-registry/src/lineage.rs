//! Why a model version exists: the chain from it up through its parents to
//! the root, and for each generation its row (state, artifact, gate), the
//! training run that made it (what triggered the run, the data window, the
//! pairs, the configuration, the device, the timings) and every transition
//! (the gate's and the canary's decisions are transitions with evidence).

use std::collections::HashSet;
use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use crate::lifecycle::{self, Transition};
use crate::store::{self, ModelVersion};

/// A version and its ancestors, the version first and the root last.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Lineage {
    pub version: String,
    pub generations: Vec<Generation>,
}

/// One version in a lineage.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Generation {
    #[serde(flatten)]
    pub row: ModelVersion,
    /// The training run that made it; `None` for a person's version.
    pub run: Option<Run>,
    /// Oldest first.
    pub transitions: Vec<Transition>,
}

/// A `training_runs` row with its trigger.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct Run {
    pub id: Uuid,
    pub trigger_id: String,
    pub attempt: i32,
    pub state: String,
    pub reason: Option<String>,
    pub parent_version: Option<String>,
    pub window_start: Option<DateTime<Utc>>,
    pub window_end: Option<DateTime<Utc>>,
    pub pair_counts: serde_json::Value,
    pub config: serde_json::Value,
    pub device: Option<String>,
    pub progress: serde_json::Value,
    pub timings: serde_json::Value,
    pub gate: Option<serde_json::Value>,
    pub owner: String,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    #[sqlx(flatten)]
    pub trigger: Trigger,
}

/// A `training_triggers` row: what asked for the run.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct Trigger {
    #[sqlx(rename = "trigger_kind")]
    pub kind: String,
    #[sqlx(rename = "trigger_requested_by")]
    pub requested_by: String,
    #[sqlx(rename = "trigger_reason")]
    pub reason: String,
    #[sqlx(rename = "trigger_state")]
    pub state: String,
    #[sqlx(rename = "trigger_created_at")]
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, thiserror::Error)]
pub enum LineageError {
    #[error(transparent)]
    Db(#[from] sqlx::Error),
    #[error("model version {0} is not registered")]
    Unknown(String),
    #[error("model version {0}'s chain of parents loops back to itself")]
    Cycle(String),
}

/// The lineage of `version`.
pub async fn why(pool: &PgPool, version: &str) -> Result<Lineage, LineageError> {
    let mut generations = Vec::new();
    let mut seen = HashSet::new();
    let mut next = Some(version.to_owned());
    while let Some(name) = next {
        if !seen.insert(name.clone()) {
            return Err(LineageError::Cycle(name));
        }
        let row = store::version(pool, &name).await?.ok_or_else(|| {
            // the first is the caller's; a parent is kept by its foreign key
            LineageError::Unknown(name.clone())
        })?;
        let run = run_of(pool, &row).await?;
        let transitions = lifecycle::history(pool, &name).await?;
        next = row.parent.clone();
        generations.push(Generation {
            row,
            run,
            transitions,
        });
    }
    Ok(Lineage {
        version: version.to_owned(),
        generations,
    })
}

/// The run named by the version's `training_run_id`, else a succeeded run
/// that names the version.
async fn run_of(pool: &PgPool, row: &ModelVersion) -> sqlx::Result<Option<Run>> {
    sqlx::query_as(
        "SELECT r.id, r.trigger_id, r.attempt, r.state, r.reason, r.parent_version,
                r.window_start, r.window_end, r.pair_counts, r.config, r.device,
                r.progress, r.timings, r.gate, r.owner, r.started_at, r.finished_at,
                t.kind AS trigger_kind, t.requested_by AS trigger_requested_by,
                t.reason AS trigger_reason, t.state AS trigger_state,
                t.created_at AS trigger_created_at
         FROM training_runs r JOIN training_triggers t ON t.id = r.trigger_id
         WHERE r.id = $1 OR ($1 IS NULL AND r.model_version = $2 AND r.state = 'succeeded')
         ORDER BY r.started_at DESC LIMIT 1",
    )
    .bind(row.training_run_id)
    .bind(&row.version)
    .fetch_optional(pool)
    .await
}

fn compact(value: &serde_json::Value) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

fn when(at: &DateTime<Utc>) -> String {
    at.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

/// A person's reading of a lineage: one block per generation, each
/// indented one step deeper than its child.
pub fn render(lineage: &Lineage) -> String {
    let mut out = String::new();
    for (depth, g) in lineage.generations.iter().enumerate() {
        let pad = "    ".repeat(depth);
        let v = &g.row;
        let role = match depth {
            0 => String::new(),
            1 => "  (parent)".into(),
            n => format!("  (ancestor, {n} generations up)"),
        };
        let _ = writeln!(out, "{pad}{} [{}]{role}", v.version, v.state);
        let encoder = match (&v.artifact_uri, &v.artifact_sha256, &v.encoder_dir) {
            (Some(uri), Some(sha), _) => format!("artifact {uri} (sha256 {sha})"),
            (_, _, Some(dir)) => format!("directory {dir}"),
            _ => "none".into(),
        };
        let _ = writeln!(
            out,
            "{pad}  encoder: {encoder}, {}-d, {} images indexed; created {}",
            v.embedding_dim,
            v.images_indexed,
            when(&v.created_at)
        );
        match &g.run {
            None => {
                let _ = writeln!(out, "{pad}  training run: none (registered by a person)");
            }
            Some(r) => {
                let _ = writeln!(
                    out,
                    "{pad}  training run {} (attempt {}, {}{}), on {}",
                    r.id,
                    r.attempt,
                    r.state,
                    r.reason
                        .as_deref()
                        .map(|s| format!(": {s}"))
                        .unwrap_or_default(),
                    r.device.as_deref().unwrap_or("an unrecorded device")
                );
                let _ = writeln!(
                    out,
                    "{pad}    trigger {} ({}, requested by {}): {}",
                    r.trigger_id, r.trigger.kind, r.trigger.requested_by, r.trigger.reason
                );
                let window = match (&r.window_start, &r.window_end) {
                    (Some(a), Some(b)) => format!("{} .. {}", when(a), when(b)),
                    (None, Some(b)) => format!("up to {}", when(b)),
                    _ => "not recorded".into(),
                };
                let _ = writeln!(out, "{pad}    data window: {window}");
                let _ = writeln!(out, "{pad}    pairs: {}", compact(&r.pair_counts));
                let _ = writeln!(out, "{pad}    config: {}", compact(&r.config));
                let _ = writeln!(out, "{pad}    timings (s): {}", compact(&r.timings));
            }
        }
        if let Some(gate) = v
            .gate
            .as_ref()
            .or(g.run.as_ref().and_then(|r| r.gate.as_ref()))
        {
            let _ = writeln!(out, "{pad}  gate: {}", compact(gate));
        }
        let _ = writeln!(out, "{pad}  transitions:");
        if g.transitions.is_empty() {
            let _ = writeln!(out, "{pad}    none recorded");
        }
        for t in &g.transitions {
            let from = t.from_state.map_or("(new)", |s| s.as_str());
            let evidence = match &t.evidence {
                serde_json::Value::Object(m) if m.is_empty() => String::new(),
                e => format!("  evidence {}", compact(e)),
            };
            let _ = writeln!(
                out,
                "{pad}    {}  {from} -> {}  by {}: {}{evidence}",
                when(&t.at),
                t.to_state,
                t.actor,
                t.reason
            );
        }
    }
    out
}
