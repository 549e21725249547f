//! The one list of Kafka topics Kalon uses.
//!
//! The broker used locally (tansu) does not auto-create topics, and relying on
//! auto-creation in production hides wrong partition counts, so every topic is
//! created explicitly from this list (`kalonctl topics create`, or the stack).

use crate::EventKind;

/// A topic Kalon creates, with its explicit partition count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopicSpec {
    /// Topic name without the deployment prefix.
    pub name: &'static str,
    pub partitions: i32,
    /// What flows through it.
    pub purpose: &'static str,
}

/// Every topic of the loop. Names carry the schema version, so a breaking
/// change of an event is a new topic, consumed side by side during migration.
pub const TOPICS: &[TopicSpec] = &[
    TopicSpec {
        name: EventKind::Impression.topic(),
        partitions: 4,
        purpose: "search.impression.v1 events from the search service",
    },
    TopicSpec {
        name: EventKind::Click.topic(),
        partitions: 4,
        purpose: "search.click.v1 events from clients and the search service",
    },
    TopicSpec {
        name: EventKind::Rating.topic(),
        partitions: 2,
        purpose: "search.rating.v1 events from clients and the search service",
    },
    TopicSpec {
        name: DEAD_LETTER_TOPIC,
        partitions: 1,
        purpose: "events ingest could not accept, with the reason in headers",
    },
    TopicSpec {
        name: REPHRASED_TOPIC,
        partitions: 4,
        purpose: "query.rephrased.v1: the enricher's LLM rephrasings of a query, keyed by query",
    },
    TopicSpec {
        name: JUDGMENT_TOPIC,
        partitions: 2,
        purpose: "lmm.judgment.v1: LMM judgments of two result rows, keyed by query",
    },
    TopicSpec {
        name: ENRICH_DEAD_LETTER_TOPIC,
        partitions: 1,
        purpose: "LLM answers the enricher could not parse even with the strict prompt",
    },
    TopicSpec {
        name: DEPLOYMENT_TOPIC,
        partitions: 1,
        purpose: "model.deployment.v1: a version's traffic weight changed; search replicas reload",
    },
    TopicSpec {
        name: MODEL_REGISTERED_TOPIC,
        partitions: 1,
        purpose: "model.registered.v1: a new model version was registered, with its artifact and gate outcome",
    },
    TopicSpec {
        name: CANARY_DECISION_TOPIC,
        partitions: 1,
        purpose: "canary.decision.v1: the canary controller's decisions (and operators' overrides) with their evidence",
    },
];

/// Deployment changes (the `deployments` table is the truth; the event says
/// when to re-read it).
pub const DEPLOYMENT_TOPIC: &str = "model.deployment.v1";

/// New model versions.
pub const MODEL_REGISTERED_TOPIC: &str = "model.registered.v1";

/// The canary controller's decisions.
pub const CANARY_DECISION_TOPIC: &str = "canary.decision.v1";

/// The enricher's rephrasings.
pub const REPHRASED_TOPIC: &str = "query.rephrased.v1";
/// The enricher's LMM judgments.
pub const JUDGMENT_TOPIC: &str = "lmm.judgment.v1";
/// Where the enricher sends model answers it could not use.
pub const ENRICH_DEAD_LETTER_TOPIC: &str = "enrich.deadletter.v1";

/// Where ingest sends what it cannot accept.
pub const DEAD_LETTER_TOPIC: &str = "kalon.deadletter.v1";

impl TopicSpec {
    /// The topic name with a deployment prefix (tests use random prefixes).
    pub fn full_name(&self, prefix: &str) -> String {
        format!("{prefix}{}", self.name)
    }

    /// The topic's JSON Schema (`schemas/<name>.json`); every topic of
    /// [`TOPICS`] has one, and a [`crate::TopicPayload`] type.
    pub fn schema(&self) -> Option<&'static str> {
        topic_schema(self.name)
    }
}

/// The JSON Schema text of a topic (named without prefix), as shipped in
/// `schemas/`.
pub fn topic_schema(name: &str) -> Option<&'static str> {
    Some(match name {
        "search.impression.v1" => include_str!("../../../schemas/search.impression.v1.json"),
        "search.click.v1" => include_str!("../../../schemas/search.click.v1.json"),
        "search.rating.v1" => include_str!("../../../schemas/search.rating.v1.json"),
        DEAD_LETTER_TOPIC => include_str!("../../../schemas/kalon.deadletter.v1.json"),
        REPHRASED_TOPIC => include_str!("../../../schemas/query.rephrased.v1.json"),
        JUDGMENT_TOPIC => include_str!("../../../schemas/lmm.judgment.v1.json"),
        ENRICH_DEAD_LETTER_TOPIC => include_str!("../../../schemas/enrich.deadletter.v1.json"),
        DEPLOYMENT_TOPIC => include_str!("../../../schemas/model.deployment.v1.json"),
        MODEL_REGISTERED_TOPIC => include_str!("../../../schemas/model.registered.v1.json"),
        CANARY_DECISION_TOPIC => include_str!("../../../schemas/canary.decision.v1.json"),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn topic_names_are_unique_and_partitioned() {
        let names: HashSet<_> = TOPICS.iter().map(|t| t.name).collect();
        assert_eq!(names.len(), TOPICS.len());
        assert!(TOPICS.iter().all(|t| t.partitions >= 1));
        for (i, kind) in EventKind::ALL.into_iter().enumerate() {
            assert!(names.contains(kind.topic()), "{kind:?} has no topic");
            assert_eq!(kind.index(), i, "index() is the position in ALL");
        }
    }

    /// The topic of every payload type: one per topic, and no other.
    fn payload_topics() -> Vec<&'static str> {
        use crate::*;
        vec![
            Impression::TOPIC,
            Click::TOPIC,
            Rating::TOPIC,
            DeadLetterHeaders::TOPIC,
            QueryRephrased::TOPIC,
            LmmJudgment::TOPIC,
            EnrichDeadLetter::TOPIC,
            DeploymentChanged::TOPIC,
            ModelRegistered::TOPIC,
            CanaryDecision::TOPIC,
        ]
    }

    #[test]
    fn every_topic_has_a_schema_and_a_payload_type() {
        let typed: HashSet<_> = payload_topics().into_iter().collect();
        assert_eq!(typed.len(), payload_topics().len(), "one type per topic");
        for spec in TOPICS {
            let schema = spec
                .schema()
                .unwrap_or_else(|| panic!("{} has no schema", spec.name));
            let schema: serde_json::Value = serde_json::from_str(schema)
                .unwrap_or_else(|e| panic!("{}'s schema is not JSON: {e}", spec.name));
            assert_eq!(schema["title"], spec.name, "the schema names its topic");
            assert!(
                typed.contains(spec.name),
                "{} has no payload type",
                spec.name
            );
        }
        let names: HashSet<_> = TOPICS.iter().map(|t| t.name).collect();
        for topic in typed {
            assert!(
                names.contains(topic),
                "{topic} has a type but is not in TOPICS"
            );
        }
        assert_eq!(topic_schema("no.such.topic.v1"), None);
    }
}
