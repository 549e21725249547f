//! Makes the deployments and the versions' lifecycle what a canary's stored
//! state says they should be. Every action checks first and acts only on a
//! difference, so applying a decision again (after a crash, or from the
//! admin API and the loop at once) changes nothing twice.

use std::collections::HashMap;

use kalon_events::DeploymentChanged;
use kalon_kafka::KafkaSettings;
use kalon_registry::deploy;
use kalon_registry::lifecycle::{self, State};
use kalon_registry::store::{self as registry, Deployment};
use serde_json::json;
use sqlx::PgPool;

use crate::config::{CanaryConfig, Evidence};
use crate::store::{Canary, Status};

/// Who the controller's lifecycle moves are recorded as.
pub const ACTOR: &str = "kalon-canary";

/// What serving should look like for a canary.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// Stable at `1 - share`, the candidate at `share` (interleaved on
    /// `interleave` of its requests).
    Split { share: f64, interleave: f64 },
    /// The candidate serves everything under the stable variant name.
    Promoted,
    /// The candidate serves nothing; the stable everything.
    Withdrawn,
}

pub fn target(config: &CanaryConfig, canary: &Canary) -> Option<Target> {
    Some(match canary.status {
        Status::Waiting => return None,
        Status::Running | Status::Paused => Target::Split {
            share: config.share(canary.step),
            interleave: if config.uses(Evidence::Interleaving) {
                config.interleave
            } else {
                0.0
            },
        },
        Status::Promoted => Target::Promoted,
        Status::RolledBack | Status::Superseded => Target::Withdrawn,
    })
}

/// A deployment as wanted: (variant, weight, interleave share); `None`
/// in its place means not deployed.
type Serve<'a> = (&'a str, f64, f64);

/// What [`reconcile`] changed.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Applied {
    pub deployments: Vec<String>,
    pub transitions: Vec<String>,
}

impl Applied {
    pub fn is_empty(&self) -> bool {
        self.deployments.is_empty() && self.transitions.is_empty()
    }
}

/// Brings serving and the lifecycle in line with `canary`'s state.
/// `announce_all`: announce every deployment of the canary even when the
/// table already matches (after a restart, when an earlier announcement may
/// have been lost between the write and the broker).
pub async fn reconcile(
    pool: &PgPool,
    kafka: &KafkaSettings,
    config: &CanaryConfig,
    canary: &Canary,
    announce_all: bool,
) -> anyhow::Result<Applied> {
    let mut applied = Applied::default();
    let Some(target) = target(config, canary) else {
        return Ok(applied);
    };
    let candidate = canary.candidate.as_str();
    let stable = canary.stable.as_deref();
    let reason = |what: &str| format!("canary {} {what}", canary.id);
    let evidence = json!({ "canary_id": canary.id, "step": canary.step });

    // the lifecycle first: a deployment is refused for a version whose
    // state may not serve, and a promotion retires the old stable
    let state = registry::version(pool, candidate)
        .await?
        .map(|v| v.state)
        .ok_or_else(|| anyhow::anyhow!("model version {candidate} is not registered"))?;
    let wanted = match target {
        Target::Split { .. } => State::Canary,
        Target::Promoted => State::Promoted,
        Target::Withdrawn => State::RolledBack,
    };
    if state != wanted {
        match (state, wanted) {
            (State::Indexed, State::Canary) | (State::Canary, State::RolledBack) => {
                lifecycle::transition(
                    pool,
                    candidate,
                    wanted,
                    ACTOR,
                    &reason("moved it"),
                    evidence,
                )
                .await?;
                applied.transitions.push(format!("{state} -> {wanted}"));
            }
            (State::Canary | State::Indexed, State::Promoted) => {
                lifecycle::promote(pool, candidate, ACTOR, &reason("promoted it"), evidence)
                    .await?;
                applied.transitions.push(format!("{state} -> promoted"));
            }
            (from, to) => tracing::warn!(
                canary = canary.id,
                candidate,
                "{candidate} is {from}, not {to} as canary {} expects; left as it is",
                canary.id
            ),
        }
    }

    let rows: HashMap<String, Deployment> = registry::deployments(pool)
        .await?
        .into_iter()
        .map(|d| (d.model_version.clone(), d))
        .collect();
    let mut wanted: Vec<(&str, Option<Serve<'_>>)> = Vec::new();
    match target {
        Target::Split { share, interleave } => {
            if let Some(stable) = stable {
                wanted.push((stable, Some((&config.stable_variant, 1.0 - share, 0.0))));
            }
            wanted.push((candidate, Some((&config.canary_variant, share, interleave))));
        }
        Target::Promoted => {
            wanted.push((candidate, Some((&config.stable_variant, 1.0, 0.0))));
        }
        Target::Withdrawn => {
            if let Some(stable) = stable {
                // only if it still serves: a stable retired since is left out
                if rows.contains_key(stable) {
                    wanted.push((stable, Some((&config.stable_variant, 1.0, 0.0))));
                }
            }
            wanted.push((candidate, None));
        }
    }
    for (version, want) in wanted {
        let row = rows.get(version);
        match want {
            None => {
                if row.is_some() {
                    deploy::withdraw(pool, kafka, version).await?;
                    applied.deployments.push(format!("{version} withdrawn"));
                } else if announce_all {
                    deploy::announce(kafka, &DeploymentChanged::now(version, None, 0.0)).await?;
                }
            }
            Some((variant, weight, interleave)) => {
                let same = row.is_some_and(|r| {
                    r.variant == variant
                        && (r.weight - weight).abs() < 1e-9
                        && (r.interleave - interleave).abs() < 1e-9
                });
                if !same {
                    registry::set_deployment(pool, version, variant, weight).await?;
                    registry::set_interleave(pool, version, interleave).await?;
                    applied.deployments.push(format!(
                        "{version} as {variant} at {weight:.4} (interleaved {interleave})"
                    ));
                }
                if !same || announce_all {
                    deploy::announce(
                        kafka,
                        &DeploymentChanged::now(version, Some(variant), weight),
                    )
                    .await?;
                }
            }
        }
    }
    if !applied.is_empty() {
        tracing::info!(
            canary = canary.id,
            candidate,
            status = canary.status.as_str(),
            step = canary.step,
            deployments = ?applied.deployments,
            transitions = ?applied.transitions,
            "applied"
        );
    }
    Ok(applied)
}
