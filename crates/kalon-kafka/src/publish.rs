//! The one publisher every service sends through: a producer with Kalon's
//! settings, each message carrying the current span's W3C trace context in
//! its headers and waited on until the broker acknowledges it.

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::{KafkaSettings, Result};

/// A producer that publishes one acknowledged message at a time (the
/// services' events), with the trace context injected.
#[derive(Clone)]
pub struct Publisher {
    producer: FutureProducer,
    timeout: Duration,
}

impl Publisher {
    /// A publisher with `client_id`, batching for 5 ms, giving up on a
    /// message after `timeout`.
    pub fn new(settings: &KafkaSettings, client_id: &str, timeout: Duration) -> Result<Publisher> {
        Publisher::with_config(settings, client_id, timeout, |_| {})
    }

    /// As [`Publisher::new`], with more producer settings (`tune` runs last).
    pub fn with_config(
        settings: &KafkaSettings,
        client_id: &str,
        timeout: Duration,
        tune: impl FnOnce(&mut ClientConfig),
    ) -> Result<Publisher> {
        let mut config = settings.client_config(client_id);
        config
            .set("linger.ms", "5")
            .set("message.timeout.ms", timeout.as_millis().max(1).to_string());
        tune(&mut config);
        Ok(Publisher {
            producer: config.create()?,
            timeout,
        })
    }

    /// Publishes one message with the current trace context added to
    /// `headers`, and waits for the broker's acknowledgement.
    pub async fn publish(
        &self,
        topic: &str,
        key: &[u8],
        payload: &[u8],
        headers: OwnedHeaders,
    ) -> Result<()> {
        self.publish_record(topic, Some(key), payload, headers)
            .await
    }

    /// [`Publisher::publish`] for a message that may have no key (a dead
    /// letter keeps its original message's, which may be none).
    pub async fn publish_record(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: &[u8],
        headers: OwnedHeaders,
    ) -> Result<()> {
        let mut record = FutureRecord::to(topic)
            .payload(payload)
            .headers(crate::inject_trace(headers));
        if let Some(key) = key {
            record = record.key(key);
        }
        self.producer
            .send(record, self.timeout)
            .await
            .map_err(|(source, _)| crate::Error::Publish {
                topic: topic.to_owned(),
                source,
            })?;
        Ok(())
    }

    /// The producer underneath, for fire-and-forget sends (search's
    /// impressions, whose delivery is confirmed in the background).
    pub fn producer(&self) -> &FutureProducer {
        &self.producer
    }
}
