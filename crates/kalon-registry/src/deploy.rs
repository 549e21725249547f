//! Deployment changes: the `deployments` table is the truth, and every
//! change is announced on `model.deployment.v1` so each search replica
//! re-reads the table and swaps its routing without a restart (search's
//! `Reloader` does that).

use kalon_events::TopicPayload;
use kalon_kafka::KafkaSettings;
use sqlx::PgPool;

use crate::store;

/// `model.deployment.v1`'s payload (the contract lives in kalon-events).
pub use kalon_events::DeploymentChanged;

/// Announces a change already written to the `deployments` table.
pub async fn announce(kafka: &KafkaSettings, change: &DeploymentChanged) -> anyhow::Result<()> {
    let message = kalon_kafka::Outgoing {
        topic: kafka.topic(DeploymentChanged::TOPIC),
        key: Some(change.model_version.as_bytes().to_vec()),
        payload: change.to_json(),
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
