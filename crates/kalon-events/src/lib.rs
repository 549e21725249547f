//! Kalon's event contracts: one typed contract for every Kafka topic.
//!
//! Every topic of [`TOPICS`] has a JSON Schema, `schemas/<topic>.json`
//! (draft 2020-12; [`topic_schema`], [`TopicSpec::schema`]), and a Rust
//! payload type implementing [`TopicPayload`], whose `decode` enforces every
//! constraint of the schema and whose `to_json` is what producers put on the
//! bus. The tests hold the two sides to each other: what Rust serializes
//! validates and decodes back equal, and wrong payloads are refused by both.
//!
//! | topic | type | producer |
//! |---|---|---|
//! | `search.impression.v1` | [`Impression`] | search service |
//! | `search.click.v1` | [`Click`] | clients, search feedback API |
//! | `search.rating.v1` | [`Rating`] | clients, search feedback API |
//! | `kalon.deadletter.v1` | [`DeadLetterHeaders`] | ingest |
//! | `query.rephrased.v1` | [`QueryRephrased`] | enricher |
//! | `lmm.judgment.v1` | [`LmmJudgment`] | enricher's judgment recorder |
//! | `enrich.deadletter.v1` | [`EnrichDeadLetter`] | enricher |
//! | `model.deployment.v1` | [`DeploymentChanged`] | `kalonctl deploy` |
//! | `model.registered.v1` | [`ModelRegistered`] | model registration |
//! | `canary.decision.v1` | [`CanaryDecision`] | canary controller |
//!
//! `kalon.deadletter.v1` forwards the refused message's original key and
//! bytes; its contract is the header set ([`dead_letter_headers`]), which
//! its schema describes as an object of the header values.
//!
//! There is one [`Aspect`] (`aesthetic`, `relevance`) for ratings and LMM
//! judgments; `kalon-llm`'s judge uses it too. Only reading a judgment also
//! accepts HPIR's `accuracy` (a serde alias) for relevance.
//!
//! The search events ([`Event`], [`EventKind`]) are what ingest stores;
//! [`generate`] makes plausible and broken ones for demos, benchmarks and
//! tests. [`TOPICS`] is the one list of Kafka topics the project creates.
//! [`explore`] is search's randomised adjacent swap, recorded in an
//! impression's [`ResultItem::model_rank`]; [`interleave`] is the
//! team-draft interleaving a canary's pages are built with, recorded in
//! [`ResultItem::team`].

mod canary;
mod dead_letter;
mod enrich;
mod event;
pub mod explore;
pub mod generate;
pub mod interleave;
mod model;
mod payload;
mod topics;

pub use canary::{CanaryAction, CanaryDecision, EvidenceKind, MetricEvidence};
pub use dead_letter::{dead_letter_headers, DeadLetterHeaders, DeadLetterReason, MAX_DETAIL_CHARS};
pub use enrich::{
    EnrichDeadLetter, EnrichTask, JudgmentKind, JudgmentOutcome, JudgmentVerdict, LmmJudgment,
    QueryRephrased,
};
pub use event::{
    Aspect, Click, DecodeError, Event, EventKind, Impression, Rating, ResultItem, MAX_EVENT_BYTES,
};
pub use model::{DeploymentChanged, GateOutcome, ModelRegistered};
pub use payload::TopicPayload;
pub use topics::{
    topic_schema, TopicSpec, CANARY_DECISION_TOPIC, DEAD_LETTER_TOPIC, DEPLOYMENT_TOPIC,
    ENRICH_DEAD_LETTER_TOPIC, JUDGMENT_TOPIC, MODEL_REGISTERED_TOPIC, REPHRASED_TOPIC, TOPICS,
};

/// The JSON Schema text of each event kind, as shipped in `schemas/`.
pub fn schema_text(kind: EventKind) -> &'static str {
    topic_schema(kind.topic()).expect("every event kind's topic has a schema")
}
