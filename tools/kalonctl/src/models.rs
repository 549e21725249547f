//! `kalonctl models`: the registry's model versions, their lifecycle and
//! lineage, and a person's promotions and retirements.

use anyhow::Context;
use clap::Subcommand;
use kalon_registry::lifecycle::{self, State};
use kalon_registry::{lineage, store};
use sqlx::PgPool;

use crate::Endpoints;

#[derive(Debug, Clone, Subcommand)]
pub enum Models {
    /// Every model version: state, dimension, images indexed, encoder.
    List {
        /// One JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One version's row and every transition it went through.
    Show {
        version: String,
        #[arg(long)]
        json: bool,
    },
    /// Why a version exists: its chain of parents with their training runs
    /// (trigger, data window, pairs, config), gates and transitions.
    Why {
        version: String,
        #[arg(long)]
        json: bool,
    },
    /// Promote a version (from indexed or canary); the version promoted
    /// before it is retired. Traffic is not changed: see `kalonctl deploy`.
    Promote {
        version: String,
        /// Why, for the record.
        #[arg(long)]
        reason: String,
    },
    /// Retire a version for good (withdraw its deployment first).
    Retire {
        version: String,
        /// Why, for the record.
        #[arg(long)]
        reason: String,
    },
}

/// Who a person's transition is recorded as.
fn person() -> String {
    match std::env::var("USER") {
        Ok(user) if !user.trim().is_empty() => format!("{} (kalonctl)", user.trim()),
        _ => "kalonctl (person)".into(),
    }
}

async fn known(pool: &PgPool, version: &str) -> anyhow::Result<store::ModelVersion> {
    store::version(pool, version).await?.with_context(|| {
        format!("model version {version} is not registered (see `kalonctl models list`)")
    })
}

fn encoder(v: &store::ModelVersion) -> String {
    match (&v.artifact_uri, &v.encoder_dir) {
        (Some(uri), _) => uri.clone(),
        (None, Some(dir)) => dir.clone(),
        (None, None) => "-".into(),
    }
}

/// What the command prints on stdout (messages go to stderr).
pub async fn output(pool: &PgPool, action: &Models) -> anyhow::Result<String> {
    Ok(match action {
        Models::List { json } => {
            let versions = store::versions(pool).await?;
            if *json {
                serde_json::to_string_pretty(&versions)? + "\n"
            } else {
                let mut out = format!(
                    "{:<28} {:<12} {:>5} {:>8}  {:<24} {}\n",
                    "VERSION", "STATE", "DIM", "IMAGES", "PARENT", "ENCODER"
                );
                for v in &versions {
                    out += &format!(
                        "{:<28} {:<12} {:>5} {:>8}  {:<24} {}\n",
                        v.version,
                        v.state.as_str(),
                        v.embedding_dim,
                        v.images_indexed,
                        v.parent.as_deref().unwrap_or("-"),
                        encoder(v)
                    );
                }
                out
            }
        }
        Models::Show { version, json } => {
            let row = known(pool, version).await?;
            let transitions = lifecycle::history(pool, version).await?;
            if *json {
                serde_json::to_string_pretty(&serde_json::json!({
                    "version": row,
                    "transitions": transitions,
                }))? + "\n"
            } else {
                let mut out = serde_json::to_string_pretty(&row)? + "\n";
                for t in transitions {
                    out += &format!(
                        "{}  {} -> {}  by {}: {}  {}\n",
                        t.at.format("%Y-%m-%d %H:%M:%S UTC"),
                        t.from_state.map_or("(new)", State::as_str),
                        t.to_state,
                        t.actor,
                        t.reason,
                        t.evidence
                    );
                }
                out
            }
        }
        Models::Why { version, json } => {
            let chain = lineage::why(pool, version).await?;
            if *json {
                serde_json::to_string_pretty(&chain)? + "\n"
            } else {
                lineage::render(&chain)
            }
        }
        Models::Promote { version, reason } => {
            known(pool, version).await?;
            let moved = lifecycle::promote(
                pool,
                version,
                &person(),
                reason,
                serde_json::json!({ "via": "kalonctl models promote" }),
            )
            .await?;
            let mut out = format!(
                "{version}: {} -> promoted\n",
                moved.transition.from_state.map_or("(new)", State::as_str)
            );
            for t in moved.retired {
                out += &format!("{}: promoted -> retired ({})\n", t.model_version, t.reason);
            }
            out
        }
        Models::Retire { version, reason } => {
            let row = known(pool, version).await?;
            if store::deployments(pool)
                .await?
                .iter()
                .any(|d| d.model_version == *version)
            {
                anyhow::bail!(
                    "{version} still takes traffic: withdraw it first (`kalonctl deploy --model-version {version} --remove`)"
                );
            }
            lifecycle::transition(
                pool,
                version,
                State::Retired,
                &person(),
                reason,
                serde_json::json!({ "via": "kalonctl models retire" }),
            )
            .await?;
            format!("{version}: {} -> retired\n", row.state)
        }
    })
}

/// Runs a `kalonctl models` command and prints its output.
pub async fn run(endpoints: &Endpoints, action: &Models) -> anyhow::Result<()> {
    let pool = kalon_db::connect(&endpoints.database_url, 2).await?;
    kalon_db::check_schema(&pool).await?;
    print!("{}", output(&pool, action).await?);
    Ok(())
}
