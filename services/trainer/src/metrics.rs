//! The trainer's OpenTelemetry metrics.

use opentelemetry::metrics::{Counter, Gauge, Histogram};
use opentelemetry::KeyValue;

#[derive(Clone)]
pub(crate) struct Metrics {
    /// `kalon.trainer.runs{outcome}`: runs ended, by how.
    runs: Counter<u64>,
    /// `kalon.trainer.loss`: the running run's latest training loss.
    loss: Gauge<f64>,
    /// `kalon.trainer.step`: the running run's latest step.
    step: Gauge<u64>,
    /// `kalon.trainer.phase.duration{phase}`: seconds per run phase.
    phase: Histogram<f64>,
}

impl Metrics {
    pub(crate) fn new() -> Metrics {
        let meter = kalon_telemetry::meter();
        Metrics {
            runs: meter
                .u64_counter("kalon.trainer.runs")
                .with_description("Training runs ended, by outcome")
                .build(),
            loss: meter
                .f64_gauge("kalon.trainer.loss")
                .with_description("The running training run's latest loss")
                .build(),
            step: meter
                .u64_gauge("kalon.trainer.step")
                .with_description("The running training run's latest step")
                .build(),
            phase: meter
                .f64_histogram("kalon.trainer.phase.duration")
                .with_unit("s")
                .with_boundaries(kalon_telemetry::JOB_SECONDS.to_vec())
                .with_description("Seconds per training run phase")
                .build(),
        }
    }

    pub(crate) fn run_ended(&self, outcome: &'static str) {
        self.runs.add(1, &[KeyValue::new("outcome", outcome)]);
    }

    pub(crate) fn step(&self, step: u64, loss: f64) {
        self.step.record(step, &[]);
        self.loss.record(loss, &[]);
    }

    pub(crate) fn phase(&self, phase: &'static str, seconds: f64) {
        self.phase.record(seconds, &[KeyValue::new("phase", phase)]);
    }
}
