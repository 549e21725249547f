//! CLIP's tokenizer: byte-level BPE over a Hugging Face `tokenizer.json`
//! (what `CLIPTokenizerFast` reads, and what `tools/clip/` writes from
//! open_clip's vocabulary), through the `tokenizers` crate.
//!
//! The file brings the normalisation (NFC, whitespace runs to one space,
//! lower case), the pre-tokenizer (CLIP's word pattern, byte-level), the
//! BPE merges and the post-processor that puts `<|startoftext|>` and
//! `<|endoftext|>` around the text. Truncation and padding come from the
//! manifest, whatever the file says: at most `max_len` ids, the end token
//! kept when a long text is cut, padded with `pad_id`.
//!
//! open_clip's own tokenizer also runs ftfy and HTML unescaping first;
//! Kalon does not, so ids can differ from open_clip's on mojibake, curly
//! quotes, ligatures, HTML entities and a word-final capital sigma
//! (docs/ENCODER_CONTRACT.md says how much).

use std::path::Path;

use tokenizers::{
    PaddingDirection, PaddingParams, PaddingStrategy, Tokenizer, TruncationDirection,
    TruncationParams, TruncationStrategy,
};

use super::TextTokenizer;
use crate::{EncoderError, Result};

/// CLIP's start-of-text token.
pub const START: &str = "<|startoftext|>";
/// CLIP's end-of-text token (the text tower pools at it).
pub const END: &str = "<|endoftext|>";

pub struct ClipBpeTokenizer {
    inner: Tokenizer,
    max_len: usize,
    start: u32,
    end: u32,
    pad_id: u32,
}

impl std::fmt::Debug for ClipBpeTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipBpeTokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("max_len", &self.max_len)
            .field("pad_id", &self.pad_id)
            .finish()
    }
}

impl ClipBpeTokenizer {
    /// Loads `path` (a `tokenizer.json`) for sequences of `max_len` ids
    /// padded with `pad_id`; refuses a file that is missing, is not a
    /// tokenizer, lacks CLIP's start and end tokens or does not put them
    /// around the text.
    pub fn load(path: &Path, max_len: usize, pad_id: u32) -> Result<Self> {
        let error = |detail: String| EncoderError::Tokenizer {
            path: path.to_owned(),
            detail,
        };
        if !path.is_file() {
            return Err(error(
                "no such file (the manifest's text.vocab names it, relative to the encoder directory)"
                    .into(),
            ));
        }
        if max_len < 2 {
            return Err(error(format!(
                "text.max_len {max_len} leaves no room for the start and end tokens"
            )));
        }
        let mut inner = Tokenizer::from_file(path)
            .map_err(|e| error(format!("not a Hugging Face tokenizer.json: {e}")))?;
        let token = |name: &str| {
            inner.token_to_id(name).ok_or_else(|| {
                error(format!(
                    "no {name} token: not a CLIP tokenizer (its vocabulary has {} entries)",
                    inner.get_vocab_size(true)
                ))
            })
        };
        let (start, end) = (token(START)?, token(END)?);
        let vocab_size = inner.get_vocab_size(true);
        if pad_id as usize >= vocab_size {
            return Err(error(format!(
                "pad_id {pad_id} is not below the vocabulary's size {vocab_size}"
            )));
        }
        let pad_token = inner.id_to_token(pad_id).unwrap_or_else(|| END.to_owned());
        inner
            .with_truncation(Some(TruncationParams {
                max_length: max_len,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            }))
            .map_err(|e| error(format!("cannot truncate to {max_len}: {e}")))?;
        inner.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(max_len),
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id,
            pad_type_id: 0,
            pad_token,
        }));
        let tokenizer = ClipBpeTokenizer {
            inner,
            max_len,
            start,
            end,
            pad_id,
        };
        let (mut ids, mut mask) = (Vec::new(), Vec::new());
        tokenizer.push("a photo", &mut ids, &mut mask);
        let wrapped = ids.first() == Some(&(start as i64))
            && mask.iter().sum::<i64>() >= 3
            && ids[mask.iter().sum::<i64>() as usize - 1] == end as i64;
        if !wrapped || ids.len() != max_len {
            return Err(error(format!(
                "it does not give {START} text {END} padded to {max_len} ids (CLIP's post-processor \
                 is RobertaProcessing with both tokens); \"a photo\" gave {:?}",
                &ids[..ids.len().min(8)]
            )));
        }
        Ok(tokenizer)
    }

    /// The start and end tokens' ids.
    pub fn specials(&self) -> (u32, u32) {
        (self.start, self.end)
    }
}

impl TextTokenizer for ClipBpeTokenizer {
    fn max_len(&self) -> usize {
        self.max_len
    }

    fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    fn push(&self, text: &str, ids: &mut Vec<i64>, mask: &mut Vec<i64>) -> usize {
        let encoding = match self.inner.encode(text, true) {
            Ok(encoding) => encoding,
            Err(error) => {
                // nothing in CLIP's pipeline fails on valid UTF-8; if it
                // ever does, the text reads as empty rather than failing
                tracing::warn!(%error, "the CLIP tokenizer refused a text; read as empty");
                ids.extend([self.start as i64, self.end as i64]);
                mask.extend([1, 1]);
                ids.extend(std::iter::repeat_n(self.pad_id as i64, self.max_len - 2));
                mask.extend(std::iter::repeat_n(0, self.max_len - 2));
                return 0;
            }
        };
        let mut own = 0;
        for ((&id, &m), &special) in encoding
            .get_ids()
            .iter()
            .zip(encoding.get_attention_mask())
            .zip(encoding.get_special_tokens_mask())
        {
            ids.push(id as i64);
            mask.push(m as i64);
            own += usize::from(m == 1 && special == 0);
        }
        own
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_or_malformed_file_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("tokenizer.json");
        let err = ClipBpeTokenizer::load(&missing, 77, 0)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cannot load the tokenizer")
                && err.contains("tokenizer.json")
                && err.contains("no such file"),
            "{err}"
        );
        std::fs::write(&missing, b"{\"version\": \"1.0\", \"model\": ").unwrap();
        let err = ClipBpeTokenizer::load(&missing, 77, 0)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("tokenizer.json") && err.contains("not a Hugging Face tokenizer.json"),
            "{err}"
        );
    }

    /// A tiny word-level tokenizer.json: a valid file, but not CLIP's.
    #[test]
    fn a_tokenizer_without_clips_tokens_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "pre_tokenizer": { "type": "Whitespace" }, "post_processor": null,
            "decoder": null,
            "model": { "type": "WordLevel", "vocab": { "[UNK]": 0, "a": 1, "photo": 2 }, "unk_token": "[UNK]" }
        });
        std::fs::write(&path, json.to_string()).unwrap();
        let err = ClipBpeTokenizer::load(&path, 77, 0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no <|startoftext|> token"), "{err}");
    }
}
