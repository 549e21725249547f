//! The preference builder's OpenTelemetry metrics.

use opentelemetry::metrics::{Counter, Gauge};
use opentelemetry::KeyValue;

#[derive(Clone)]
pub(crate) struct Metrics {
    /// `kalon.preferences.pairs{source}`: new pairs stored.
    pairs: Counter<u64>,
    /// `kalon.preferences.inputs{source}`: inputs consumed (clicks, ratings,
    /// judgments, D_po queries).
    inputs: Counter<u64>,
    /// `kalon.preferences.refused{source, reason}`: inputs refused, by reason
    /// (unmatched clicks are `impression_never_arrived`).
    refused: Counter<u64>,
    /// `kalon.preferences.waiting_clicks`: clicks past the quiet time whose
    /// list is not closed yet (its impression missing, or clicked again).
    waiting: Gauge<u64>,
    /// `kalon.preferences.join_lag`: seconds from the arrival of the oldest
    /// of those clicks to now.
    join_lag: Gauge<f64>,
    /// `kalon.preferences.dpo_pending`: rephrased queries waiting for D_po.
    dpo_pending: Gauge<u64>,
    /// `kalon.preferences.propensity{rank}`: the examination propensity
    /// click pairs are weighted with (relative to rank 1).
    propensity: Gauge<f64>,
    /// `kalon.preferences.teacher_tokens`: tokens the LMM teacher spent.
    teacher_tokens: Gauge<u64>,
}

impl Metrics {
    pub(crate) fn new() -> Metrics {
        let meter = kalon_telemetry::meter();
        Metrics {
            pairs: meter
                .u64_counter("kalon.preferences.pairs")
                .with_description("New preference pairs stored, by source")
                .build(),
            inputs: meter
                .u64_counter("kalon.preferences.inputs")
                .with_description("Inputs consumed by the preference builder, by source")
                .build(),
            refused: meter
                .u64_counter("kalon.preferences.refused")
                .with_description("Inputs refused by the preference builder, by source and reason")
                .build(),
            waiting: meter
                .u64_gauge("kalon.preferences.waiting_clicks")
                .with_description("Clicks past the quiet time whose result list is not closed yet")
                .build(),
            join_lag: meter
                .f64_gauge("kalon.preferences.join_lag")
                .with_unit("s")
                .with_description(
                    "Age of the oldest click past the quiet time still waiting for its list",
                )
                .build(),
            dpo_pending: meter
                .u64_gauge("kalon.preferences.dpo_pending")
                .with_description("Rephrased queries waiting for D_po")
                .build(),
            propensity: meter
                .f64_gauge("kalon.preferences.propensity")
                .with_description("Estimated examination propensity by rank, relative to rank 1")
                .build(),
            teacher_tokens: meter
                .u64_gauge("kalon.preferences.teacher_tokens")
                .with_description("Tokens the D_po teacher (LMM judge) spent since start")
                .build(),
        }
    }

    pub(crate) fn pairs(&self, source: &'static str, new: u64) {
        self.pairs.add(new, &[KeyValue::new("source", source)]);
    }

    pub(crate) fn inputs(&self, source: &'static str, count: u64) {
        self.inputs.add(count, &[KeyValue::new("source", source)]);
    }

    pub(crate) fn refused(&self, source: &'static str, reason: &str, count: u64) {
        self.refused.add(
            count,
            &[
                KeyValue::new("source", source),
                KeyValue::new("reason", reason.to_owned()),
            ],
        );
    }

    pub(crate) fn waiting(&self, clicks: u64, lag_s: f64) {
        self.waiting.record(clicks, &[]);
        self.join_lag.record(lag_s, &[]);
    }

    pub(crate) fn dpo_pending(&self, pending: u64) {
        self.dpo_pending.record(pending, &[]);
    }

    pub(crate) fn propensity(&self, rank: u32, value: f64) {
        self.propensity
            .record(value, &[KeyValue::new("rank", i64::from(rank))]);
    }

    pub(crate) fn teacher_tokens(&self, tokens: u64) {
        self.teacher_tokens.record(tokens, &[]);
    }
}
