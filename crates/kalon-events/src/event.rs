//! Event types and their validation.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

use crate::dead_letter::DeadLetterReason;
use crate::payload::{check_envelope, TopicPayload};

/// Largest serialized event ingest accepts; larger ones are dead-lettered.
pub const MAX_EVENT_BYTES: usize = 256 * 1024;

/// The kinds of event on the bus, one topic and one schema each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    Impression,
    Click,
    Rating,
}

impl EventKind {
    pub const ALL: [EventKind; 3] = [EventKind::Impression, EventKind::Click, EventKind::Rating];

    /// Schema name, which is also the topic name (without prefix).
    pub const fn topic(self) -> &'static str {
        match self {
            EventKind::Impression => "search.impression.v1",
            EventKind::Click => "search.click.v1",
            EventKind::Rating => "search.rating.v1",
        }
    }

    /// Position in [`EventKind::ALL`], for per-kind arrays.
    pub const fn index(self) -> usize {
        match self {
            EventKind::Impression => 0,
            EventKind::Click => 1,
            EventKind::Rating => 2,
        }
    }

    /// The Postgres table ingest writes this kind into.
    pub const fn table(self) -> &'static str {
        match self {
            EventKind::Impression => "impressions",
            EventKind::Click => "clicks",
            EventKind::Rating => "ratings",
        }
    }

    /// The kind whose topic is `topic` once `prefix` is stripped.
    pub fn from_topic(prefix: &str, topic: &str) -> Option<EventKind> {
        let name = topic.strip_prefix(prefix)?;
        EventKind::ALL.into_iter().find(|k| k.topic() == name)
    }
}

/// Why a payload is not a valid event. `reason()` names the class for the
/// dead-letter headers; `Display` gives the detail.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("event is {size} bytes, more than the {max} allowed")]
    Oversized { size: usize, max: usize },
    #[error("payload is not JSON: {0}")]
    BadJson(serde_json::Error),
    #[error("event does not match its schema: {0}")]
    Schema(String),
}

impl DecodeError {
    /// The class for the dead-letter headers: `oversized`, `bad_json` or
    /// `schema_violation`.
    pub fn class(&self) -> DeadLetterReason {
        match self {
            DecodeError::Oversized { .. } => DeadLetterReason::Oversized,
            DecodeError::BadJson(_) => DeadLetterReason::BadJson,
            DecodeError::Schema(_) => DeadLetterReason::SchemaViolation,
        }
    }

    /// Short machine-readable class: `oversized`, `bad_json`, `schema_violation`.
    pub fn reason(&self) -> &'static str {
        self.class().as_str()
    }
}

impl From<serde_json::Error> for DecodeError {
    fn from(error: serde_json::Error) -> Self {
        match error.classify() {
            serde_json::error::Category::Data => DecodeError::Schema(error.to_string()),
            _ => DecodeError::BadJson(error),
        }
    }
}

/// One result of an impression.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResultItem {
    pub image_id: String,
    /// 1-based position the person was shown.
    pub rank: u32,
    pub score: f64,
    /// The rank the model gave this result, present only where an
    /// exploration swap ([`crate::explore`]) showed it elsewhere: the
    /// randomised intervention position-bias estimation harvests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_rank: Option<u32>,
    /// Present only on an interleaved page ([`crate::interleave`]): the
    /// ranking that drafted this result, `stable` or `candidate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub team: Option<crate::interleave::Team>,
}

/// `search.impression.v1`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Impression {
    #[serde(with = "strict_uuid")]
    pub event_id: Uuid,
    #[serde(with = "rfc3339")]
    pub occurred_at: DateTime<Utc>,
    pub request_id: String,
    pub session_id: String,
    /// Pseudonymous; never an e-mail or a name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    pub query: String,
    pub model_version: String,
    pub variant: String,
    pub results: Vec<ResultItem>,
}

/// `search.click.v1`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Click {
    #[serde(with = "strict_uuid")]
    pub event_id: Uuid,
    #[serde(with = "rfc3339")]
    pub occurred_at: DateTime<Utc>,
    pub request_id: String,
    pub image_id: String,
    pub rank: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dwell_ms: Option<u64>,
}

/// Which quality a rating or an LMM judgment judges: Kalon's one aspect
/// type (the judge in `kalon-llm` uses it too).
///
/// On the wire `aesthetic` or `relevance`, exactly: ratings (and the search
/// service's feedback API) are the public client contract. Only
/// `lmm.judgment.v1` also reads HPIR's `accuracy` as relevance, the name its
/// events carried before the two aspect types became one
/// ([`crate::LmmJudgment`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Aspect {
    Aesthetic,
    /// How well the images show what the query asks for (HPIR's
    /// "accuracy").
    Relevance,
}

impl Aspect {
    /// Both aspects, relevance first (HPIR's order: accuracy, aesthetic).
    pub const ALL: [Aspect; 2] = [Aspect::Relevance, Aspect::Aesthetic];

    /// The name on the wire and in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Aspect::Aesthetic => "aesthetic",
            Aspect::Relevance => "relevance",
        }
    }
}

/// `search.rating.v1`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rating {
    #[serde(with = "strict_uuid")]
    pub event_id: Uuid,
    #[serde(with = "rfc3339")]
    pub occurred_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    pub query: String,
    pub image_id: String,
    pub stars: u8,
    pub aspect: Aspect,
}

/// Any event Kalon ingests.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Impression(Impression),
    Click(Click),
    Rating(Rating),
}

impl Event {
    /// Decodes and validates one payload of the given kind: size, JSON,
    /// shape, then every constraint the schema states.
    pub fn decode(kind: EventKind, payload: &[u8]) -> Result<Event, DecodeError> {
        check_envelope(payload)?;
        let event = match kind {
            EventKind::Impression => Event::Impression(serde_json::from_slice(payload)?),
            EventKind::Click => Event::Click(serde_json::from_slice(payload)?),
            EventKind::Rating => Event::Rating(serde_json::from_slice(payload)?),
        };
        event.validate().map_err(DecodeError::Schema)?;
        Ok(event)
    }

    pub fn kind(&self) -> EventKind {
        match self {
            Event::Impression(_) => EventKind::Impression,
            Event::Click(_) => EventKind::Click,
            Event::Rating(_) => EventKind::Rating,
        }
    }

    pub fn event_id(&self) -> Uuid {
        match self {
            Event::Impression(e) => e.event_id,
            Event::Click(e) => e.event_id,
            Event::Rating(e) => e.event_id,
        }
    }

    /// The serialized form, as producers put it on the bus.
    pub fn to_json(&self) -> Vec<u8> {
        let bytes = match self {
            Event::Impression(e) => serde_json::to_vec(e),
            Event::Click(e) => serde_json::to_vec(e),
            Event::Rating(e) => serde_json::to_vec(e),
        };
        bytes.expect("event types always serialize")
    }

    /// The constraints of the schema that serde's typing does not enforce.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Event::Impression(e) => e.validate(),
            Event::Click(e) => e.validate(),
            Event::Rating(e) => e.validate(),
        }
    }
}

impl TopicPayload for Impression {
    const TOPIC: &'static str = EventKind::Impression.topic();

    fn validate(&self) -> Result<(), String> {
        text("request_id", &self.request_id, 128)?;
        text("session_id", &self.session_id, 128)?;
        if let Some(user) = &self.user_id {
            text("user_id", user, 128)?;
        }
        text("query", &self.query, 1024)?;
        text("model_version", &self.model_version, 128)?;
        text("variant", &self.variant, 64)?;
        if self.results.len() > 1000 {
            return Err(format!(
                "results has {} items, at most 1000",
                self.results.len()
            ));
        }
        for item in &self.results {
            text("results[].image_id", &item.image_id, 256)?;
            rank("results[].rank", item.rank)?;
            if let Some(model_rank) = item.model_rank {
                rank("results[].model_rank", model_rank)?;
            }
        }
        Ok(())
    }
}

impl TopicPayload for Click {
    const TOPIC: &'static str = EventKind::Click.topic();

    fn validate(&self) -> Result<(), String> {
        text("request_id", &self.request_id, 128)?;
        text("image_id", &self.image_id, 256)?;
        rank("rank", self.rank)?;
        match self.dwell_ms {
            Some(ms) if ms > 86_400_000 => Err(format!("dwell_ms {ms} is over one day")),
            _ => Ok(()),
        }
    }
}

impl TopicPayload for Rating {
    const TOPIC: &'static str = EventKind::Rating.topic();

    fn validate(&self) -> Result<(), String> {
        if let Some(request) = &self.request_id {
            text("request_id", request, 128)?;
        }
        text("query", &self.query, 1024)?;
        text("image_id", &self.image_id, 256)?;
        if !(1..=5).contains(&self.stars) {
            return Err(format!("stars {} is not in 1..=5", self.stars));
        }
        Ok(())
    }
}

/// A JSON Schema string of `minLength` 1 and `maxLength` `max_chars`.
pub(crate) fn text(field: &str, value: &str, max_chars: usize) -> Result<(), String> {
    if value.is_empty() {
        return Err(format!("{field} is empty"));
    }
    at_most(field, value, max_chars)
}

pub(crate) fn rank(field: &str, value: u32) -> Result<(), String> {
    if (1..=100_000).contains(&value) {
        Ok(())
    } else {
        Err(format!("{field} {value} is not in 1..=100000"))
    }
}

/// At most `max_chars` code points (JSON Schema's `maxLength`), empty allowed.
pub(crate) fn at_most(field: &str, value: &str, max_chars: usize) -> Result<(), String> {
    // JSON Schema counts code points, not bytes; bytes bound code points
    // from above, so the count is only needed for long values.
    if value.len() > max_chars && value.chars().count() > max_chars {
        return Err(format!("{field} is longer than {max_chars} characters"));
    }
    Ok(())
}

/// UUIDs in the hyphenated form only, as JSON Schema's `uuid` format.
pub(crate) mod strict_uuid {
    use super::*;

    pub fn serialize<S: Serializer>(id: &Uuid, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(id.hyphenated().encode_lower(&mut Uuid::encode_buffer()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Uuid, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        if text.len() != 36 {
            return Err(serde::de::Error::custom(format!(
                "event_id {text:?} is not a hyphenated UUID"
            )));
        }
        Uuid::try_parse(&text).map_err(serde::de::Error::custom)
    }
}

/// RFC 3339 timestamps, strictly (`date-time` in JSON Schema).
pub(crate) mod rfc3339 {
    use super::*;

    pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::AutoSi, true))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        DateTime::parse_from_rfc3339(&text)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|e| serde::de::Error::custom(format!("occurred_at {text:?}: {e}")))
    }
}

/// RFC 3339 timestamps written with exactly six fractional digits (what the
/// enricher has always written); read strictly, any precision.
pub(crate) mod rfc3339_micros {
    use super::*;

    pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::Micros, true))
    }

    pub use super::rfc3339::deserialize;
}
