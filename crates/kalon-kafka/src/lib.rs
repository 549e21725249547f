//! Kafka plumbing shared by Kalon's services: client settings, explicit
//! topic creation from the one list in `kalon-events`, and W3C trace context
//! carried in message headers.

pub mod consumer;
pub mod publish;

pub use publish::Publisher;

use std::collections::HashMap;
use std::time::Duration;

use kalon_events::{TopicSpec, TOPICS};
use opentelemetry::propagation::{Extractor, Injector};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, OwnedHeaders};
use rdkafka::types::RDKafkaErrorCode;
use tracing_opentelemetry::OpenTelemetrySpanExt;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kafka client: {0}")]
    Kafka(#[from] KafkaError),
    #[error("publishing to {topic}: {source}")]
    Publish { topic: String, source: KafkaError },
    #[error("{failed} message(s) not acknowledged by the broker, first: {first}")]
    Delivery { failed: u64, first: String },
    #[error("creating topic {topic}: {code}")]
    CreateTopic {
        topic: String,
        code: RDKafkaErrorCode,
    },
    #[error("the brokers did not say what they are (no cluster id within 5 minutes): are they up? Or choose the membership yourself (group or assign-all)")]
    NoClusterId,
    #[error("a blocking Kafka call failed to finish: {0}")]
    Blocking(String),
    #[error("topic {topic} has no partitions; create it with `kalonctl topics create`")]
    NoPartitions { topic: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Header names on dead-lettered messages, shared by every service that
/// dead-letters (ingest, enricher); defined with the `kalon.deadletter.v1`
/// contract in `kalon-events`.
pub use kalon_events::dead_letter_headers;

/// Where the brokers are and how Kalon's topics are named there.
#[derive(Debug, Clone)]
pub struct KafkaSettings {
    /// `host:port[,host:port...]`
    pub brokers: String,
    /// Prepended to every topic name; empty in production, random in tests.
    pub topic_prefix: String,
}

impl KafkaSettings {
    pub fn new(brokers: impl Into<String>, topic_prefix: impl Into<String>) -> Self {
        KafkaSettings {
            brokers: brokers.into(),
            topic_prefix: topic_prefix.into(),
        }
    }

    /// Client settings every Kalon client starts from.
    pub fn client_config(&self, client_id: &str) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.brokers)
            .set("client.id", client_id)
            .set("socket.keepalive.enable", "true")
            .set("reconnect.backoff.max.ms", "2000");
        // librdkafka's own debug contexts (e.g. `cgrp,fetch`), for diagnosis
        if let Ok(debug) = std::env::var("KALON_KAFKA_DEBUG") {
            config.set("debug", debug);
        }
        config
    }

    pub fn topic(&self, name: &str) -> String {
        format!("{}{name}", self.topic_prefix)
    }

    /// The topics of the search events (impressions, clicks, ratings), with
    /// the prefix: what ingest consumes.
    pub fn event_topics(&self) -> Vec<String> {
        kalon_events::EventKind::ALL
            .iter()
            .map(|k| self.topic(k.topic()))
            .collect()
    }
}

/// Creates every topic of [`TOPICS`] (with the prefix) that does not exist.
pub async fn create_topics(settings: &KafkaSettings) -> Result<Vec<String>> {
    create_topic_specs(settings, TOPICS).await
}

/// Creates the given topics; existing ones are left alone. Returns the
/// names that were created.
pub async fn create_topic_specs(
    settings: &KafkaSettings,
    specs: &[TopicSpec],
) -> Result<Vec<String>> {
    let admin: AdminClient<DefaultClientContext> =
        settings.client_config("kalon-admin").create()?;
    let names: Vec<String> = specs
        .iter()
        .map(|s| s.full_name(&settings.topic_prefix))
        .collect();
    let topics: Vec<NewTopic> = specs
        .iter()
        .zip(&names)
        .map(|(spec, name)| NewTopic::new(name, spec.partitions, TopicReplication::Fixed(1)))
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let mut created = Vec::new();
    for outcome in admin.create_topics(&topics, &options).await? {
        match outcome {
            Ok(name) => created.push(name),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => return Err(Error::CreateTopic { topic, code }),
        }
    }
    Ok(created)
}

struct HeaderMap<'a>(&'a mut HashMap<String, String>);

impl Injector for HeaderMap<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_owned(), value);
    }
}

/// Message headers from (name, value) pairs, in order: a contract's header
/// set (`DeadLetterHeaders::to_headers`, `EnrichDeadLetter::headers`).
pub fn headers_from(pairs: &[(&str, String)]) -> OwnedHeaders {
    pairs.iter().fold(
        OwnedHeaders::new_with_capacity(pairs.len()),
        |headers, (key, value)| {
            headers.insert(rdkafka::message::Header {
                key,
                value: Some(value.as_str()),
            })
        },
    )
}

/// Adds the current span's trace context (`traceparent`, `tracestate`) to
/// `headers`. Without an active trace nothing is added.
pub fn inject_trace(headers: OwnedHeaders) -> OwnedHeaders {
    inject_context(headers, &tracing::Span::current().context())
}

/// Adds the given trace context to `headers` (nothing when it holds no
/// valid span).
pub fn inject_context(mut headers: OwnedHeaders, context: &opentelemetry::Context) -> OwnedHeaders {
    let mut carrier = HashMap::new();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(context, &mut HeaderMap(&mut carrier))
    });
    for (key, value) in &carrier {
        headers = headers.insert(rdkafka::message::Header {
            key,
            value: Some(value.as_bytes()),
        });
    }
    headers
}

struct KafkaHeaders<'a, H: Headers>(&'a H);

impl<H: Headers> Extractor for KafkaHeaders<'_, H> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|h| h.key == key)
            .and_then(|h| h.value)
            .and_then(|v| std::str::from_utf8(v).ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|h| h.key).collect()
    }
}

/// The trace context a message carries, if any.
pub fn extract_trace<H: Headers>(headers: Option<&H>) -> Option<opentelemetry::Context> {
    use opentelemetry::trace::TraceContextExt;
    let headers = headers?;
    let context =
        opentelemetry::global::get_text_map_propagator(|p| p.extract(&KafkaHeaders(headers)));
    context.span().span_context().is_valid().then_some(context)
}

/// One message to produce.
pub struct Outgoing {
    pub topic: String,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: Option<OwnedHeaders>,
}

impl Outgoing {
    /// The message a producer puts on the bus for `event`: its kind's
    /// topic, keyed by event id, no headers.
    pub fn event(settings: &KafkaSettings, event: &kalon_events::Event) -> Outgoing {
        Outgoing {
            topic: settings.topic(event.kind().topic()),
            key: Some(event.event_id().as_bytes().to_vec()),
            payload: event.to_json(),
            headers: None,
        }
    }
}

/// Produces every message and waits until the broker acknowledged all of
/// them (acks=all). A retried send may land twice; Kalon's consumers absorb
/// that by event id. (The idempotent producer is not used: tansu 0.6's sqlite
/// engine panics on some of its sequence checks.) Blocking: call it from a thread or
/// `spawn_blocking`. `on_sent` is called with the running count, for
/// progress bars. Returns the number acknowledged.
pub fn produce_all(
    settings: &KafkaSettings,
    messages: impl IntoIterator<Item = Outgoing>,
    mut on_sent: impl FnMut(u64),
) -> Result<u64> {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let producer: BaseProducer<Deliveries> = settings
        .client_config("kalon-producer")
        .set("linger.ms", "20")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "500000")
        .set("compression.type", "none")
        .create_with_context(Deliveries::default())?;
    let mut sent = 0u64;
    for message in messages {
        let mut record = BaseRecord::to(&message.topic).payload(&message.payload);
        if let Some(key) = &message.key {
            record = record.key(key);
        }
        if let Some(headers) = message.headers {
            record = record.headers(headers);
        }
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    producer.poll(Duration::from_millis(10));
                }
                Err((error, _)) => return Err(error.into()),
            }
        }
        sent += 1;
        if sent.is_multiple_of(1000) {
            producer.poll(Duration::ZERO);
            on_sent(sent);
        }
    }
    producer.flush(Duration::from_secs(120))?;
    on_sent(sent);
    let failed = producer
        .context()
        .failed
        .load(std::sync::atomic::Ordering::Relaxed);
    if failed > 0 {
        let first = producer
            .context()
            .first_error
            .lock()
            .map(|e| e.clone())
            .unwrap_or_default();
        return Err(Error::Delivery {
            failed,
            first: first.unwrap_or_default(),
        });
    }
    Ok(sent - failed)
}

/// Counts messages the broker did not acknowledge.
#[derive(Default)]
struct Deliveries {
    failed: std::sync::atomic::AtomicU64,
    first_error: std::sync::Mutex<Option<String>>,
}

impl rdkafka::ClientContext for Deliveries {}

impl rdkafka::producer::ProducerContext for Deliveries {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &rdkafka::message::DeliveryResult<'_>, _: ()) {
        if let Err((error, _)) = result {
            self.failed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if let Ok(mut first) = self.first_error.lock() {
                first.get_or_insert_with(|| error.to_string());
            }
        }
    }
}
