//! Ingest's metrics, named once here.

use kalon_kafka::consumer::ConsumerHealth;
use opentelemetry::metrics::{Counter, Histogram};
use opentelemetry::KeyValue;

#[derive(Clone)]
pub struct Metrics {
    /// `kalon.ingest.events`: events handled, by topic and outcome
    /// (`written`, `duplicate`, `dead_letter`).
    events: Counter<u64>,
    /// `kalon.ingest.batch.size`: events per batch.
    batch_size: Histogram<u64>,
    /// `kalon.ingest.commit.duration`: seconds from batch start of write to
    /// database commit.
    commit_seconds: Histogram<f64>,
    /// `kalon.ingest.dead_letters`: dead letters by reason.
    dead_letters: Counter<u64>,
}

impl Metrics {
    /// `kalon.ingest.consumer.lag` is observed from `health`: the group's
    /// committed offsets against every partition's high watermark.
    pub fn new(health: tokio::sync::watch::Receiver<ConsumerHealth>) -> Self {
        let meter = kalon_telemetry::meter();
        meter
            .i64_observable_gauge("kalon.ingest.consumer.lag")
            .with_description(
                "events between the group's committed offsets and the end of every event partition",
            )
            .with_callback(move |gauge| {
                if let Some(lag) = health.borrow().lag {
                    gauge.observe(lag.messages, &[]);
                }
            })
            .build();
        Metrics {
            events: meter
                .u64_counter("kalon.ingest.events")
                .with_description("events handled by ingest")
                .build(),
            batch_size: meter
                .u64_histogram("kalon.ingest.batch.size")
                .with_description("events per batch")
                .build(),
            commit_seconds: meter
                .f64_histogram("kalon.ingest.commit.duration")
                .with_unit("s")
                .with_boundaries(kalon_telemetry::REQUEST_SECONDS.to_vec())
                .with_description("time to write and commit one batch")
                .build(),
            dead_letters: meter
                .u64_counter("kalon.ingest.dead_letters")
                .with_description("events sent to the dead-letter topic")
                .build(),
        }
    }

    pub fn events(&self, kind: &'static str, outcome: &'static str, n: u64) {
        if n > 0 {
            self.events.add(
                n,
                &[
                    KeyValue::new("kind", kind),
                    KeyValue::new("outcome", outcome),
                ],
            );
        }
    }

    pub fn batch(&self, size: usize, seconds: f64) {
        self.batch_size.record(size as u64, &[]);
        self.commit_seconds.record(seconds, &[]);
    }

    pub fn dead_letter(&self, reason: &'static str) {
        self.dead_letters.add(1, &[KeyValue::new("reason", reason)]);
    }
}
