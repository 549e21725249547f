//! What search puts on the bus: an impression per answered search (never
//! blocking the answer) and the feedback clients post over HTTP (acknowledged
//! before the client hears 202).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kalon_events::{Event, Impression};
use kalon_kafka::KafkaSettings;
use opentelemetry::metrics::Counter;
use opentelemetry::KeyValue;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{FutureProducer, FutureRecord};

/// Impression counts since start, for tests, logs and `/readyz`.
#[derive(Debug, Default)]
pub struct ImpressionStats {
    /// Handed to the producer's buffer.
    pub queued: AtomicU64,
    /// Acknowledged by the broker.
    pub delivered: AtomicU64,
    /// Lost: the buffer was full, or the broker did not take it in time.
    pub dropped: AtomicU64,
}

impl ImpressionStats {
    pub fn snapshot(&self) -> (u64, u64, u64) {
        (
            self.queued.load(Ordering::Relaxed),
            self.delivered.load(Ordering::Relaxed),
            self.dropped.load(Ordering::Relaxed),
        )
    }
}

/// Producer side of search.
#[derive(Clone)]
pub struct Events {
    producer: FutureProducer,
    kafka: KafkaSettings,
    pub stats: Arc<ImpressionStats>,
    /// Where a lost impression is counted against its model version.
    serving: Arc<crate::stats::Serving>,
    dropped_metric: Counter<u64>,
    delivered_metric: Counter<u64>,
    feedback_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum FeedbackError {
    #[error("the event broker did not acknowledge the event: {0}")]
    Kafka(KafkaError),
    #[error("the event broker did not acknowledge the event within {0:?}")]
    Timeout(Duration),
}

impl Events {
    /// A producer whose in-memory buffer holds `buffer` messages: when the
    /// broker is away that many impressions wait (up to `timeout`) and
    /// further ones are dropped and counted (in total and against their
    /// model version in `serving`), so search never waits on Kafka.
    pub fn new(
        kafka: &KafkaSettings,
        buffer: usize,
        timeout: Duration,
        serving: Arc<crate::stats::Serving>,
    ) -> anyhow::Result<Self> {
        let producer = kalon_kafka::Publisher::with_config(kafka, "kalon-search", timeout, |c| {
            c.set("acks", "all")
                .set("queue.buffering.max.messages", buffer.max(1).to_string());
        })?
        .producer()
        .clone();
        let meter = kalon_telemetry::meter();
        Ok(Events {
            producer,
            kafka: kafka.clone(),
            stats: Arc::default(),
            serving,
            dropped_metric: meter
                .u64_counter("kalon.search.impressions.dropped")
                .with_description("impressions lost: producer buffer full or broker unreachable")
                .build(),
            delivered_metric: meter
                .u64_counter("kalon.search.impressions.delivered")
                .with_description("impressions acknowledged by the broker")
                .build(),
            feedback_timeout: timeout,
        })
    }

    /// Queues an impression and returns at once. Delivery is confirmed in
    /// the background; a full buffer or a failed delivery counts as dropped.
    pub fn impression(&self, impression: &Impression, headers: OwnedHeaders) {
        let topic = self
            .kafka
            .topic(kalon_events::EventKind::Impression.topic());
        let version = impression.model_version.as_str();
        let payload = match serde_json::to_vec(impression) {
            Ok(payload) => payload,
            Err(error) => {
                tracing::error!(%error, "cannot serialise an impression");
                return self.dropped(version, 1);
            }
        };
        let key = impression.event_id.as_bytes().to_vec();
        let record = FutureRecord::to(&topic)
            .key(&key)
            .payload(&payload)
            .headers(headers);
        match self.producer.send_result(record) {
            Ok(delivery) => {
                self.stats.queued.fetch_add(1, Ordering::Relaxed);
                let this = self.clone();
                let version = version.to_owned();
                tokio::spawn(async move {
                    match delivery.await {
                        Ok(Ok(_)) => {
                            this.stats.delivered.fetch_add(1, Ordering::Relaxed);
                            this.delivered_metric.add(1, &[]);
                        }
                        Ok(Err((error, _))) => {
                            tracing::warn!(%error, "impression not delivered");
                            this.dropped(&version, 1);
                        }
                        Err(_) => this.dropped(&version, 1),
                    }
                });
            }
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                self.dropped(version, 1);
            }
            Err((error, _)) => {
                tracing::warn!(%error, "impression not queued");
                self.dropped(version, 1);
            }
        }
    }

    fn dropped(&self, version: &str, n: u64) {
        self.stats.dropped.fetch_add(n, Ordering::Relaxed);
        self.serving.dropped(version, n);
        self.dropped_metric
            .add(n, &[KeyValue::new("topic", "search.impression.v1")]);
    }

    /// Produces a feedback event and waits for the broker's acknowledgement.
    pub async fn feedback(&self, event: &Event) -> Result<(), FeedbackError> {
        let topic = self.kafka.topic(event.kind().topic());
        let payload = event.to_json();
        let key = event.event_id().as_bytes().to_vec();
        let headers = kalon_kafka::inject_trace(OwnedHeaders::new());
        let record = FutureRecord::to(&topic)
            .key(&key)
            .payload(&payload)
            .headers(headers);
        let send = self.producer.send(record, self.feedback_timeout);
        match tokio::time::timeout(self.feedback_timeout + Duration::from_secs(1), send).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err((error, _))) => Err(FeedbackError::Kafka(error)),
            Err(_) => Err(FeedbackError::Timeout(self.feedback_timeout)),
        }
    }
}
