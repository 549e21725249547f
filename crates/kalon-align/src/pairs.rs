//! The preference pair: one shape for every source of preferences.

use serde::{Deserialize, Serialize};

/// Where a preference came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PairSource {
    /// D_po: LLM rephrasing + aesthetic re-ranking, product order.
    Dpo,
    /// Clicks (skip-above, skip-next), weighted by inverse propensity.
    Click,
    /// Explicit star ratings, higher over lower for the same query.
    Rating,
    /// An LMM judge's order-consistent win.
    Judgment,
}

impl PairSource {
    /// The name stored in `preference_pairs.source`.
    pub fn as_str(self) -> &'static str {
        match self {
            PairSource::Dpo => "dpo",
            PairSource::Click => "click",
            PairSource::Rating => "rating",
            PairSource::Judgment => "judgment",
        }
    }

    pub fn parse(name: &str) -> Option<PairSource> {
        Some(match name {
            "dpo" => PairSource::Dpo,
            "click" => PairSource::Click,
            "rating" => PairSource::Rating,
            "judgment" => PairSource::Judgment,
            _ => return None,
        })
    }
}

/// `winner > loser` for `query`, with a confidence weight in the loss.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreferencePair {
    /// The query the model is trained on (the original, not a rephrasing).
    pub query: String,
    pub winner: String,
    pub loser: String,
    pub source: PairSource,
    /// Confidence weight, > 0.
    pub weight: f64,
    /// How the pair was made (rephrasing, matrix cells, event ids, ...).
    #[serde(default)]
    pub provenance: serde_json::Value,
}

impl PreferencePair {
    /// The pair's stored id, `<source>-<32 hex>`: a SHA-256 of the source,
    /// query, winner, loser and `identity`, what made the pair (a click
    /// pair's request, rule and ranks; a judgment's id; ...). The same facts
    /// give the same id, so writing a pair again is a no-op.
    pub fn id_with(&self, identity: &serde_json::Value) -> String {
        use sha2::{Digest, Sha256};
        let mut hash = Sha256::new();
        for part in [
            self.source.as_str(),
            &self.query,
            &self.winner,
            &self.loser,
            &identity.to_string(),
        ] {
            hash.update(part.as_bytes());
            hash.update([0]);
        }
        let digest = hash.finalize();
        let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
        format!("{}-{hex}", self.source.as_str())
    }

    /// Checks what the loss relies on.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.weight.is_finite() && self.weight > 0.0,
            "pair weight must be positive, got {}",
            self.weight
        );
        anyhow::ensure!(
            self.winner != self.loser,
            "a pair needs two different images"
        );
        anyhow::ensure!(!self.query.trim().is_empty(), "a pair needs a query");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_round_trip_and_bad_ones_are_refused() {
        let pair = PreferencePair {
            query: "red cat".into(),
            winner: "img-1".into(),
            loser: "img-2".into(),
            source: PairSource::Dpo,
            weight: 1.0,
            provenance: serde_json::json!({"rephrased": "a stunning red cat", "cells": [[0, 0], [1, 2]]}),
        };
        pair.validate().unwrap();
        let text = serde_json::to_string(&pair).unwrap();
        assert!(text.contains("\"source\":\"dpo\""));
        assert_eq!(serde_json::from_str::<PreferencePair>(&text).unwrap(), pair);
        let same = PreferencePair {
            loser: "img-1".into(),
            ..pair.clone()
        };
        assert!(same.validate().is_err());
        let weightless = PreferencePair {
            weight: 0.0,
            ..pair
        };
        assert!(weightless.validate().is_err());
    }
}
