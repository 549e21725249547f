//! The alignment adapter: `v' = normalise(v + v A^T)` on the image tower's
//! output, `A` a `d x d` matrix starting at zero (so the aligned model starts
//! as the pretrained one). It works for ANY image tower that meets the
//! encoder contract, because it only sees the tower's embeddings; exported,
//! it is appended to the tower's own ONNX graph, so serving stays one file.
//!
//! Two shapes of `A` ([`AdapterKind`]):
//! - `matrix`: all `d x d` entries are trained;
//! - `beauty`: `A = m w^T`, rank one: `w` (trained) reads a beauty score
//!   `b(x) = w . v` out of the embedding and `m` (fixed) is the mean
//!   direction of the training queries' text embeddings, so
//!   `t . v' ~ t . v + (t . m) b(x)`: one beauty term, shared by every
//!   query whose embedding leans on `m`, instead of a per-query change.

use std::path::Path;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use kalon_encoder::contract::IMAGE_EMBEDS;
use kalon_encoder::Manifest;
use kalon_model::onnx::proto::{NodeProto, TensorProto};
use kalon_model::onnx::{append::append_to_output, attr_int};
use serde::{Deserialize, Serialize};

/// Which entries of the adapter's matrix are trained.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AdapterKind {
    /// Every entry of `A` (`d^2` weights).
    #[default]
    Matrix,
    /// `A = m w^T`: a beauty read-out `w` along the queries' mean direction
    /// `m` (`d` weights).
    Beauty,
}

impl AdapterKind {
    pub const ALL: [AdapterKind; 2] = [AdapterKind::Matrix, AdapterKind::Beauty];

    pub fn name(self) -> &'static str {
        match self {
            AdapterKind::Matrix => "matrix",
            AdapterKind::Beauty => "beauty",
        }
    }
}

impl std::str::FromStr for AdapterKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        kalon_model::model::parse_name(s, &Self::ALL, Self::name, "adapter kind")
    }
}

enum Head {
    Matrix(Tensor),
    Beauty { w: Tensor, direction: Tensor },
}

pub struct Adapter {
    pub varmap: VarMap,
    head: Head,
    pub dim: usize,
}

/// The variable names an adapter keeps in its (or a tower's) varmap.
pub const MATRIX_VAR: &str = "adapter.weight";
pub const BEAUTY_VAR: &str = "adapter.beauty";

impl Adapter {
    /// An adapter of `kind` whose weights live in `varmap` (a tower's own,
    /// so they are checkpointed with it). `queries` (unit text embeddings,
    /// row-major) give the `beauty` kind its direction; they are ignored by
    /// `matrix`.
    pub fn in_varmap(
        varmap: VarMap,
        dim: usize,
        kind: AdapterKind,
        queries: Option<&[f32]>,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let head = match kind {
            AdapterKind::Matrix => Head::Matrix(vb.get_with_hints(
                (dim, dim),
                MATRIX_VAR,
                candle_nn::Init::Const(0.0),
            )?),
            AdapterKind::Beauty => {
                let direction =
                    mean_direction(queries.unwrap_or_default(), dim).ok_or_else(|| {
                        candle_core::Error::Msg(
                            "the beauty adapter needs query embeddings whose mean is not zero"
                                .into(),
                        )
                    })?;
                Head::Beauty {
                    w: vb.get_with_hints((dim, 1), BEAUTY_VAR, candle_nn::Init::Const(0.0))?,
                    direction: Tensor::from_vec(direction, (1, dim), device)?,
                }
            }
        };
        Ok(Adapter { varmap, head, dim })
    }

    pub fn kind(&self) -> AdapterKind {
        match self.head {
            Head::Matrix(_) => AdapterKind::Matrix,
            Head::Beauty { .. } => AdapterKind::Beauty,
        }
    }

    /// The trained variables (what the optimiser moves).
    pub fn vars(&self) -> Vec<candle_core::Var> {
        let name = match self.head {
            Head::Matrix(_) => MATRIX_VAR,
            Head::Beauty { .. } => BEAUTY_VAR,
        };
        let data = self.varmap.data().lock().expect("varmap lock");
        data.get(name).into_iter().cloned().collect()
    }

    /// The adapter's matrix `A` (`d x d`), whatever its kind.
    pub fn weight(&self) -> candle_core::Result<Tensor> {
        match &self.head {
            Head::Matrix(a) => Ok(a.clone()),
            Head::Beauty { w, direction } => direction.t()?.matmul(&w.t()?),
        }
    }

    /// Unit rows `[n, d]` -> adapted unit rows.
    pub fn forward(&self, v: &Tensor) -> candle_core::Result<Tensor> {
        let delta = match &self.head {
            Head::Matrix(a) => v.matmul(&a.t()?)?,
            // (v w) m^T: the beauty read-out along the queries' direction
            Head::Beauty { w, direction } => v.matmul(w)?.matmul(direction)?,
        };
        let y = (v + delta)?;
        y.broadcast_div(&y.sqr()?.sum_keepdim(1)?.sqrt()?)
    }

    /// Adapts plain row-major embeddings (evaluation).
    pub fn apply(&self, rows: &[f32]) -> candle_core::Result<Vec<f32>> {
        let n = rows.len() / self.dim;
        let v = Tensor::from_slice(rows, (n, self.dim), &self.device())?;
        self.forward(&v)?.flatten_all()?.to_vec1::<f32>()
    }

    fn device(&self) -> Device {
        match &self.head {
            Head::Matrix(a) => a.device().clone(),
            Head::Beauty { w, .. } => w.device().clone(),
        }
    }

    /// `tower` (an image tower's ONNX bytes) with the adapter appended to
    /// its output.
    pub fn append_to_tower(&self, tower: &[u8]) -> anyhow::Result<Vec<u8>> {
        // a tower that already carries an adapter (an aligned parent) gets
        // the next stage's names: ONNX names must be unique in a graph
        let stage = (1..)
            .find(|&n| {
                !has_name(
                    tower,
                    &format!("{IMAGE_EMBEDS}_backbone{}", stage_suffix(n)),
                )
            })
            .expect("a free stage");
        let sfx = stage_suffix(stage);
        let backbone = format!("{IMAGE_EMBEDS}_backbone{sfx}");
        let (weight, delta, sum) = (
            format!("kalon_adapter{sfx}.weight_t"),
            format!("kalon_adapter{sfx}_delta"),
            format!("kalon_adapter{sfx}_sum"),
        );
        // MatMul takes [d_in, d_out]: A^T
        let a_t = self
            .weight()?
            .t()?
            .contiguous()?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let node = |op: &str, inputs: &[&str], output: &str, attribute| NodeProto {
            input: inputs.iter().map(|s| (*s).to_owned()).collect(),
            output: vec![output.to_owned()],
            name: format!("kalon_adapter{sfx}_{}", op.to_lowercase()),
            op_type: op.into(),
            attribute,
            domain: String::new(),
        };
        let nodes = vec![
            node("MatMul", &[&backbone, &weight], &delta, vec![]),
            node("Add", &[&backbone, &delta], &sum, vec![]),
            node(
                "LpNormalization",
                &[&sum],
                IMAGE_EMBEDS,
                vec![attr_int("axis", 1), attr_int("p", 2)],
            ),
        ];
        let weights = vec![TensorProto {
            dims: vec![self.dim as i64, self.dim as i64],
            data_type: kalon_model::onnx::proto::data_type::FLOAT,
            name: weight.clone(),
            raw_data: a_t.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }];
        append_to_output(tower, IMAGE_EMBEDS, &backbone, nodes, weights)
    }

    /// Writes the aligned encoder: `parent`'s directory with the adapter
    /// appended to its image tower, text tower and tokenizer copied, and
    /// `adapter.safetensors` holding `A` as `adapter.weight` (search reuses
    /// the parent's embeddings with it).
    pub fn export(
        &self,
        parent: &Path,
        out: &Path,
        notes: serde_json::Map<String, serde_json::Value>,
    ) -> anyhow::Result<Manifest> {
        let mut manifest = Manifest::load(parent)?;
        anyhow::ensure!(
            manifest.embedding_dim == self.dim,
            "adapter is {}-d, the encoder {}-d",
            self.dim,
            manifest.embedding_dim
        );
        std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
        let tower_path = parent.join(&manifest.image.file);
        let tower = std::fs::read(&tower_path)
            .with_context(|| format!("cannot read {}", tower_path.display()))?;
        let aligned = self
            .append_to_tower(&tower)
            .with_context(|| format!("cannot append the adapter to {}", tower_path.display()))?;
        std::fs::write(out.join(&manifest.image.file), aligned)?;
        for file in [&manifest.text.file, &manifest.text.vocab] {
            std::fs::copy(parent.join(file), out.join(file))?;
        }
        let a: Vec<f32> = self.weight()?.flatten_all()?.to_vec1()?;
        kalon_encoder::adapter::write(
            &out.join(kalon_encoder::adapter::ADAPTER_FILE),
            self.dim,
            &a,
        )?;
        manifest.name = format!("{}-aligned", manifest.name);
        manifest.notes = notes;
        manifest.save(out)?;
        Ok(manifest)
    }
}

/// `""` for the first adapter on a tower, `"_2"`, `"_3"`, ... for the next.
fn stage_suffix(stage: usize) -> String {
    if stage == 1 {
        String::new()
    } else {
        format!("_{stage}")
    }
}

/// Whether `name` is a string field of the ONNX model: its length (a
/// one-byte varint: names here are short) then its bytes, so a name is not
/// found inside a longer one.
fn has_name(model: &[u8], name: &str) -> bool {
    let mut pattern = vec![name.len() as u8];
    pattern.extend_from_slice(name.as_bytes());
    debug_assert!(name.len() < 128);
    model
        .windows(pattern.len())
        .any(|w| w == pattern.as_slice())
}

/// The normalised mean of unit rows (`None` when it is zero or not finite).
pub fn mean_direction(rows: &[f32], dim: usize) -> Option<Vec<f32>> {
    if dim == 0 || rows.is_empty() {
        return None;
    }
    let mut mean = vec![0.0f64; dim];
    for row in rows.chunks_exact(dim) {
        for (m, x) in mean.iter_mut().zip(row) {
            *m += f64::from(*x);
        }
    }
    let norm = mean.iter().map(|m| m * m).sum::<f64>().sqrt();
    (norm.is_finite() && norm > 1e-9).then(|| mean.iter().map(|m| (m / norm) as f32).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_beauty_head_adds_its_read_out_along_the_queries_mean_direction() {
        // two queries whose mean is the first axis
        let queries = [0.6f32, 0.8, 0.0, 0.6, -0.8, 0.0];
        assert_eq!(mean_direction(&queries, 3).unwrap(), vec![1.0, 0.0, 0.0]);
        assert!(mean_direction(&[1.0, 0.0, -1.0, 0.0], 2).is_none());
        let head = Adapter::in_varmap(
            VarMap::new(),
            3,
            AdapterKind::Beauty,
            Some(&queries),
            &Device::Cpu,
        )
        .unwrap();
        // at zero it is the identity
        let v = [0.0f32, 0.6, 0.8];
        assert_eq!(head.apply(&v).unwrap(), v.to_vec());
        head.vars()[0]
            .set(&Tensor::new(&[[0.0f32], [0.5], [0.0]], &Device::Cpu).unwrap())
            .unwrap();
        // b(x) = w . v = 0.3, added along (1, 0, 0), then normalised
        let got = head.apply(&v).unwrap();
        let norm = (0.3f32 * 0.3 + 1.0).sqrt();
        for (g, want) in got.iter().zip([0.3 / norm, 0.6 / norm, 0.8 / norm]) {
            assert!((g - want).abs() < 1e-6, "{got:?}");
        }
        // both queries see the same beauty term (t . m = 0.6 each)
        let score = |q: &[f32]| q.iter().zip(&got).map(|(a, b)| a * b).sum::<f32>();
        let plain = |q: &[f32]| q.iter().zip(&v).map(|(a, b)| a * b).sum::<f32>();
        for q in queries.chunks(3) {
            assert!((score(q) * norm - plain(q) - 0.6 * 0.3).abs() < 1e-6);
        }
        for kind in AdapterKind::ALL {
            assert_eq!(kind.name().parse::<AdapterKind>().unwrap(), kind);
        }
        let unknown = "rank-one".parse::<AdapterKind>().unwrap_err();
        assert!(unknown.contains("matrix, beauty"), "{unknown}");
        assert!(
            Adapter::in_varmap(VarMap::new(), 3, AdapterKind::Beauty, None, &Device::Cpu).is_err()
        );
    }
}
