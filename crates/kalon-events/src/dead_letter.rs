//! `kalon.deadletter.v1`: what ingest could not accept.
//!
//! A dead letter is the refused message itself, its ORIGINAL key and
//! payload bytes unchanged (they may not be JSON at all), with why and where
//! it came from in Kafka headers. The contract of the topic is therefore its
//! header set: [`DeadLetterHeaders`], and `schemas/kalon.deadletter.v1.json`
//! describes it as a JSON object of those header values (every value a
//! UTF-8 string, as in the headers).

use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::event::at_most;
use crate::payload::TopicPayload;
use crate::topics::DEAD_LETTER_TOPIC;
use crate::DecodeError;

/// Header names on dead-lettered messages (ingest's `kalon.deadletter.v1`;
/// the enricher's `enrich.deadletter.v1` uses the first two).
pub mod dead_letter_headers {
    /// Machine-readable class of the failure.
    pub const REASON: &str = "kalon-dlq-reason";
    /// Human-readable detail (the parser's or the database's message).
    pub const DETAIL: &str = "kalon-dlq-detail";
    /// The topic the message was read from (with the deployment prefix).
    pub const SOURCE_TOPIC: &str = "kalon-source-topic";
    /// Its partition there, in decimal.
    pub const SOURCE_PARTITION: &str = "kalon-source-partition";
    /// Its offset there, in decimal.
    pub const SOURCE_OFFSET: &str = "kalon-source-offset";

    /// Every header of the `kalon.deadletter.v1` contract, in the order
    /// ingest writes them.
    pub const ALL: [&str; 5] = [
        REASON,
        DETAIL,
        SOURCE_TOPIC,
        SOURCE_PARTITION,
        SOURCE_OFFSET,
    ];
}

use dead_letter_headers as names;

/// Longest `kalon-dlq-detail`; longer details are cut to it.
pub const MAX_DETAIL_CHARS: usize = 1000;

/// Why ingest refused a message (`kalon-dlq-reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeadLetterReason {
    /// Over [`crate::MAX_EVENT_BYTES`].
    Oversized,
    /// Not JSON (or not UTF-8).
    BadJson,
    /// JSON that does not match the topic's schema.
    SchemaViolation,
    /// Read from a topic that has no event kind.
    UnknownTopic,
    /// Valid, but the database refused the row.
    RejectedByDatabase,
}

impl DeadLetterReason {
    pub const ALL: [DeadLetterReason; 5] = [
        DeadLetterReason::Oversized,
        DeadLetterReason::BadJson,
        DeadLetterReason::SchemaViolation,
        DeadLetterReason::UnknownTopic,
        DeadLetterReason::RejectedByDatabase,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterReason::Oversized => "oversized",
            DeadLetterReason::BadJson => "bad_json",
            DeadLetterReason::SchemaViolation => "schema_violation",
            DeadLetterReason::UnknownTopic => "unknown_topic",
            DeadLetterReason::RejectedByDatabase => "rejected_by_database",
        }
    }
}

impl std::fmt::Display for DeadLetterReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DeadLetterReason {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        DeadLetterReason::ALL
            .into_iter()
            .find(|r| r.as_str() == text)
            .ok_or_else(|| format!("unknown dead-letter reason {text:?}"))
    }
}

/// The headers of one `kalon.deadletter.v1` message. Its JSON form (the
/// schema's) is an object keyed by the header names, every value a string.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeadLetterHeaders {
    #[serde(rename = "kalon-dlq-reason")]
    pub reason: DeadLetterReason,
    /// At most [`MAX_DETAIL_CHARS`] characters.
    #[serde(rename = "kalon-dlq-detail")]
    pub detail: String,
    #[serde(rename = "kalon-source-topic")]
    pub source_topic: String,
    /// In 0..=999999999, written in decimal.
    #[serde(rename = "kalon-source-partition", with = "decimal")]
    pub source_partition: i32,
    /// In 0..=999999999999999999, written in decimal.
    #[serde(rename = "kalon-source-offset", with = "decimal")]
    pub source_offset: i64,
}

impl DeadLetterHeaders {
    /// The headers for a message refused at `topic`/`partition`/`offset`;
    /// `detail` is cut to [`MAX_DETAIL_CHARS`] characters.
    pub fn new(
        reason: DeadLetterReason,
        detail: &str,
        topic: &str,
        partition: i32,
        offset: i64,
    ) -> Self {
        DeadLetterHeaders {
            reason,
            detail: detail.chars().take(MAX_DETAIL_CHARS).collect(),
            source_topic: topic.to_owned(),
            source_partition: partition,
            source_offset: offset,
        }
    }

    /// Header name and value pairs, in the order of [`dead_letter_headers::ALL`].
    pub fn to_headers(&self) -> [(&'static str, String); 5] {
        [
            (names::REASON, self.reason.as_str().to_owned()),
            (names::DETAIL, self.detail.clone()),
            (names::SOURCE_TOPIC, self.source_topic.clone()),
            (names::SOURCE_PARTITION, self.source_partition.to_string()),
            (names::SOURCE_OFFSET, self.source_offset.to_string()),
        ]
    }

    /// Reads the contract's headers from a message's headers (name, value).
    /// Other headers (trace context, say) are not part of the contract and
    /// are passed over; each of the five must be there once, valid.
    pub fn from_headers<'a>(
        headers: impl IntoIterator<Item = (&'a str, Option<&'a [u8]>)>,
    ) -> Result<Self, DecodeError> {
        let mut object = serde_json::Map::new();
        for (key, value) in headers {
            if !names::ALL.contains(&key) {
                continue;
            }
            let value =
                value.ok_or_else(|| DecodeError::Schema(format!("header {key} has no value")))?;
            let value = std::str::from_utf8(value)
                .map_err(|_| DecodeError::Schema(format!("header {key} is not UTF-8")))?;
            if object.insert(key.to_owned(), value.into()).is_some() {
                return Err(DecodeError::Schema(format!("header {key} appears twice")));
            }
        }
        let headers: DeadLetterHeaders = serde_json::from_value(object.into())?;
        headers.validate().map_err(DecodeError::Schema)?;
        Ok(headers)
    }
}

impl TopicPayload for DeadLetterHeaders {
    const TOPIC: &'static str = DEAD_LETTER_TOPIC;

    fn validate(&self) -> Result<(), String> {
        at_most("kalon-dlq-detail", &self.detail, MAX_DETAIL_CHARS)?;
        let topic = &self.source_topic;
        if !((1..=249).contains(&topic.len())
            && topic
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')))
        {
            return Err(format!(
                "kalon-source-topic {topic:?} is not a Kafka topic name"
            ));
        }
        if !(0..=decimal::MAX_PARTITION).contains(&self.source_partition) {
            return Err(format!(
                "kalon-source-partition {} is not in 0..={}",
                self.source_partition,
                decimal::MAX_PARTITION
            ));
        }
        if !(0..=decimal::MAX_OFFSET).contains(&self.source_offset) {
            return Err(format!(
                "kalon-source-offset {} is not in 0..={}",
                self.source_offset,
                decimal::MAX_OFFSET
            ));
        }
        Ok(())
    }
}

/// Non-negative integers as header text: decimal digits, no sign, no
/// leading zero (`^(0|[1-9][0-9]*)$`, bounded in length as the schema is).
mod decimal {
    use super::*;

    pub const MAX_PARTITION: i32 = 999_999_999;
    pub const MAX_OFFSET: i64 = 999_999_999_999_999_999;

    pub fn serialize<S: Serializer, T: std::fmt::Display>(n: &T, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(n)
    }

    pub fn deserialize<'de, D, T>(d: D) -> Result<T, D::Error>
    where
        D: Deserializer<'de>,
        T: FromStr,
    {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        let canonical = !text.is_empty()
            && text.bytes().all(|b| b.is_ascii_digit())
            && (text.len() == 1 || !text.starts_with('0'));
        canonical
            .then(|| text.parse().ok())
            .flatten()
            .ok_or_else(|| serde::de::Error::custom(format!("{text:?} is not a decimal number")))
    }
}
