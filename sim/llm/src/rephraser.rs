//! The simulated world's LLM rephraser: it plays the LLM from the world's
//! public knowledge, which words people use for pictures they like (the
//! simulated endpoint answers with it).

use kalon_llm::rephrase::{PromptVariant, Rephraser};

/// The simulated world's LLM: adds the praise words the world's people use
/// for pictures they like, in each variant's format, dropping one of them
/// per query (deterministically) as an LLM's answers vary.
#[derive(Debug, Clone, Default)]
pub struct WorldRephraser {
    pub seed: u64,
}

const PRAISE: [&str; 3] = ["stunning", "beautiful", "amazing"];

impl Rephraser for WorldRephraser {
    fn rephrase(&self, query: &str, variant: PromptVariant) -> anyhow::Result<String> {
        let query = query.trim();
        anyhow::ensure!(!query.is_empty(), "cannot rephrase an empty query");
        // FNV-1a of seed and query picks the word left out
        let hash = query
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325u64 ^ self.seed, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
            });
        let skip = (hash % PRAISE.len() as u64) as usize;
        let words: Vec<&str> = PRAISE
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != skip)
            .map(|(_, w)| *w)
            .collect();
        Ok(match variant {
            PromptVariant::Original => query.to_owned(),
            PromptVariant::Detail => {
                format!("{query}, {} and sharp, well exposed", words.join(" "))
            }
            PromptVariant::KList => format!("{query}: 1. {} 2. {}", words[0], words[1]),
            PromptVariant::KwDict => format!("subject: {query}; quality: {}", words.join(", ")),
            PromptVariant::Repeat => format!("{query} {query}"),
            PromptVariant::Reorg => format!("a {} {} photo of {query}", words[0], words[1]),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_variant_keeps_the_query_and_original_is_unchanged() {
        let r = WorldRephraser { seed: 3 };
        for variant in PromptVariant::ALL {
            let out = r.rephrase("moody white car", variant).unwrap();
            assert!(out.contains("moody white car"), "{variant:?}: {out}");
            assert_eq!(
                out,
                r.rephrase("moody white car", variant).unwrap(),
                "deterministic"
            );
        }
        assert_eq!(
            r.rephrase(" red cat ", PromptVariant::Original).unwrap(),
            "red cat"
        );
        let detail = r.rephrase("red cat", PromptVariant::Detail).unwrap();
        assert_eq!(
            PRAISE.iter().filter(|w| detail.contains(**w)).count(),
            2,
            "{detail}"
        );
        assert!(r.rephrase("  ", PromptVariant::Detail).is_err());
    }
}
