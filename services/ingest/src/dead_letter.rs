//! Dead letters: what ingest cannot accept, with why and where it came from.

use rdkafka::message::{Header, OwnedHeaders};

/// Header names on dead-lettered messages (ingest's reasons: `oversized`,
/// `bad_json`, `schema_violation`, `unknown_topic`, `rejected_by_database`).
pub use kalon_kafka::dead_letter_headers as headers;

/// One refused message, with its original payload and key.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub reason: &'static str,
    pub detail: String,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
}

impl DeadLetter {
    pub fn headers(&self) -> OwnedHeaders {
        let detail: String = self.detail.chars().take(1000).collect();
        let partition = self.partition.to_string();
        let offset = self.offset.to_string();
        OwnedHeaders::new_with_capacity(5)
            .insert(Header {
                key: headers::REASON,
                value: Some(self.reason),
            })
            .insert(Header {
                key: headers::DETAIL,
                value: Some(&detail),
            })
            .insert(Header {
                key: headers::SOURCE_TOPIC,
                value: Some(&self.topic),
            })
            .insert(Header {
                key: headers::SOURCE_PARTITION,
                value: Some(&partition),
            })
            .insert(Header {
                key: headers::SOURCE_OFFSET,
                value: Some(&offset),
            })
    }
}
