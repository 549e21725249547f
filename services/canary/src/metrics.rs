//! The canary controller's OpenTelemetry metrics, named once here. The
//! LMM judge's calls are also counted by the LLM client (`kalon.llm.*`).

use opentelemetry::metrics::{Counter, Gauge};
use opentelemetry::KeyValue;

#[derive(Clone)]
pub(crate) struct Metrics {
    /// `kalon.canary.decisions{action, automatic}`: decisions published on
    /// `canary.decision.v1` (the controller's and operators' alike, each
    /// once, when the leader's outbox sends it).
    decisions: Counter<u64>,
    /// `kalon.canary.share`: the in-flight candidate's share of traffic
    /// (0 with no canary in flight), as the leader applies it.
    share: Gauge<f64>,
    /// `kalon.canary.finished{outcome}`: canaries whose end was applied,
    /// `promoted`, `rolled_back` or `superseded`.
    finished: Counter<u64>,
    /// `kalon.canary.lmm.tokens{aspect}`: tokens the LMM judge spent.
    lmm_tokens: Counter<u64>,
    /// `kalon.canary.lmm.verdicts{aspect, verdict}`: the judge's verdicts
    /// on the candidate's row against the stable's (`win`, `loss`,
    /// `similar`; identical rows are `similar` without a call).
    lmm_verdicts: Counter<u64>,
}

impl Metrics {
    pub(crate) fn new() -> Metrics {
        let meter = kalon_telemetry::meter();
        Metrics {
            decisions: meter
                .u64_counter("kalon.canary.decisions")
                .with_description("Canary decisions published, by action and whether automatic")
                .build(),
            share: meter
                .f64_gauge("kalon.canary.share")
                .with_description("The in-flight candidate's share of traffic (0 when none)")
                .build(),
            finished: meter
                .u64_counter("kalon.canary.finished")
                .with_description("Canaries ended and applied, by outcome")
                .build(),
            lmm_tokens: meter
                .u64_counter("kalon.canary.lmm.tokens")
                .with_description("Tokens the LMM judge spent on canary queries, by aspect")
                .build(),
            lmm_verdicts: meter
                .u64_counter("kalon.canary.lmm.verdicts")
                .with_description(
                    "The LMM judge's verdicts on the candidate, by aspect and verdict",
                )
                .build(),
        }
    }

    pub(crate) fn decision(&self, action: &'static str, automatic: bool) {
        self.decisions.add(
            1,
            &[
                KeyValue::new("action", action),
                KeyValue::new("automatic", automatic),
            ],
        );
    }

    pub(crate) fn share(&self, share: f64) {
        self.share.record(share, &[]);
    }

    pub(crate) fn finished(&self, outcome: &'static str) {
        self.finished.add(1, &[KeyValue::new("outcome", outcome)]);
    }

    pub(crate) fn lmm_judged(&self, aspect: &'static str, verdict: &'static str, tokens: u64) {
        self.lmm_verdicts.add(
            1,
            &[
                KeyValue::new("aspect", aspect),
                KeyValue::new("verdict", verdict),
            ],
        );
        if tokens > 0 {
            self.lmm_tokens
                .add(tokens, &[KeyValue::new("aspect", aspect)]);
        }
    }
}
