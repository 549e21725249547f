//! Batched inference through ONNX Runtime.
//!
//! [`ImageEncoder`] and [`TextEncoder`] each own one ONNX Runtime session
//! checked against the contract at load. Inputs are cut into batches of
//! `batch_size`; outputs are L2-normalised by Kalon whatever the model did.
//! The `*_async` methods run inference on tokio's blocking pool, so callers
//! on the async runtime never stall it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use image::RgbImage;
use ort::session::Session;
use ort::value::Tensor;

use crate::contract::{self, ATTENTION_MASK, IMAGE_EMBEDS, INPUT_IDS, PIXEL_VALUES, TEXT_EMBEDS};
use crate::tokenizer::{self, TextTokenizer};
use crate::{preprocess, runtime, EncoderError, Manifest, Result};

/// Where inference runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    #[default]
    Cpu,
    /// ONNX Runtime's CUDA execution provider (needs the `cuda` feature and
    /// a GPU build of the library); refused with a clear error otherwise.
    Cuda,
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda),
            other => Err(format!("unknown device {other:?} (cpu or cuda)")),
        }
    }
}

#[derive(Debug, Clone)]
pub struct EncoderOptions {
    /// Inputs per ONNX Runtime call.
    pub batch_size: usize,
    /// ONNX Runtime intra-op threads; 0 lets it choose.
    pub threads: usize,
    pub device: Device,
}

impl EncoderOptions {
    /// The defaults, overridden by `KALON_ENCODER_DEVICE` (cpu | cuda),
    /// `KALON_ENCODER_BATCH` and `KALON_ENCODER_THREADS`.
    pub fn from_env() -> Result<Self> {
        let mut options = EncoderOptions::default();
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        if let Some(device) = var("KALON_ENCODER_DEVICE") {
            options.device = device
                .parse()
                .map_err(|e| EncoderError::Device(format!("KALON_ENCODER_DEVICE: {e}")))?;
        }
        for (name, slot) in [
            ("KALON_ENCODER_BATCH", &mut options.batch_size),
            ("KALON_ENCODER_THREADS", &mut options.threads),
        ] {
            if let Some(value) = var(name) {
                *slot = value.parse().map_err(|_| {
                    EncoderError::Input(format!("{name}={value:?} is not a whole number"))
                })?;
            }
        }
        Ok(options)
    }
}

impl Default for EncoderOptions {
    fn default() -> Self {
        EncoderOptions {
            batch_size: 32,
            threads: 0,
            device: Device::Cpu,
        }
    }
}

/// Row-major `[rows, dim]` unit vectors.
#[derive(Debug, Clone, PartialEq)]
pub struct Embeddings {
    pub dim: usize,
    pub data: Vec<f32>,
}

impl Embeddings {
    pub fn len(&self) -> usize {
        self.data.len().checked_div(self.dim).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.dim..(i + 1) * self.dim]
    }

    pub fn rows(&self) -> impl Iterator<Item = &[f32]> {
        self.data.chunks_exact(self.dim.max(1))
    }
}

/// Divides each row by its L2 norm (rows of zeros stay zero).
pub fn l2_normalise(data: &mut [f32], dim: usize) {
    for row in data.chunks_exact_mut(dim) {
        let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        if norm > 0.0 {
            row.iter_mut().for_each(|x| *x /= norm);
        }
    }
}

pub(crate) fn open_session(path: &Path, options: &EncoderOptions) -> Result<Session> {
    let environment = runtime::environment()?;
    let model_error = |detail: String| EncoderError::ModelFile {
        path: path.to_owned(),
        detail,
    };
    if !path.is_file() {
        return Err(model_error("no such file".into()));
    }
    let mut builder = Session::builder(environment).map_err(|e| model_error(e.to_string()))?;
    if options.threads > 0 {
        builder = builder
            .with_intra_threads(options.threads)
            .map_err(|e| model_error(e.to_string()))?;
    }
    if options.device == Device::Cuda {
        builder = with_cuda(builder)?;
    }
    builder
        .commit_from_file(path)
        .map_err(|e| model_error(e.to_string()))
}

#[cfg(feature = "cuda")]
fn with_cuda(
    builder: ort::session::builder::SessionBuilder,
) -> Result<ort::session::builder::SessionBuilder> {
    use ort::ep::ExecutionProvider as _;
    match ort::ep::CUDA::is_available() {
        Ok(true) => builder
            .with_execution_providers([ort::ep::CUDA::default().build().error_on_failure()])
            .map_err(|e| EncoderError::Device(format!("CUDA execution provider: {e}"))),
        _ => Err(EncoderError::Device(
            "CUDA was asked for but this ONNX Runtime library has no CUDA execution provider (point ORT_DYLIB_PATH at a GPU build)".into(),
        )),
    }
}

#[cfg(not(feature = "cuda"))]
fn with_cuda(
    _: ort::session::builder::SessionBuilder,
) -> Result<ort::session::builder::SessionBuilder> {
    Err(EncoderError::Device(
        "CUDA was asked for but Kalon was built without the `cuda` feature".into(),
    ))
}

pub(crate) fn inference(e: impl std::fmt::Display) -> EncoderError {
    EncoderError::Inference(e.to_string())
}

/// Reads a `[rows, dim]` float output and normalises it.
fn take_output(
    outputs: &ort::session::SessionOutputs<'_>,
    name: &str,
    rows: usize,
    dim: usize,
) -> Result<Vec<f32>> {
    let value = outputs
        .get(name)
        .ok_or_else(|| EncoderError::Inference(format!("the model gave no {name} output")))?;
    let (shape, data) = value.try_extract_tensor::<f32>().map_err(inference)?;
    if shape[..] != [rows as i64, dim as i64] {
        return Err(EncoderError::Inference(format!(
            "{name} came back with shape {:?}, expected [{rows}, {dim}]",
            &shape[..]
        )));
    }
    let mut data = data.to_vec();
    l2_normalise(&mut data, dim);
    Ok(data)
}

/// The image tower.
pub struct ImageEncoder {
    session: Mutex<Session>,
    manifest: Manifest,
    path: PathBuf,
    batch_size: usize,
}

impl ImageEncoder {
    /// Loads `dir`'s image tower and checks it against the contract.
    pub fn load(dir: &Path, manifest: &Manifest, options: &EncoderOptions) -> Result<Self> {
        let path = contract::resolve(dir, &manifest.image.file);
        let session = open_session(&path, options)?;
        contract::check_image_tower(&session, &path, manifest)?;
        Ok(ImageEncoder {
            session: Mutex::new(session),
            manifest: manifest.clone(),
            path,
            batch_size: options.batch_size.max(1),
        })
    }

    pub fn dim(&self) -> usize {
        self.manifest.embedding_dim
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Pixels per image the tower takes: `3 * size * size`.
    pub fn input_len(&self) -> usize {
        let s = self.manifest.image.size as usize;
        3 * s * s
    }

    /// Embeds preprocessed images: `pixels` holds `n` CHW tensors back to
    /// back, each `input_len()` long.
    pub fn embed_pixels(&self, pixels: &[f32]) -> Result<Embeddings> {
        let per = self.input_len();
        let s = self.manifest.image.size;
        if !pixels.len().is_multiple_of(per) {
            return Err(EncoderError::Input(format!(
                "{} pixel values are not a whole number of [3, {s}, {s}] images ({per} values each)",
                pixels.len()
            )));
        }
        let dim = self.dim();
        let mut data = Vec::with_capacity(pixels.len() / per * dim);
        for chunk in pixels.chunks(per * self.batch_size) {
            let rows = chunk.len() / per;
            let input = Tensor::from_array(([rows, 3, s as usize, s as usize], chunk.to_vec()))
                .map_err(inference)?;
            let mut session = self.session.lock().expect("session lock");
            let outputs = session
                .run(ort::inputs![PIXEL_VALUES => input])
                .map_err(inference)?;
            data.extend(take_output(&outputs, IMAGE_EMBEDS, rows, dim)?);
        }
        Ok(Embeddings { dim, data })
    }

    /// Embeds a raw tensor given with its shape; the shape must be
    /// `[n, 3, size, size]`.
    pub fn embed_tensor(&self, shape: &[usize], pixels: &[f32]) -> Result<Embeddings> {
        let s = self.manifest.image.size as usize;
        if shape.len() != 4 || shape[1..] != [3, s, s] {
            return Err(EncoderError::Input(format!(
                "pixel tensor has shape {shape:?}, the image tower takes [n, 3, {s}, {s}]"
            )));
        }
        if shape.iter().product::<usize>() != pixels.len() {
            return Err(EncoderError::Input(format!(
                "pixel tensor of shape {shape:?} needs {} values, got {}",
                shape.iter().product::<usize>(),
                pixels.len()
            )));
        }
        self.embed_pixels(pixels)
    }

    /// Preprocesses and embeds decoded images.
    pub fn embed_images(&self, images: &[RgbImage]) -> Result<Embeddings> {
        let mut pixels = Vec::with_capacity(images.len() * self.input_len());
        for image in images {
            preprocess::push_image(image, &self.manifest.image, &mut pixels);
        }
        self.embed_pixels(&pixels)
    }

    /// Decodes (PNG/JPEG), preprocesses and embeds image files' bytes.
    pub fn embed_files(&self, files: &[impl AsRef<[u8]>]) -> Result<Embeddings> {
        let mut pixels = Vec::with_capacity(files.len() * self.input_len());
        for bytes in files {
            let image = preprocess::decode(bytes.as_ref())?;
            preprocess::push_image(&image, &self.manifest.image, &mut pixels);
        }
        self.embed_pixels(&pixels)
    }
}

/// The text tower with its tokenizer.
pub struct TextEncoder {
    session: Mutex<Session>,
    tokenizer: Box<dyn TextTokenizer>,
    /// Whether the tower takes `attention_mask` (optional in the contract).
    with_mask: bool,
    manifest: Manifest,
    batch_size: usize,
}

impl TextEncoder {
    /// Loads `dir`'s text tower and tokenizer and checks the contract.
    pub fn load(dir: &Path, manifest: &Manifest, options: &EncoderOptions) -> Result<Self> {
        let path = contract::resolve(dir, &manifest.text.file);
        let tokenizer = tokenizer::load(dir, &manifest.text)?;
        let session = open_session(&path, options)?;
        let with_mask = contract::check_text_tower(&session, &path, manifest)?;
        Ok(TextEncoder {
            session: Mutex::new(session),
            tokenizer,
            with_mask,
            manifest: manifest.clone(),
            batch_size: options.batch_size.max(1),
        })
    }

    pub fn dim(&self) -> usize {
        self.manifest.embedding_dim
    }

    pub fn tokenizer(&self) -> &dyn TextTokenizer {
        self.tokenizer.as_ref()
    }

    /// Embeds token ids with their attention mask, both `[n, max_len]`
    /// (the mask is not passed to a tower that takes none).
    pub fn embed_tokens(&self, ids: &[i64], mask: &[i64]) -> Result<Embeddings> {
        let len = self.manifest.text.max_len;
        if ids.len() != mask.len() || !ids.len().is_multiple_of(len) {
            return Err(EncoderError::Input(format!(
                "{} ids and {} mask values are not [n, {len}] each",
                ids.len(),
                mask.len()
            )));
        }
        let dim = self.dim();
        let mut data = Vec::with_capacity(ids.len() / len * dim);
        for (ids, mask) in ids
            .chunks(len * self.batch_size)
            .zip(mask.chunks(len * self.batch_size))
        {
            let rows = ids.len() / len;
            let ids = Tensor::from_array(([rows, len], ids.to_vec())).map_err(inference)?;
            let mut session = self.session.lock().expect("session lock");
            let outputs = if self.with_mask {
                let mask = Tensor::from_array(([rows, len], mask.to_vec())).map_err(inference)?;
                session.run(ort::inputs![INPUT_IDS => ids, ATTENTION_MASK => mask])
            } else {
                session.run(ort::inputs![INPUT_IDS => ids])
            }
            .map_err(inference)?;
            data.extend(take_output(&outputs, TEXT_EMBEDS, rows, dim)?);
        }
        Ok(Embeddings { dim, data })
    }

    /// Tokenizes and embeds texts.
    pub fn embed_texts<S: AsRef<str>>(&self, texts: &[S]) -> Result<Embeddings> {
        let (ids, mask) = self.tokenizer().encode_batch(texts);
        self.embed_tokens(&ids, &mask)
    }
}

/// Both towers of one encoder directory.
pub struct Encoder {
    pub manifest: Manifest,
    pub image: ImageEncoder,
    pub text: TextEncoder,
}

impl Encoder {
    /// Loads and checks the encoder in `dir`.
    pub fn load(dir: &Path, options: &EncoderOptions) -> Result<Self> {
        let manifest = Manifest::load(dir)?;
        Ok(Encoder {
            image: ImageEncoder::load(dir, &manifest, options)?,
            text: TextEncoder::load(dir, &manifest, options)?,
            manifest,
        })
    }

    /// [`TextEncoder::embed_texts`] on the blocking pool.
    pub async fn embed_texts_async(self: &Arc<Self>, texts: Vec<String>) -> Result<Embeddings> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.text.embed_texts(&texts))
            .await
            .map_err(inference)?
    }

    /// [`ImageEncoder::embed_files`] on the blocking pool.
    pub async fn embed_files_async(self: &Arc<Self>, files: Vec<Vec<u8>>) -> Result<Embeddings> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.image.embed_files(&files))
            .await
            .map_err(inference)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn l2_normalise_makes_unit_rows_and_leaves_zero_rows() {
        let mut data = vec![3.0, 4.0, 0.0, 0.0];
        l2_normalise(&mut data, 2);
        assert_eq!(data, vec![0.6, 0.8, 0.0, 0.0]);
    }
}
