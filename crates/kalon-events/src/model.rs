//! The model lifecycle's topics: `model.registered.v1` and
//! `model.deployment.v1`.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::event::{rfc3339, strict_uuid, text};
use crate::payload::{name, TopicPayload};
use crate::topics::{DEPLOYMENT_TOPIC, MODEL_REGISTERED_TOPIC};

/// `model.deployment.v1`: a version's traffic weight changed; keyed by the
/// version. The `deployments` table is the truth: search replicas re-read
/// it on any event, whatever it says. The fields, their order and their
/// forms (`variant` written as `null` when withdrawn) are what the search
/// service's `kalonctl deploy` has always serialized.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeploymentChanged {
    #[serde(with = "strict_uuid")]
    pub event_id: Uuid,
    #[serde(with = "rfc3339")]
    pub occurred_at: DateTime<Utc>,
    pub model_version: String,
    /// `None` when the version was taken out of service.
    #[serde(default)]
    pub variant: Option<String>,
    /// Share of traffic relative to the other deployments' weights, in
    /// `[0, 1000000]`; 0 when withdrawn.
    pub weight: f64,
}

impl DeploymentChanged {
    /// A change happening now (`variant` None: taken out of service).
    pub fn now(model_version: &str, variant: Option<&str>, weight: f64) -> Self {
        DeploymentChanged {
            event_id: Uuid::now_v7(),
            occurred_at: Utc::now(),
            model_version: model_version.to_owned(),
            variant: variant.map(str::to_owned),
            weight,
        }
    }
}

impl TopicPayload for DeploymentChanged {
    const TOPIC: &'static str = DEPLOYMENT_TOPIC;

    fn validate(&self) -> Result<(), String> {
        name("model_version", &self.model_version)?;
        if let Some(variant) = &self.variant {
            name("variant", variant)?;
        }
        if !(0.0..=1_000_000.0).contains(&self.weight) {
            return Err(format!("weight {} is not in [0, 1000000]", self.weight));
        }
        Ok(())
    }
}

/// What the quality gate said of a registered version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GateOutcome {
    Passed,
    Failed,
    /// Not evaluated yet.
    Pending,
}

impl GateOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            GateOutcome::Passed => "passed",
            GateOutcome::Failed => "failed",
            GateOutcome::Pending => "pending",
        }
    }
}

/// `model.registered.v1`: a new model version was registered; keyed by the
/// version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelRegistered {
    #[serde(with = "strict_uuid")]
    pub event_id: Uuid,
    #[serde(with = "rfc3339")]
    pub occurred_at: DateTime<Utc>,
    /// The new version's name (`model_versions.version`).
    pub model_version: String,
    /// The version it was derived from, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_version: Option<String>,
    /// The training run that produced it, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training_run_id: Option<String>,
    /// Where the artifact lives: an absolute URI (`file:`, `s3:`, `https:`
    /// ...), printable ASCII.
    pub artifact_uri: String,
    /// SHA-256 of the artifact, 64 lowercase hex digits.
    pub artifact_sha256: String,
    /// Embedding dimension.
    pub dimension: u32,
    pub gate: GateOutcome,
}

impl TopicPayload for ModelRegistered {
    const TOPIC: &'static str = MODEL_REGISTERED_TOPIC;

    fn validate(&self) -> Result<(), String> {
        name("model_version", &self.model_version)?;
        if let Some(parent) = &self.parent_version {
            name("parent_version", parent)?;
        }
        if let Some(run) = &self.training_run_id {
            text("training_run_id", run, 128)?;
        }
        absolute_uri("artifact_uri", &self.artifact_uri)?;
        if !(self.artifact_sha256.len() == 64
            && self
                .artifact_sha256
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
        {
            return Err(format!(
                "artifact_sha256 {:?} is not 64 lowercase hex digits",
                self.artifact_sha256
            ));
        }
        if !(1..=65_536).contains(&self.dimension) {
            return Err(format!("dimension {} is not in 1..=65536", self.dimension));
        }
        Ok(())
    }
}

/// `^[A-Za-z][A-Za-z0-9+.-]*:[!-~]+$`, at most 2048 characters: a scheme,
/// then printable ASCII without spaces.
fn absolute_uri(field: &str, value: &str) -> Result<(), String> {
    let wrong = || Err(format!("{field} {value:?} is not an absolute URI"));
    if value.len() > 2048 {
        return Err(format!("{field} is longer than 2048 characters"));
    }
    let Some((scheme, rest)) = value.split_once(':') else {
        return wrong();
    };
    let scheme_ok = scheme
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic())
        && scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'.' | b'-'));
    if scheme_ok && !rest.is_empty() && rest.bytes().all(|b| (b'!'..=b'~').contains(&b)) {
        Ok(())
    } else {
        wrong()
    }
}
