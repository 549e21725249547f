//! Dead letters: what ingest cannot accept, with why and where it came from.

use kalon_events::{DeadLetterHeaders, DeadLetterReason};
use rdkafka::message::OwnedHeaders;

/// Header names on dead-lettered messages (ingest's reasons: `oversized`,
/// `bad_json`, `schema_violation`, `unknown_topic`, `rejected_by_database`).
pub use kalon_kafka::dead_letter_headers as headers;

/// One refused message, with its original payload and key.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub reason: DeadLetterReason,
    pub detail: String,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
}

impl DeadLetter {
    /// The `kalon.deadletter.v1` contract of this dead letter (the detail
    /// cut to 1000 characters).
    pub fn contract(&self) -> DeadLetterHeaders {
        DeadLetterHeaders::new(
            self.reason,
            &self.detail,
            &self.topic,
            self.partition,
            self.offset,
        )
    }

    pub fn headers(&self) -> OwnedHeaders {
        kalon_kafka::headers_from(&self.contract().to_headers())
    }
}
