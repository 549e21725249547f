//! What every topic's payload type has in common.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{DecodeError, MAX_EVENT_BYTES};

/// The Rust side of one topic's JSON Schema (`schemas/<TOPIC>.json`): what
/// it serializes validates against the schema, and [`TopicPayload::decode`]
/// refuses what the schema refuses (the crate's tests hold both to it).
pub trait TopicPayload: Serialize + DeserializeOwned {
    /// The topic, without the deployment prefix; also the schema's title.
    const TOPIC: &'static str;

    /// The constraints of the schema that serde's typing does not enforce
    /// (lengths, ranges, patterns).
    fn validate(&self) -> Result<(), String>;

    /// Decodes and validates one payload: size, JSON, shape, then every
    /// constraint the schema states.
    fn decode(payload: &[u8]) -> Result<Self, DecodeError> {
        check_envelope(payload)?;
        let value: Self = serde_json::from_slice(payload)?;
        value.validate().map_err(DecodeError::Schema)?;
        Ok(value)
    }

    /// The serialized form, as producers put it on the bus.
    fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("payload types always serialize")
    }
}

/// The checks before serde: the size limit, and objects only (serde also
/// reads structs from JSON arrays).
pub(crate) fn check_envelope(payload: &[u8]) -> Result<(), DecodeError> {
    if payload.len() > MAX_EVENT_BYTES {
        return Err(DecodeError::Oversized {
            size: payload.len(),
            max: MAX_EVENT_BYTES,
        });
    }
    match payload.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'[') => Err(DecodeError::Schema(
            "event must be a JSON object, not an array".into(),
        )),
        _ => Ok(()),
    }
}

/// `^[A-Za-z0-9._-]{1,64}$`: a model version or a deployment variant, as
/// the `model_versions` and `deployments` tables check them.
pub(crate) fn name(field: &str, value: &str) -> Result<(), String> {
    if (1..=64).contains(&value.len())
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        Ok(())
    } else {
        Err(format!(
            "{field} {value:?} is not 1-64 characters of A-Z a-z 0-9 . _ -"
        ))
    }
}
