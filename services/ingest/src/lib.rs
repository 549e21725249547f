//! Kalon ingest: consumes the search event topics and lands every event in
//! Postgres exactly once in effect.
//!
//! - One consumer group over the impression, click and rating topics.
//! - Messages are gathered into batches (size or linger bound), decoded and
//!   validated against the event contracts; each batch is written in one
//!   transaction, duplicates (redeliveries) ignored by event id.
//! - Offsets are committed only after the batch's transaction committed and
//!   its dead letters were acknowledged by the broker, in batch order.
//! - Invalid events (bad JSON, schema violation, oversized, refused by the
//!   database) go to the dead-letter topic with headers naming the reason and
//!   the source topic/partition/offset; their partition keeps flowing.
//! - Postgres or the broker down: the batch is retried with backoff, nothing
//!   is committed, nothing is lost. Shutdown: finish in-flight batches,
//!   commit, exit.

pub mod cli;
mod config;
mod dead_letter;
mod metrics;
mod pipeline;
mod store;

pub use config::{IngestConfig, IngestConsumer};
pub use dead_letter::{headers as dead_letter_headers, DeadLetter};
pub use pipeline::{Ingest, IngestReport};
pub use store::{is_transient, Rows, Written};
