//! Search's side of deployments: the `deployments` table (written by
//! `kalon_registry::deploy`) is the truth, and every change is announced on
//! `model.deployment.v1`; each replica re-reads the table on an event (or
//! periodically) and swaps its routing without a restart.

use std::sync::Arc;
use std::time::Duration;

use kalon_encoder::EncoderOptions;
use kalon_events::{DeploymentChanged, TopicPayload};
use kalon_kafka::KafkaSettings;
use kalon_registry::store;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use sqlx::PgPool;
use uuid::Uuid;

use crate::index::IndexParams;
use crate::routing::{Live, Routing};

/// Keeps a [`Live`] routing in step with the `deployments` table.
#[derive(Clone)]
pub struct Reloader {
    pub pool: PgPool,
    pub live: Arc<Live>,
    pub options: EncoderOptions,
    pub params: IndexParams,
    /// Where fetched model artifacts are kept (verified on every load).
    pub cache: std::path::PathBuf,
}

impl Reloader {
    /// Re-reads the deployments and swaps in the new routing; on an error
    /// (a version that will not load, the database away) the routing in
    /// force stays and the error is returned.
    pub async fn reload(&self) -> Result<Arc<Routing>, crate::routing::LoadError> {
        let deployments = store::deployments(&self.pool).await?;
        let current = self.live.current();
        let next = current
            .rebuild(
                &self.pool,
                &deployments,
                &self.cache,
                &self.options,
                self.params,
            )
            .await?;
        let changed = next.variants.len() != current.variants.len()
            || next.variants.iter().zip(&current.variants).any(|(a, b)| {
                a.name != b.name
                    || a.weight != b.weight
                    || a.interleave != b.interleave
                    || a.state != b.state
                    || !Arc::ptr_eq(&a.served, &b.served)
            });
        if changed {
            let summary: Vec<String> = next
                .variants
                .iter()
                .map(|v| {
                    format!(
                        "{}={}@{}/{}/interleave={}",
                        v.name,
                        v.served.version,
                        v.weight,
                        v.state.as_str(),
                        v.interleave
                    )
                })
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
                            .and_then(|p| DeploymentChanged::decode(p).ok());
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
