//! The on-disk dataset format Kalon trains and evaluates on.
//!
//! A dataset is a folder: `images/<id>.png`, `captions.jsonl`
//! (`{"image_id", "caption"}`, read by `kalon_model::train::Pairs`),
//! `queries.jsonl` (`{"text", "split"}`) and `hpir.jsonl` (one [`HpirItem`]
//! per line: a query, two rows of images and people's choice per aspect).
//! The simulated world (`sim/world`) writes one; a team can write its own
//! from its annotations. This crate owns the item types and their readers,
//! so the trainers never link the simulator.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// Which row people chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Choice {
    A,
    B,
}

/// A human choice with its confidence in (0.5, 1].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Label {
    pub choice: Choice,
    pub confidence: f64,
}

/// One HPIR-style item: a query, two rows of five images, and the people's
/// choice on accuracy and on aesthetics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HpirItem {
    pub query: String,
    pub row_a: Vec<String>,
    pub row_b: Vec<String>,
    pub accuracy: Label,
    pub aesthetic: Label,
}

fn read_lines(dir: &Path, file: &str) -> anyhow::Result<String> {
    let path = dir.join(file);
    std::fs::read_to_string(&path)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))
}

/// The labelled items of a dataset (`hpir.jsonl`).
pub fn read_hpir(dir: &Path) -> anyhow::Result<Vec<HpirItem>> {
    read_lines(dir, "hpir.jsonl")?
        .lines()
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| anyhow::anyhow!("hpir.jsonl line {}: {e}", i + 1))
        })
        .collect()
}

/// The training queries of a dataset (`queries.jsonl`, split `train`);
/// evaluation queries stay held out.
pub fn train_queries(dir: &Path) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    for line in read_lines(dir, "queries.jsonl")?.lines() {
        let row: serde_json::Value = serde_json::from_str(line)?;
        if row["split"] == "train" {
            out.push(row["text"].as_str().unwrap_or_default().to_owned());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_items_and_only_training_queries() {
        let dir = tempfile::tempdir().unwrap();
        let item = HpirItem {
            query: "red cat".into(),
            row_a: vec!["a1".into()],
            row_b: vec!["b1".into()],
            accuracy: Label {
                choice: Choice::A,
                confidence: 0.8,
            },
            aesthetic: Label {
                choice: Choice::B,
                confidence: 0.6,
            },
        };
        let line = serde_json::to_string(&item).unwrap();
        std::fs::write(dir.path().join("hpir.jsonl"), format!("{line}\n{line}\n")).unwrap();
        std::fs::write(
            dir.path().join("queries.jsonl"),
            "{\"text\":\"red cat\",\"split\":\"train\"}\n{\"text\":\"blue car\",\"split\":\"eval\"}\n",
        )
        .unwrap();
        assert_eq!(read_hpir(dir.path()).unwrap(), vec![item.clone(), item]);
        assert_eq!(
            train_queries(dir.path()).unwrap(),
            vec!["red cat".to_owned()]
        );
        std::fs::write(dir.path().join("hpir.jsonl"), "{\"query\": 1}\n").unwrap();
        let error = read_hpir(dir.path()).unwrap_err().to_string();
        assert!(error.contains("line 1"), "{error}");
    }
}
