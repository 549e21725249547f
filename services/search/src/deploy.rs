//! Deployment changes: the `deployments` table is the truth, and every
//! change is announced on `model.deployment.v1` so each search replica
//! re-reads the table and swaps its routing without a restart.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use kalon_encoder::EncoderOptions;
use kalon_kafka::KafkaSettings;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use uuid::Uuid;

use crate::index::IndexParams;
use crate::routing::{Live, Routing};
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

/// Keeps a [`Live`] routing in step with the `deployments` table.
#[derive(Clone)]
pub struct Reloader {
    pub pool: PgPool,
    pub live: Arc<Live>,
    pub options: EncoderOptions,
    pub params: IndexParams,
}

impl Reloader {
    /// Re-reads the deployments and swaps in the new routing; on an error
    /// (a version that will not load, the database away) the routing in
    /// force stays and the error is returned.
    pub async fn reload(&self) -> Result<Arc<Routing>, crate::routing::LoadError> {
        let deployments = store::deployments(&self.pool).await?;
        let current = self.live.current();
        let next = current
            .rebuild(&self.pool, &deployments, &self.options, self.params)
            .await?;
        let changed = next.variants.len() != current.variants.len()
            || next.variants.iter().zip(&current.variants).any(|(a, b)| {
                a.name != b.name || a.weight != b.weight || !Arc::ptr_eq(&a.served, &b.served)
            });
        if changed {
            let summary: Vec<String> = next
                .variants
                .iter()
                .map(|v| format!("{}={}@{}", v.name, v.served.version, v.weight))
                .collect();
            tracing::info!(routing = %summary.join(" "), "routing swapped");
            self.live.replace(next);
        }
        Ok(self.live.current())
    }

    /// Positions a consumer at the end of the deployment topic. Done before
    /// the first [`Reloader::reload`], so no change made after that read is
    /// missed. Every replica reads every change: no consumer group.
    pub fn watch(&self, kafka: &KafkaSettings) -> anyhow::Result<StreamConsumer> {
        let consumer: StreamConsumer = kafka
            .client_config("kalon-search-deployments")
            .set("group.id", format!("kalon-search-{}", Uuid::new_v4()))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .create()?;
        let topic = kafka.topic(kalon_events::DEPLOYMENT_TOPIC);
        let (_, high) = consumer.fetch_watermarks(&topic, 0, Duration::from_secs(5))?;
        let mut partitions = TopicPartitionList::new();
        partitions.add_partition_offset(&topic, 0, Offset::Offset(high))?;
        consumer.assign(&partitions)?;
        Ok(consumer)
    }

    /// Reloads on every deployment event, and every `every` in case an
    /// event was lost, until `shutdown` resolves. Without a watcher (the
    /// broker was away at start) it tries to position one at every tick and
    /// re-reads the table once it has, so search runs on Postgres alone
    /// until Kafka is back.
    pub async fn run(
        self,
        kafka: KafkaSettings,
        mut watcher: Option<StreamConsumer>,
        every: Duration,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            let next = async {
                match &watcher {
                    Some(consumer) => Some(consumer.recv().await),
                    None => std::future::pending().await,
                }
            };
            let why = tokio::select! {
                _ = &mut shutdown => return,
                _ = tick.tick() => {
                    if watcher.is_none() {
                        match self.watch(&kafka) {
                            Ok(consumer) => {
                                tracing::info!("deployment events: watching again");
                                watcher = Some(consumer);
                            }
                            Err(error) => tracing::warn!(%error, "deployment events: broker still unreachable"),
                        }
                    }
                    "periodic"
                }
                message = next => match message {
                    Some(Ok(message)) => {
                        let change = message
                            .payload()
                            .and_then(|p| serde_json::from_slice::<DeploymentChanged>(p).ok());
                        tracing::info!(?change, "deployment event");
                        "event"
                    }
                    Some(Err(error)) => {
                        tracing::warn!(%error, "deployment topic");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                    None => continue,
                },
            };
            if let Err(error) = self.reload().await {
                tracing::error!(%error, why, "deployment reload failed; the routing in force stays");
            }
        }
    }
}
