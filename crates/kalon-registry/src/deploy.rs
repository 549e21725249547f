//! Deployment changes: the `deployments` table is the truth, and every
//! change is announced on `model.deployment.v1` so each search replica
//! re-reads the table and swaps its routing without a restart (search's
//! `Reloader` does that).

use chrono::{DateTime, Utc};
use kalon_kafka::KafkaSettings;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use uuid::Uuid;

use crate::store;

/// `model.deployment.v1`: what changed (for people and audit logs; replicas
/// re-read the table whatever it says).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeploymentChanged {
    pub event_id: Uuid,
    pub occurred_at: DateTime<Utc>,
    pub model_version: String,
    /// `None` when the version was taken out of service.
    pub variant: Option<String>,
    pub weight: f64,
}

impl DeploymentChanged {
    /// A change happening now (`variant` None: taken out of service).
    pub fn now(model_version: &str, variant: Option<&str>, weight: f64) -> Self {
        DeploymentChanged {
            event_id: Uuid::now_v7(),
            occurred_at: Utc::now(),
            model_version: model_version.to_owned(),
            variant: variant.map(str::to_owned),
            weight,
        }
    }
}

/// Announces a change already written to the `deployments` table.
pub async fn announce(kafka: &KafkaSettings, change: &DeploymentChanged) -> anyhow::Result<()> {
    let message = kalon_kafka::Outgoing {
        topic: kafka.topic(kalon_events::DEPLOYMENT_TOPIC),
        key: Some(change.model_version.as_bytes().to_vec()),
        payload: serde_json::to_vec(change)?,
        headers: None,
    };
    let kafka = kafka.clone();
    tokio::task::spawn_blocking(move || kalon_kafka::produce_all(&kafka, [message], |_| {}))
        .await??;
    Ok(())
}

/// Writes a deployment and announces it: what `kalonctl deploy` does.
pub async fn deploy(
    pool: &PgPool,
    kafka: &KafkaSettings,
    version: &str,
    variant: &str,
    weight: f64,
) -> anyhow::Result<()> {
    store::set_deployment(pool, version, variant, weight).await?;
    announce(
        kafka,
        &DeploymentChanged::now(version, Some(variant), weight),
    )
    .await
}

/// Takes a version out of service and announces it: `kalonctl deploy
/// --remove`. Returns whether it was deployed.
pub async fn withdraw(pool: &PgPool, kafka: &KafkaSettings, version: &str) -> anyhow::Result<bool> {
    if !store::remove_deployment(pool, version).await? {
        return Ok(false);
    }
    announce(kafka, &DeploymentChanged::now(version, None, 0.0)).await?;
    Ok(true)
}
