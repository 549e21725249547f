//! Query rephrasing behind one trait, with the paper's prompt variants.
//!
//! [`HttpRephraser`] asks an OpenAI-compatible LLM (the enricher uses the
//! async [`ask_rephrasing`] directly). The simulated world's rephraser
//! lives with the simulator (`sim/llm`).

use serde::{Deserialize, Serialize};

/// The paper's prompt variants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PromptVariant {
    /// The query unchanged (the ablation's baseline).
    Original,
    /// Add visual detail a beautiful result would have.
    Detail,
    /// A list of k expected qualities.
    KList,
    /// A keyword dictionary (subject, qualities).
    KwDict,
    /// The query repeated.
    Repeat,
    /// Rewrite as one fluent enriched query.
    Reorg,
}

impl PromptVariant {
    pub const ALL: [PromptVariant; 6] = [
        PromptVariant::Original,
        PromptVariant::Detail,
        PromptVariant::KList,
        PromptVariant::KwDict,
        PromptVariant::Repeat,
        PromptVariant::Reorg,
    ];

    pub fn name(self) -> &'static str {
        match self {
            PromptVariant::Original => "original",
            PromptVariant::Detail => "detail",
            PromptVariant::KList => "k-list",
            PromptVariant::KwDict => "kw-dict",
            PromptVariant::Repeat => "repeat",
            PromptVariant::Reorg => "reorg",
        }
    }
}

impl std::str::FromStr for PromptVariant {
    type Err = String;

    /// By [`PromptVariant::name`] (command lines, environment variables).
    fn from_str(name: &str) -> Result<Self, String> {
        PromptVariant::ALL
            .into_iter()
            .find(|v| v.name() == name.trim())
            .ok_or_else(|| {
                let names: Vec<&str> = PromptVariant::ALL.iter().map(|v| v.name()).collect();
                format!(
                    "unknown prompt variant {name:?}; known: {}",
                    names.join(", ")
                )
            })
    }
}

/// Rewrites a query with aesthetic expectations.
pub trait Rephraser: Send + Sync {
    fn rephrase(&self, query: &str, variant: PromptVariant) -> anyhow::Result<String>;
}

/// Asks the LLM for `variant` of `query`, with the strict retry.
pub async fn ask_rephrasing(
    client: &crate::LlmClient,
    query: &str,
    variant: PromptVariant,
) -> Result<crate::ask::Answer<String>, crate::ask::AskError> {
    crate::ask::ask(
        client,
        "rephrase",
        |strict| crate::prompts::rephrase_messages(query, variant, strict),
        |content| crate::prompts::parse_rephrasing(query, variant, content),
    )
    .await
}

/// The [`Rephraser`] trait over HTTP, for synchronous callers (D_po
/// construction): each call runs on the rephraser's own runtime and blocks
/// the calling thread until the answer is in.
pub struct HttpRephraser {
    client: crate::LlmClient,
    blocking: crate::blocking::Blocking,
}

impl HttpRephraser {
    pub fn new(client: crate::LlmClient) -> anyhow::Result<Self> {
        Ok(HttpRephraser {
            client,
            blocking: crate::blocking::Blocking::new("kalon-rephraser")?,
        })
    }
}

impl Rephraser for HttpRephraser {
    fn rephrase(&self, query: &str, variant: PromptVariant) -> anyhow::Result<String> {
        if variant == PromptVariant::Original {
            return Ok(crate::prompts::one_line(query));
        }
        let client = self.client.clone();
        let query = query.to_owned();
        let answer = self
            .blocking
            .run(async move { ask_rephrasing(&client, &query, variant).await })??;
        Ok(answer.value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variants_parse_by_name() {
        assert_eq!(" k-list".parse::<PromptVariant>(), Ok(PromptVariant::KList));
        assert!("fancy"
            .parse::<PromptVariant>()
            .unwrap_err()
            .contains("reorg"));
        let names: Vec<_> = PromptVariant::ALL.iter().map(|v| v.name()).collect();
        assert_eq!(
            names,
            ["original", "detail", "k-list", "kw-dict", "repeat", "reorg"]
        );
    }
}
