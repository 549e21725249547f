//! A scoring head on image embeddings, as an ONNX file: a user's aesthetic
//! predictor (e.g. an MLP on CLIP image embeddings, as LAION's aesthetic
//! predictor is). Contract: one float input `[batch, dim]` (any name;
//! `image_embeds` by convention) and one float output `[batch]` or
//! `[batch, 1]`, higher = better.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ort::session::Session;
use ort::value::Tensor;

use crate::encoder::{inference, open_session};
use crate::{Embeddings, EncoderError, EncoderOptions};

type Result<T, E = EncoderError> = std::result::Result<T, E>;

pub struct ScoreHead {
    session: Mutex<Session>,
    input: String,
    output: String,
    dim: usize,
    path: PathBuf,
}

impl ScoreHead {
    /// Loads `path` for embeddings of `dim` and checks its shapes.
    pub fn load(path: &Path, dim: usize, options: &EncoderOptions) -> Result<Self> {
        let session = open_session(path, options)?;
        let bad = |detail: String| EncoderError::ModelFile {
            path: path.to_owned(),
            detail,
        };
        let (inputs, outputs) = (session.inputs(), session.outputs());
        if inputs.len() != 1 || outputs.len() != 1 {
            return Err(bad(format!(
                "a score head has one input and one output; this has {} and {}",
                inputs.len(),
                outputs.len()
            )));
        }
        let input = inputs[0].name().to_owned();
        let output = outputs[0].name().to_owned();
        if let Some(shape) = inputs[0].dtype().tensor_shape() {
            let last = shape.last().copied().unwrap_or(-1);
            if shape.len() != 2 || (last > 0 && last as usize != dim) {
                return Err(bad(format!(
                    "input {input} has shape {:?}; it must be [batch, {dim}] to score these embeddings",
                    &shape[..]
                )));
            }
        }
        Ok(ScoreHead {
            session: Mutex::new(session),
            input,
            output,
            dim,
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One score per embedding row.
    pub fn score(&self, embeddings: &Embeddings) -> Result<Vec<f32>> {
        if embeddings.dim != self.dim {
            return Err(EncoderError::Input(format!(
                "embeddings of dimension {} given to a head for {}",
                embeddings.dim, self.dim
            )));
        }
        let rows = embeddings.len();
        if rows == 0 {
            return Ok(Vec::new());
        }
        let input =
            Tensor::from_array(([rows, self.dim], embeddings.data.clone())).map_err(inference)?;
        let mut session = self.session.lock().expect("session lock");
        let outputs = session
            .run(ort::inputs![self.input.as_str() => input])
            .map_err(inference)?;
        let value = outputs.get(&self.output).ok_or_else(|| {
            EncoderError::Inference(format!("the head gave no {} output", self.output))
        })?;
        let (shape, data) = value.try_extract_tensor::<f32>().map_err(inference)?;
        if data.len() != rows || !(shape.len() == 1 || (shape.len() == 2 && shape[1] == 1)) {
            return Err(EncoderError::Inference(format!(
                "{} came back with shape {:?}, expected [{rows}] or [{rows}, 1]",
                self.output,
                &shape[..]
            )));
        }
        if let Some(bad) = data.iter().find(|v| !v.is_finite()) {
            return Err(EncoderError::Inference(format!(
                "the head scored an image {bad}"
            )));
        }
        Ok(data.to_vec())
    }
}
