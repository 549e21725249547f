//! The contract between Kalon and an encoder (docs/ENCODER_CONTRACT.md).
//!
//! An encoder directory holds `kalon-model.json` and the files it names.
//! Each tower is checked against the contract when it loads: input and
//! output names, element types, ranks and the fixed dimensions the manifest
//! promises. A model that breaks it is refused with the reason.

use std::path::{Path, PathBuf};

use ort::session::Session;
use ort::value::{TensorElementType, ValueType};
use serde::{Deserialize, Serialize};

use crate::{EncoderError, Result};

/// The manifest's file name inside an encoder directory.
pub const MANIFEST_FILE: &str = "kalon-model.json";
/// The manifest format this code reads.
pub const FORMAT: &str = "kalon-encoder/1";

/// Image tower input: float32 `[batch, 3, size, size]`.
pub const PIXEL_VALUES: &str = "pixel_values";
/// Image tower output: float32 `[batch, dim]`.
pub const IMAGE_EMBEDS: &str = "image_embeds";
/// Text tower inputs: int64 `[batch, max_len]` each.
pub const INPUT_IDS: &str = "input_ids";
pub const ATTENTION_MASK: &str = "attention_mask";
/// Text tower output: float32 `[batch, dim]`.
pub const TEXT_EMBEDS: &str = "text_embeds";

/// `kalon-model.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Always [`FORMAT`].
    pub format: String,
    /// A name for people and dashboards, e.g. `kalon-ref`.
    pub name: String,
    /// Length of both towers' embeddings.
    pub embedding_dim: usize,
    pub image: ImageSpec,
    pub text: TextSpec,
    /// Free-form provenance (trainer, seed, parent version, ...).
    #[serde(default)]
    pub notes: serde_json::Map<String, serde_json::Value>,
}

/// How pixels reach the image tower.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageSpec {
    /// ONNX file, relative to the encoder directory.
    pub file: String,
    /// Edge of the square input in pixels.
    pub size: u32,
    /// Per-channel (R, G, B) mean and standard deviation applied to pixel
    /// values scaled to [0, 1]: `x = (p / 255 - mean) / std`.
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

/// How text reaches the text tower.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextSpec {
    /// ONNX file, relative to the encoder directory.
    pub file: String,
    /// Token sequence length the tower receives (padded / truncated).
    pub max_len: usize,
    /// The tokenizer's file, relative to the encoder directory: the word
    /// tokenizer's vocabulary (`vocab.json`) or CLIP's `tokenizer.json`.
    pub vocab: String,
    /// Which tokenizer reads `vocab` (default: Kalon's word tokenizer).
    #[serde(default, skip_serializing_if = "TokenizerKind::is_words")]
    pub tokenizer: TokenizerKind,
    /// The id padding takes (`clip-bpe`; the word tokenizer pads with 0).
    /// It does not change a CLIP embedding (the text tower pools at the end
    /// token), only the ids: open_clip pads with 0, Hugging Face's exports
    /// usually with the end token, 49407.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub pad_id: u32,
}

/// The tokenizer a text tower expects.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TokenizerKind {
    /// Kalon's word tokenizer (the reference model): `{"kind": "words", ...}`.
    #[default]
    Words,
    /// CLIP's byte-level BPE from a Hugging Face `tokenizer.json`
    /// (lower-casing and whitespace clean-up, `<|startoftext|>` and
    /// `<|endoftext|>` around the text, truncated and padded to `max_len`).
    ClipBpe,
}

impl TokenizerKind {
    fn is_words(&self) -> bool {
        *self == TokenizerKind::Words
    }
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl Manifest {
    /// Reads and checks `dir/kalon-model.json`.
    pub fn load(dir: &Path) -> Result<Manifest> {
        let path = dir.join(MANIFEST_FILE);
        let error = |detail: String| EncoderError::Manifest {
            path: path.clone(),
            detail,
        };
        let text = std::fs::read_to_string(&path).map_err(|e| error(e.to_string()))?;
        let manifest: Manifest = serde_json::from_str(&text).map_err(|e| error(e.to_string()))?;
        if manifest.format != FORMAT {
            return Err(error(format!(
                "format is {:?}, this Kalon reads {FORMAT:?}",
                manifest.format
            )));
        }
        if manifest.embedding_dim == 0 || manifest.image.size == 0 || manifest.text.max_len == 0 {
            return Err(error(
                "embedding_dim, image.size and text.max_len must be positive".into(),
            ));
        }
        if manifest.image.std.iter().any(|s| *s <= 0.0) {
            return Err(error("image.std must be positive".into()));
        }
        Ok(manifest)
    }

    /// Writes `dir/kalon-model.json`.
    pub fn save(&self, dir: &Path) -> std::io::Result<()> {
        let text = serde_json::to_string_pretty(self).expect("a manifest serializes");
        std::fs::write(dir.join(MANIFEST_FILE), text + "\n")
    }
}

/// One input or output the contract asks for.
struct Expected {
    name: &'static str,
    ty: TensorElementType,
    /// Fixed dimensions; `None` where any size (or a dynamic one) is fine.
    dims: Vec<Option<i64>>,
}

fn describe(dims: &[Option<i64>]) -> String {
    let parts: Vec<String> = dims
        .iter()
        .map(|d| d.map_or("?".into(), |d| d.to_string()))
        .collect();
    format!("[{}]", parts.join(", "))
}

fn check(
    tower: &'static str,
    path: &Path,
    kind: &str,
    actual: &[ort::value::Outlet],
    expected: &[Expected],
) -> Result<()> {
    let fail = |detail: String| EncoderError::Contract {
        tower,
        path: path.to_owned(),
        detail,
    };
    let names: Vec<&str> = actual.iter().map(|o| o.name()).collect();
    let wanted: Vec<&str> = expected.iter().map(|e| e.name).collect();
    let mut sorted_names = names.clone();
    sorted_names.sort_unstable();
    let mut sorted_wanted = wanted.clone();
    sorted_wanted.sort_unstable();
    if sorted_names != sorted_wanted {
        return Err(fail(format!(
            "its {kind}s are {names:?}, the contract wants {wanted:?}"
        )));
    }
    for want in expected {
        let outlet = actual
            .iter()
            .find(|o| o.name() == want.name)
            .expect("names were compared");
        let ValueType::Tensor { ty, shape, .. } = outlet.dtype() else {
            return Err(fail(format!("{kind} {} is not a tensor", want.name)));
        };
        if *ty != want.ty {
            return Err(fail(format!(
                "{kind} {} has element type {ty:?}, the contract wants {:?}",
                want.name, want.ty
            )));
        }
        if shape.len() != want.dims.len() {
            return Err(fail(format!(
                "{kind} {} has shape {:?}, the contract wants {}",
                want.name,
                &shape[..],
                describe(&want.dims)
            )));
        }
        for (got, fixed) in shape.iter().zip(&want.dims) {
            if let Some(fixed) = fixed {
                // -1 is a dynamic dimension: it accepts what we send
                if *got != -1 && got != fixed {
                    return Err(fail(format!(
                        "{kind} {} has shape {:?}, the contract wants {}",
                        want.name,
                        &shape[..],
                        describe(&want.dims)
                    )));
                }
            }
        }
    }
    Ok(())
}

/// Checks an image tower against the manifest.
pub(crate) fn check_image_tower(session: &Session, path: &Path, manifest: &Manifest) -> Result<()> {
    let size = Some(i64::from(manifest.image.size));
    check(
        "image",
        path,
        "input",
        session.inputs(),
        &[Expected {
            name: PIXEL_VALUES,
            ty: TensorElementType::Float32,
            dims: vec![None, Some(3), size, size],
        }],
    )?;
    check(
        "image",
        path,
        "output",
        session.outputs(),
        &[Expected {
            name: IMAGE_EMBEDS,
            ty: TensorElementType::Float32,
            dims: vec![None, Some(manifest.embedding_dim as i64)],
        }],
    )
}

/// Checks a text tower against the manifest; says whether it takes an
/// attention mask (optional: CLIP's text tower attends causally and pools
/// at the end token, and torch's exporter drops an input the graph does
/// not use).
pub(crate) fn check_text_tower(
    session: &Session,
    path: &Path,
    manifest: &Manifest,
) -> Result<bool> {
    let len = Some(manifest.text.max_len as i64);
    let ids = |name| Expected {
        name,
        ty: TensorElementType::Int64,
        dims: vec![None, len],
    };
    let with_mask = session.inputs().iter().any(|o| o.name() == ATTENTION_MASK);
    let inputs = if with_mask {
        vec![ids(INPUT_IDS), ids(ATTENTION_MASK)]
    } else {
        vec![ids(INPUT_IDS)]
    };
    check("text", path, "input", session.inputs(), &inputs)?;
    check(
        "text",
        path,
        "output",
        session.outputs(),
        &[Expected {
            name: TEXT_EMBEDS,
            ty: TensorElementType::Float32,
            dims: vec![None, Some(manifest.embedding_dim as i64)],
        }],
    )?;
    Ok(with_mask)
}

/// A file named by the manifest, relative to the encoder directory.
pub(crate) fn resolve(dir: &Path, file: &str) -> PathBuf {
    dir.join(file)
}
