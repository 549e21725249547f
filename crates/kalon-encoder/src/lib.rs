//! Kalon's encoders on ONNX Runtime.
//!
//! An encoder is a directory with a manifest (`kalon-model.json`), an image
//! tower and a text tower as ONNX files, and the text tower's tokenizer. The
//! contract between Kalon and those files is written in
//! `docs/ENCODER_CONTRACT.md`; [`contract`] checks it when a model loads, so
//! a model that breaks it is refused with a message saying what is wrong.
//!
//! - [`runtime`]: finds and loads `libonnxruntime` (load-dynamic) once.
//! - [`preprocess`]: PNG/JPEG decoding, resize and crop, normalisation.
//! - [`tokenizer`]: the tokenizers behind one trait: the reference model's
//!   word tokenizer and CLIP's byte-level BPE ([`tokenizer::ClipBpeTokenizer`]).
//! - [`encoder`]: batched inference, sync and off the async runtime.
//! - [`adapter`]: the alignment adapter's file format.

pub use image;

pub mod adapter;
pub mod contract;
pub mod encoder;
pub mod head;
pub mod preprocess;
pub mod runtime;
pub mod tokenizer;

use std::path::PathBuf;

pub use contract::{ImageSpec, Manifest, TextSpec, TokenizerKind, MANIFEST_FILE};
pub use encoder::{Device, Embeddings, Encoder, EncoderOptions, ImageEncoder, TextEncoder};
pub use head::ScoreHead;
pub use tokenizer::{ClipBpeTokenizer, TextTokenizer, WordTokenizer};

/// Everything that can go wrong between Kalon and an encoder.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EncoderError {
    #[error("ONNX Runtime library not found at {path}: run `kalonctl tools install` (it fetches libonnxruntime.so.{version} into the cache) or point ORT_DYLIB_PATH at your own libonnxruntime.so", version = runtime::ORT_VERSION)]
    RuntimeMissing { path: PathBuf },
    #[error("cannot load the ONNX Runtime library {path}: {detail}")]
    RuntimeLoad { path: PathBuf, detail: String },
    #[error("cannot read the model manifest {path}: {detail}")]
    Manifest { path: PathBuf, detail: String },
    #[error("cannot load the tokenizer {path}: {detail}")]
    Tokenizer { path: PathBuf, detail: String },
    #[error("cannot load the ONNX model {path}: {detail} (is the file complete and a valid ONNX model?)")]
    ModelFile { path: PathBuf, detail: String },
    #[error(
        "{tower} tower {path} breaks the encoder contract: {detail} (see docs/ENCODER_CONTRACT.md)"
    )]
    Contract {
        tower: &'static str,
        path: PathBuf,
        detail: String,
    },
    #[error("invalid encoder input: {0}")]
    Input(String),
    #[error("cannot decode image: {0}")]
    Image(String),
    #[error("inference failed: {0}")]
    Inference(String),
    #[error("execution provider: {0}")]
    Device(String),
}

pub type Result<T, E = EncoderError> = std::result::Result<T, E>;
