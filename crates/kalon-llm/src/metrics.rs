//! The LLM client's OpenTelemetry metrics, named once here. Every service
//! that calls a model (enricher, preferences' teacher, trainer, canary)
//! exports them; the OTLP resource says which service it is.

use std::sync::Weak;

use opentelemetry::metrics::{Counter, Histogram};
use opentelemetry::KeyValue;

use crate::client::Completion;

#[derive(Clone)]
pub(crate) struct Metrics {
    /// `kalon.llm.calls{task, outcome}`: calls ended, `ok` or the error's
    /// kind ([`crate::LlmError::kind`]).
    calls: Counter<u64>,
    /// `kalon.llm.call.duration{task, outcome}`: seconds from the first
    /// attempt to the answer or the final error, backoff included.
    duration: Histogram<f64>,
    /// `kalon.llm.tokens{task, kind}`: tokens the endpoint reported, `kind`
    /// `prompt` or `completion`.
    tokens: Counter<u64>,
    /// `kalon.llm.cost.usd{task}`: estimated spend at the configured price.
    cost_usd: Counter<f64>,
    /// `kalon.llm.retries{task}`: attempts retried after a transient error.
    retries: Counter<u64>,
}

impl Metrics {
    pub(crate) fn new() -> Metrics {
        let meter = kalon_telemetry::meter();
        Metrics {
            calls: meter
                .u64_counter("kalon.llm.calls")
                .with_description("LLM calls ended, by task and outcome (ok or the error kind)")
                .build(),
            duration: meter
                .f64_histogram("kalon.llm.call.duration")
                .with_unit("s")
                .with_boundaries(kalon_telemetry::CALL_SECONDS.to_vec())
                .with_description("Time of one LLM call, retries and backoff included")
                .build(),
            tokens: meter
                .u64_counter("kalon.llm.tokens")
                .with_description("Tokens used by LLM calls, by task and kind (prompt, completion)")
                .build(),
            cost_usd: meter
                .f64_counter("kalon.llm.cost.usd")
                .with_description("Estimated LLM spend in US dollars at the configured price")
                .build(),
            retries: meter
                .u64_counter("kalon.llm.retries")
                .with_description("LLM attempts retried after a transient error")
                .build(),
        }
    }

    /// `kalon.llm.breaker_open` (1 while the circuit breaker refuses calls,
    /// probing included) and `kalon.llm.budget.used` (tokens spent in the
    /// last hour), observed from the client while it lives.
    pub(crate) fn observe(client: Weak<crate::client::Inner>) {
        let meter = kalon_telemetry::meter();
        let breaker = client.clone();
        meter
            .u64_observable_gauge("kalon.llm.breaker_open")
            .with_description("1 while the LLM client's circuit breaker refuses calls")
            .with_callback(move |gauge| {
                if let Some(client) = breaker.upgrade() {
                    gauge.observe(u64::from(client.breaker.is_open()), &[]);
                }
            })
            .build();
        meter
            .u64_observable_gauge("kalon.llm.budget.used")
            .with_description("Tokens the LLM client spent in the last hour (the hourly budget)")
            .with_callback(move |gauge| {
                if let Some(client) = client.upgrade() {
                    gauge.observe(client.budget.used(), &[]);
                }
            })
            .build();
    }

    pub(crate) fn succeeded(&self, task: &'static str, completion: &Completion, usd_per_1k: f64) {
        let seconds = completion.latency.as_secs_f64();
        self.ended(task, "ok", seconds);
        let usage = completion.usage;
        for (kind, n) in [
            ("prompt", usage.prompt_tokens),
            ("completion", usage.completion_tokens),
        ] {
            if n > 0 {
                self.tokens.add(
                    n,
                    &[KeyValue::new("task", task), KeyValue::new("kind", kind)],
                );
            }
        }
        let cost = completion.cost_usd(usd_per_1k);
        if cost > 0.0 {
            self.cost_usd.add(cost, &[KeyValue::new("task", task)]);
        }
    }

    pub(crate) fn ended(&self, task: &'static str, outcome: &'static str, seconds: f64) {
        let attributes = [
            KeyValue::new("task", task),
            KeyValue::new("outcome", outcome),
        ];
        self.calls.add(1, &attributes);
        self.duration.record(seconds, &attributes);
    }

    pub(crate) fn retried(&self, task: &'static str) {
        self.retries.add(1, &[KeyValue::new("task", task)]);
    }
}
