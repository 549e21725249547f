//! Kalon's event contracts.
//!
//! The JSON Schemas under `schemas/` are the contract between producers (the
//! search service, clients) and consumers (ingest, the enricher). This crate
//! holds the matching Rust types, the validation that enforces every
//! constraint of the schemas on decoded events (tests prove the two agree),
//! and the one list of Kafka topics the project creates.

mod event;
pub mod generate;
mod topics;

pub use event::{
    Aspect, Click, DecodeError, Event, EventKind, Impression, Rating, ResultItem, MAX_EVENT_BYTES,
};
pub use topics::{
    TopicSpec, DEAD_LETTER_TOPIC, DEPLOYMENT_TOPIC, ENRICH_DEAD_LETTER_TOPIC, JUDGMENT_TOPIC,
    REPHRASED_TOPIC, TOPICS,
};

/// The JSON Schema text of each event kind, as shipped in `schemas/`.
pub fn schema_text(kind: EventKind) -> &'static str {
    match kind {
        EventKind::Impression => include_str!("../../../schemas/search.impression.v1.json"),
        EventKind::Click => include_str!("../../../schemas/search.click.v1.json"),
        EventKind::Rating => include_str!("../../../schemas/search.rating.v1.json"),
    }
}
