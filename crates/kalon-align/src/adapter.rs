//! The alignment adapter: `v' = normalise(v + v A^T)` on the image tower's
//! output, `A` a `d x d` matrix starting at zero (so the aligned model starts
//! as the pretrained one). It works for ANY image tower that meets the
//! encoder contract, because it only sees the tower's embeddings; exported,
//! it is appended to the tower's own ONNX graph, so serving stays one file.

use std::path::Path;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use kalon_encoder::contract::IMAGE_EMBEDS;
use kalon_encoder::Manifest;
use kalon_model::onnx::proto::{NodeProto, TensorProto};
use kalon_model::onnx::{append::append_to_output, attr_int};

pub struct Adapter {
    pub varmap: VarMap,
    pub weight: Tensor,
    pub dim: usize,
}

impl Adapter {
    pub fn new(dim: usize, device: &Device) -> candle_core::Result<Self> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let weight =
            vb.get_with_hints((dim, dim), "adapter.weight", candle_nn::Init::Const(0.0))?;
        Ok(Adapter {
            varmap,
            weight,
            dim,
        })
    }

    /// Unit rows `[n, d]` -> adapted unit rows.
    pub fn forward(&self, v: &Tensor) -> candle_core::Result<Tensor> {
        let y = (v + v.matmul(&self.weight.t()?)?)?;
        y.broadcast_div(&y.sqr()?.sum_keepdim(1)?.sqrt()?)
    }

    /// Adapts plain row-major embeddings (evaluation).
    pub fn apply(&self, rows: &[f32]) -> candle_core::Result<Vec<f32>> {
        let n = rows.len() / self.dim;
        let v = Tensor::from_slice(rows, (n, self.dim), self.weight.device())?;
        self.forward(&v)?.flatten_all()?.to_vec1::<f32>()
    }

    /// Writes the aligned encoder: `parent`'s directory with the adapter
    /// appended to its image tower, text tower and tokenizer copied.
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
        let tower = std::fs::read(parent.join(&manifest.image.file))?;
        let backbone = format!("{IMAGE_EMBEDS}_backbone");
        // MatMul takes [d_in, d_out]: A^T
        let a_t = self
            .weight
            .t()?
            .contiguous()?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let node = |op: &str, inputs: &[&str], output: &str, attribute| NodeProto {
            input: inputs.iter().map(|s| (*s).to_owned()).collect(),
            output: vec![output.to_owned()],
            name: format!("kalon_adapter_{}", op.to_lowercase()),
            op_type: op.into(),
            attribute,
            domain: String::new(),
        };
        let nodes = vec![
            node(
                "MatMul",
                &[&backbone, "kalon_adapter.weight_t"],
                "kalon_adapter_delta",
                vec![],
            ),
            node(
                "Add",
                &[&backbone, "kalon_adapter_delta"],
                "kalon_adapter_sum",
                vec![],
            ),
            node(
                "LpNormalization",
                &["kalon_adapter_sum"],
                IMAGE_EMBEDS,
                vec![attr_int("axis", 1), attr_int("p", 2)],
            ),
        ];
        let weights = vec![TensorProto {
            dims: vec![self.dim as i64, self.dim as i64],
            data_type: kalon_model::onnx::proto::data_type::FLOAT,
            name: "kalon_adapter.weight_t".into(),
            raw_data: a_t.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }];
        let aligned =
            append_to_output(&tower, IMAGE_EMBEDS, nodes, weights).with_context(|| {
                format!(
                    "cannot append the adapter to {}",
                    parent.join(&manifest.image.file).display()
                )
            })?;
        std::fs::write(out.join(&manifest.image.file), aligned)?;
        for file in [&manifest.text.file, &manifest.text.vocab] {
            std::fs::copy(parent.join(file), out.join(file))?;
        }
        self.varmap.save(out.join("adapter.safetensors"))?;
        manifest.name = format!("{}-aligned", manifest.name);
        manifest.notes = notes;
        manifest.save(out)?;
        Ok(manifest)
    }
}
