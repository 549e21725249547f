//! The enricher's OpenTelemetry metrics, named once here. The LLM calls
//! themselves are counted by the client (`kalon.llm.*`).

use opentelemetry::metrics::{Counter, Gauge};
use opentelemetry::KeyValue;

#[derive(Clone)]
pub(crate) struct Metrics {
    /// `kalon.enricher.impressions{outcome}`: impressions read, `queued`
    /// (their query is in the queue) or `skipped` (no query, not valid).
    impressions: Counter<u64>,
    /// `kalon.enricher.rephrasings{variant}`: rephrasings stored.
    rephrasings: Counter<u64>,
    /// `kalon.enricher.queries{outcome}`: claimed queries that ended
    /// `enriched` (published) or `postponed` (the LLM or a store failed).
    queries: Counter<u64>,
    /// `kalon.enricher.malformed{task}`: model answers that did not parse
    /// (each is stored in `llm_malformed`).
    malformed: Counter<u64>,
    /// `kalon.enricher.dead_letters{task}`: questions whose strict retry
    /// failed too, sent to `enrich.deadletter.v1`.
    dead_letters: Counter<u64>,
    /// `kalon.enricher.judgments{kind, aspect}`: LMM judgments stored.
    judgments: Counter<u64>,
    /// `kalon.enricher.queue{state}`: queries in `enrich_queries` waiting
    /// to be asked, `pending` (never failed) or `retrying` (postponed after
    /// a failure, `last_error` set).
    queue: Gauge<u64>,
}

impl Metrics {
    pub(crate) fn new() -> Metrics {
        let meter = kalon_telemetry::meter();
        Metrics {
            impressions: meter
                .u64_counter("kalon.enricher.impressions")
                .with_description("Impressions read by the enricher, by outcome (queued, skipped)")
                .build(),
            rephrasings: meter
                .u64_counter("kalon.enricher.rephrasings")
                .with_description("Query rephrasings stored, by prompt variant")
                .build(),
            queries: meter
                .u64_counter("kalon.enricher.queries")
                .with_description("Claimed queries by outcome (enriched, postponed)")
                .build(),
            malformed: meter
                .u64_counter("kalon.enricher.malformed")
                .with_description("Model answers that did not parse, by task")
                .build(),
            dead_letters: meter
                .u64_counter("kalon.enricher.dead_letters")
                .with_description("Questions dead-lettered after the strict retry, by task")
                .build(),
            judgments: meter
                .u64_counter("kalon.enricher.judgments")
                .with_description("LMM judgments stored, by kind (compare, score) and aspect")
                .build(),
            queue: meter
                .u64_gauge("kalon.enricher.queue")
                .with_description("Queries waiting to be asked, by state (pending, retrying)")
                .build(),
        }
    }

    pub(crate) fn impressions(&self, outcome: &'static str, n: u64) {
        if n > 0 {
            self.impressions
                .add(n, &[KeyValue::new("outcome", outcome)]);
        }
    }

    pub(crate) fn rephrasing(&self, variant: &'static str) {
        self.rephrasings
            .add(1, &[KeyValue::new("variant", variant)]);
    }

    pub(crate) fn query(&self, outcome: &'static str) {
        self.queries.add(1, &[KeyValue::new("outcome", outcome)]);
    }

    pub(crate) fn malformed(&self, task: &'static str, n: usize) {
        if n > 0 {
            self.malformed.add(n as u64, &[KeyValue::new("task", task)]);
        }
    }

    pub(crate) fn dead_letter(&self, task: &'static str) {
        self.dead_letters.add(1, &[KeyValue::new("task", task)]);
    }

    pub(crate) fn judgment(&self, kind: &'static str, aspect: &'static str) {
        self.judgments.add(
            1,
            &[KeyValue::new("kind", kind), KeyValue::new("aspect", aspect)],
        );
    }

    pub(crate) fn queue(&self, pending: u64, retrying: u64) {
        self.queue
            .record(pending, &[KeyValue::new("state", "pending")]);
        self.queue
            .record(retrying, &[KeyValue::new("state", "retrying")]);
    }
}
