//! Ingest's metrics, named once here.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

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
    /// Consumer lag summed over assigned partitions, from the client's statistics.
    pub lag: Arc<AtomicI64>,
}

impl Metrics {
    pub fn new() -> Self {
        let meter = kalon_telemetry::meter();
        let lag = Arc::new(AtomicI64::new(-1));
        let observed = lag.clone();
        meter
            .i64_observable_gauge("kalon.ingest.consumer.lag")
            .with_description("messages behind the end of the assigned partitions")
            .with_callback(move |gauge| {
                let lag = observed.load(Ordering::Relaxed);
                if lag >= 0 {
                    gauge.observe(lag, &[]);
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
                .with_description("time to write and commit one batch")
                .build(),
            dead_letters: meter
                .u64_counter("kalon.ingest.dead_letters")
                .with_description("events sent to the dead-letter topic")
                .build(),
            lag,
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
