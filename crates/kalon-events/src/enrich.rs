//! The enricher's topics: `query.rephrased.v1`, `lmm.judgment.v1` and
//! `enrich.deadletter.v1`.
//!
//! Fields are declared in alphabetical order: the enricher used to build
//! these payloads with `serde_json::json!`, whose map sorts its keys, so the
//! typed payloads put the same bytes on the wire. Times are written with
//! microseconds, as before.

use std::collections::BTreeMap;

use chrono::{DateTime, SubsecRound as _, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::event::{at_most, rfc3339_micros, strict_uuid, text};
use crate::payload::TopicPayload;
use crate::topics::{ENRICH_DEAD_LETTER_TOPIC, JUDGMENT_TOPIC, REPHRASED_TOPIC};
use crate::Aspect;

/// Longest normalised query: a search query is at most 1024 characters,
/// and lowercasing may double one (`İ` becomes two code points).
const LONGEST_NORMALISED_QUERY: usize = 2048;

/// The current time as these payloads carry it (whole microseconds, so a
/// payload decodes back equal to what was sent).
fn now_micros() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

/// `query.rephrased.v1`: the rephrasings of one normalised query, one per
/// prompt variant answered; keyed by the query.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueryRephrased {
    #[serde(with = "strict_uuid")]
    pub event_id: Uuid,
    /// The model of the first stored rephrasing; empty when no variant was
    /// answered (every one dead-lettered).
    pub model: String,
    #[serde(with = "rfc3339_micros")]
    pub occurred_at: DateTime<Utc>,
    /// The normalised query: lowercase words joined by single spaces.
    pub query: String,
    /// Prompt variant name -> its rephrasing.
    pub rephrasings: BTreeMap<String, String>,
}

impl QueryRephrased {
    /// An event happening now, with a new UUIDv7.
    pub fn now(query: &str, model: String, rephrasings: BTreeMap<String, String>) -> Self {
        QueryRephrased {
            event_id: Uuid::now_v7(),
            model,
            occurred_at: now_micros(),
            query: query.to_owned(),
            rephrasings,
        }
    }
}

impl TopicPayload for QueryRephrased {
    const TOPIC: &'static str = REPHRASED_TOPIC;

    fn validate(&self) -> Result<(), String> {
        at_most("model", &self.model, 256)?;
        text("query", &self.query, LONGEST_NORMALISED_QUERY)?;
        for (variant, rephrasing) in &self.rephrasings {
            text("rephrasings variant", variant, 64)?;
            text("rephrasings[]", rephrasing, 500)?;
        }
        Ok(())
    }
}

/// What an LMM judgment asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JudgmentKind {
    /// Which row is better, asked in both orders: a verdict.
    Compare,
    /// 1-5 scores of both rows, averaged over both orders.
    Score,
}

impl JudgmentKind {
    pub fn as_str(self) -> &'static str {
        match self {
            JudgmentKind::Compare => "compare",
            JudgmentKind::Score => "score",
        }
    }
}

/// An order-consistent verdict on row A against row B.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JudgmentVerdict {
    /// A was picked in both orders.
    Win,
    /// B was picked in both orders.
    Loss,
    /// The picks followed the order shown.
    Similar,
}

impl JudgmentVerdict {
    pub fn as_str(self) -> &'static str {
        match self {
            JudgmentVerdict::Win => "win",
            JudgmentVerdict::Loss => "loss",
            JudgmentVerdict::Similar => "similar",
        }
    }
}

/// `lmm.judgment.v1`: one stored LMM judgment of two result rows; keyed by
/// the query. A comparison has a verdict and no scores, a scoring the two
/// scores and no verdict; the absent ones are written as `null`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LmmJudgment {
    /// Written `relevance` or `aesthetic`; `accuracy` (HPIR's name, which
    /// judgments carried before the aspects were unified) reads as
    /// relevance.
    #[serde(deserialize_with = "judged_aspect::deserialize")]
    pub aspect: Aspect,
    /// The `lmm_judgments` row's id.
    #[serde(with = "strict_uuid")]
    pub judgment_id: Uuid,
    pub kind: JudgmentKind,
    /// The model of the last answer.
    pub model: String,
    #[serde(with = "rfc3339_micros")]
    pub occurred_at: DateTime<Utc>,
    pub query: String,
    /// Image ids of row A, in order.
    pub row_a: Vec<String>,
    /// Image ids of row B, in order.
    pub row_b: Vec<String>,
    #[serde(default)]
    pub score_a: Option<f64>,
    #[serde(default)]
    pub score_b: Option<f64>,
    #[serde(default)]
    pub verdict: Option<JudgmentVerdict>,
}

/// What a judgment found: a comparison's verdict or a scoring's two scores.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum JudgmentOutcome {
    Compared(JudgmentVerdict),
    Scored(f64, f64),
}

impl LmmJudgment {
    /// A judgment's event, occurring now.
    pub fn now(
        judgment_id: Uuid,
        query: &str,
        aspect: Aspect,
        rows: (&[String], &[String]),
        outcome: JudgmentOutcome,
        model: String,
    ) -> Self {
        let (kind, scores, verdict) = match outcome {
            JudgmentOutcome::Compared(verdict) => (JudgmentKind::Compare, None, Some(verdict)),
            JudgmentOutcome::Scored(a, b) => (JudgmentKind::Score, Some((a, b)), None),
        };
        LmmJudgment {
            aspect,
            judgment_id,
            kind,
            model,
            occurred_at: now_micros(),
            query: query.to_owned(),
            row_a: rows.0.to_vec(),
            row_b: rows.1.to_vec(),
            score_a: scores.map(|s| s.0),
            score_b: scores.map(|s| s.1),
            verdict,
        }
    }
}

impl TopicPayload for LmmJudgment {
    const TOPIC: &'static str = JUDGMENT_TOPIC;

    fn validate(&self) -> Result<(), String> {
        text("model", &self.model, 256)?;
        text("query", &self.query, 1024)?;
        for (field, row) in [("row_a", &self.row_a), ("row_b", &self.row_b)] {
            if row.len() > 1000 {
                return Err(format!("{field} has {} items, at most 1000", row.len()));
            }
            for id in row {
                text(field, id, 256)?;
            }
        }
        for (field, score) in [("score_a", self.score_a), ("score_b", self.score_b)] {
            if let Some(score) = score {
                if !(1.0..=5.0).contains(&score) {
                    return Err(format!("{field} {score} is not in 1..=5"));
                }
            }
        }
        let scored = self.score_a.is_some() && self.score_b.is_some();
        let unscored = self.score_a.is_none() && self.score_b.is_none();
        match self.kind {
            JudgmentKind::Compare if self.verdict.is_none() || !unscored => {
                Err("a compare judgment has a verdict and no scores".into())
            }
            JudgmentKind::Score if self.verdict.is_some() || !scored => {
                Err("a score judgment has both scores and no verdict".into())
            }
            _ => Ok(()),
        }
    }
}

/// `lmm.judgment.v1`'s aspect: [`Aspect`], with `accuracy` as a serde alias
/// of relevance.
mod judged_aspect {
    use serde::{Deserialize, Deserializer};

    use crate::Aspect;

    #[derive(Deserialize)]
    #[serde(rename_all = "lowercase")]
    enum Named {
        Aesthetic,
        #[serde(alias = "accuracy")]
        Relevance,
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Aspect, D::Error> {
        Ok(match Named::deserialize(d)? {
            Named::Aesthetic => Aspect::Aesthetic,
            Named::Relevance => Aspect::Relevance,
        })
    }
}

/// Which enricher task gave up on the model's answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EnrichTask {
    Rephrase,
}

impl EnrichTask {
    pub fn as_str(self) -> &'static str {
        match self {
            EnrichTask::Rephrase => "rephrase",
        }
    }
}

/// `enrich.deadletter.v1`: answers the enricher could not parse even with
/// the strict prompt; keyed by the query. The message also carries the
/// headers [`EnrichDeadLetter::headers`] gives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrichDeadLetter {
    /// Why each answer was refused, in the order asked.
    pub errors: Vec<String>,
    /// The normalised query.
    pub query: String,
    /// The answers as the model sent them, in the order asked (the same
    /// order as `errors`).
    pub raw_responses: Vec<String>,
    pub task: EnrichTask,
    /// The prompt variant asked.
    pub variant: String,
}

impl EnrichDeadLetter {
    /// The `kalon-dlq-reason` header of every enricher dead letter.
    pub const REASON: &'static str = "malformed_llm_output";

    /// The message's headers: `kalon-dlq-reason` ([`Self::REASON`]) and
    /// `kalon-dlq-detail` (the last error; empty when there is none).
    pub fn headers(&self) -> [(&'static str, String); 2] {
        [
            (crate::dead_letter_headers::REASON, Self::REASON.to_owned()),
            (
                crate::dead_letter_headers::DETAIL,
                self.errors.last().cloned().unwrap_or_default(),
            ),
        ]
    }
}

impl TopicPayload for EnrichDeadLetter {
    const TOPIC: &'static str = ENRICH_DEAD_LETTER_TOPIC;

    fn validate(&self) -> Result<(), String> {
        text("query", &self.query, LONGEST_NORMALISED_QUERY)?;
        text("variant", &self.variant, 64)?;
        for (field, list) in [
            ("errors", &self.errors),
            ("raw_responses", &self.raw_responses),
        ] {
            if list.is_empty() {
                return Err(format!("{field} is empty"));
            }
        }
        Ok(())
    }
}
