//! Tokenizers behind one trait, [`TextTokenizer`], picked by the manifest's
//! `text.tokenizer` ([`load`]): Kalon's word tokenizer (the reference
//! model; below) and CLIP's byte-level BPE ([`ClipBpeTokenizer`]).
//!
//! The word tokenizer: text is lower-cased and split on every character that is not a letter
//! or digit; each word maps to its id in the vocabulary, unknown words to
//! [`UNK`]. Sequences are truncated or padded with [`PAD`] to `max_len`,
//! and the attention mask is 1 on words, 0 on padding. The vocabulary file
//! is a JSON object `{"kind": "words", "words": [...]}` whose list gives
//! ids from 2 on.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::contract::{self, TextSpec, TokenizerKind};
use crate::{EncoderError, Result};

mod clip;

pub use clip::ClipBpeTokenizer;

/// What a text tower needs of its tokenizer.
pub trait TextTokenizer: Send + Sync {
    /// The length of every sequence it gives.
    fn max_len(&self) -> usize;

    /// Ids run from 0 to `vocab_size() - 1`.
    fn vocab_size(&self) -> usize;

    /// Appends the ids and attention mask of `text`, `max_len` each, and
    /// returns how many of them are the text's own tokens (not padding,
    /// not start or end markers): 0 when it read nothing in `text`.
    fn push(&self, text: &str, ids: &mut Vec<i64>, mask: &mut Vec<i64>) -> usize;
}

impl dyn TextTokenizer + '_ {
    /// Ids and mask of a batch, row-major `[texts, max_len]`.
    pub fn encode_batch<S: AsRef<str>>(&self, texts: &[S]) -> (Vec<i64>, Vec<i64>) {
        let mut ids = Vec::with_capacity(texts.len() * self.max_len());
        let mut mask = Vec::with_capacity(texts.len() * self.max_len());
        for text in texts {
            self.push(text.as_ref(), &mut ids, &mut mask);
        }
        (ids, mask)
    }
}

/// The tokenizer the manifest's `text` names, from `dir`.
pub fn load(dir: &Path, spec: &TextSpec) -> Result<Box<dyn TextTokenizer>> {
    let path = contract::resolve(dir, &spec.vocab);
    Ok(match spec.tokenizer {
        TokenizerKind::Words => Box::new(WordTokenizer::load(&path, spec.max_len)?),
        TokenizerKind::ClipBpe => {
            Box::new(ClipBpeTokenizer::load(&path, spec.max_len, spec.pad_id)?)
        }
    })
}

/// Padding id.
pub const PAD: i64 = 0;
/// Unknown-word id.
pub const UNK: i64 = 1;

#[derive(Serialize, Deserialize)]
struct VocabFile {
    kind: String,
    words: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct WordTokenizer {
    words: Vec<String>,
    ids: HashMap<String, i64>,
    max_len: usize,
}

/// Splits text into lower-cased words.
pub fn words(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
}

impl WordTokenizer {
    pub fn new(words: Vec<String>, max_len: usize) -> Self {
        let ids = words
            .iter()
            .enumerate()
            .map(|(i, w)| (w.clone(), i as i64 + 2))
            .collect();
        WordTokenizer {
            words,
            ids,
            max_len,
        }
    }

    /// A vocabulary of every word seen at least `min_count` times, most
    /// frequent first (ties alphabetical, so it is deterministic).
    pub fn build<'a>(
        texts: impl IntoIterator<Item = &'a str>,
        min_count: usize,
        max_len: usize,
    ) -> Self {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for text in texts {
            for word in words(text) {
                *counts.entry(word).or_default() += 1;
            }
        }
        let mut ranked: Vec<(String, usize)> = counts
            .into_iter()
            .filter(|(_, n)| *n >= min_count)
            .collect();
        ranked.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        WordTokenizer::new(ranked.into_iter().map(|(w, _)| w).collect(), max_len)
    }

    /// Ids run from 0 to `vocab_size() - 1`.
    pub fn vocab_size(&self) -> usize {
        self.words.len() + 2
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Appends the ids and mask of `text` (each `max_len` long); returns
    /// how many words it kept.
    pub fn push(&self, text: &str, ids: &mut Vec<i64>, mask: &mut Vec<i64>) -> usize {
        let mut n = 0;
        for word in words(text).take(self.max_len) {
            ids.push(self.ids.get(&word).copied().unwrap_or(UNK));
            mask.push(1);
            n += 1;
        }
        for _ in n..self.max_len {
            ids.push(PAD);
            mask.push(0);
        }
        n
    }

    /// Ids and mask of a batch, row-major `[texts, max_len]`.
    pub fn encode_batch<S: AsRef<str>>(&self, texts: &[S]) -> (Vec<i64>, Vec<i64>) {
        let mut ids = Vec::with_capacity(texts.len() * self.max_len);
        let mut mask = Vec::with_capacity(texts.len() * self.max_len);
        for text in texts {
            self.push(text.as_ref(), &mut ids, &mut mask);
        }
        (ids, mask)
    }

    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let file = VocabFile {
            kind: "words".into(),
            words: self.words.clone(),
        };
        std::fs::write(path, serde_json::to_vec(&file).expect("vocab serializes"))
    }

    pub fn load(path: &Path, max_len: usize) -> Result<Self> {
        let error = |detail: String| EncoderError::Tokenizer {
            path: path.to_owned(),
            detail,
        };
        let bytes = std::fs::read(path).map_err(|e| error(e.to_string()))?;
        let file: VocabFile = serde_json::from_slice(&bytes).map_err(|e| {
            error(format!(
                "not the word tokenizer's vocabulary ({{\"kind\": \"words\", \"words\": [...]}}): {e}"
            ))
        })?;
        if file.kind != "words" {
            return Err(error(format!(
                "tokenizer kind {:?} is not the word tokenizer's (\"words\"); a CLIP tokenizer.json needs \"tokenizer\": \"clip-bpe\" in the manifest's text section",
                file.kind
            )));
        }
        Ok(WordTokenizer::new(file.words, max_len))
    }
}

impl TextTokenizer for WordTokenizer {
    fn max_len(&self) -> usize {
        self.max_len
    }

    fn vocab_size(&self) -> usize {
        WordTokenizer::vocab_size(self)
    }

    fn push(&self, text: &str, ids: &mut Vec<i64>, mask: &mut Vec<i64>) -> usize {
        WordTokenizer::push(self, text, ids, mask)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_pad_truncate_and_unknowns() {
        let tok = WordTokenizer::build(["a red cat", "A red dog!", "red"], 1, 4);
        // red (3) first, then a (2), then cat/dog alphabetical
        assert_eq!(tok.vocab_size(), 6);
        let (ids, mask) = tok.encode_batch(&["Red CAT, zebra", "a red red red red dog"]);
        assert_eq!(ids, vec![2, 4, UNK, PAD, 3, 2, 2, 2]);
        assert_eq!(mask, vec![1, 1, 1, 0, 1, 1, 1, 1]);
    }

    #[test]
    fn vocabulary_round_trips_through_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let tok = WordTokenizer::build(["one two two three three three"], 2, 8);
        assert_eq!(tok.vocab_size(), 4, "min_count drops 'one'");
        let path = dir.path().join("vocab.json");
        tok.save(&path).unwrap();
        let back = WordTokenizer::load(&path, 8).unwrap();
        assert_eq!(
            back.encode_batch(&["three two one"]),
            tok.encode_batch(&["three two one"])
        );
        std::fs::write(&path, b"{\"kind\": \"bpe\", \"words\": []}").unwrap();
        let err = WordTokenizer::load(&path, 8).unwrap_err().to_string();
        assert!(
            err.contains("clip-bpe") && err.contains("vocab.json"),
            "{err}"
        );
    }
}
