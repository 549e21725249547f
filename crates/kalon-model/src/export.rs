//! Writing a trained model as an encoder directory (docs/ENCODER_CONTRACT.md)
//! and reading it back into candle.
//!
//! ```text
//! DIR/kalon-model.json     the manifest ONNX Runtime serving reads
//! DIR/image.onnx           image tower (Kalon's own ONNX writer)
//! DIR/text.onnx            text tower
//! DIR/vocab.json           the word tokenizer's vocabulary
//! DIR/model-config.json    candle sizes, to train further
//! DIR/model.safetensors    candle weights, to train further
//! ```

use std::path::Path;

use anyhow::Context;
use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use kalon_encoder::{contract::FORMAT, Manifest, TextSpec, WordTokenizer};

use crate::model::{ModelConfig, TwoTower};
use crate::onnx;
use crate::train::image_spec;

/// Writes `model` to `dir` (created if missing).
pub fn export(
    model: &TwoTower,
    varmap: &VarMap,
    tokenizer: &WordTokenizer,
    dir: &Path,
    notes: serde_json::Map<String, serde_json::Value>,
) -> anyhow::Result<Manifest> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let write = |name: &str, bytes: Vec<u8>| {
        let path = dir.join(name);
        std::fs::write(&path, bytes).with_context(|| format!("cannot write {}", path.display()))
    };
    write("image.onnx", onnx::to_bytes(&model.image.to_onnx()?))?;
    write("text.onnx", onnx::to_bytes(&model.text.to_onnx()?))?;
    tokenizer.save(&dir.join("vocab.json"))?;
    write(
        "model-config.json",
        serde_json::to_vec_pretty(&model.config)?,
    )?;
    varmap.save(dir.join("model.safetensors"))?;
    let manifest = Manifest {
        format: FORMAT.into(),
        name: "kalon-ref".into(),
        embedding_dim: model.config.dim,
        image: image_spec(&model.config),
        text: TextSpec {
            file: "text.onnx".into(),
            max_len: model.config.max_len,
            vocab: "vocab.json".into(),
            tokenizer: Default::default(),
            pad_id: 0,
        },
        notes,
    };
    manifest.save(dir)?;
    Ok(manifest)
}

/// Reads a model written by [`export`] back into candle.
pub fn load(dir: &Path, device: &Device) -> anyhow::Result<(TwoTower, VarMap, WordTokenizer)> {
    let config_path = dir.join("model-config.json");
    let config: ModelConfig = serde_json::from_slice(
        &std::fs::read(&config_path)
            .with_context(|| format!("cannot read {}", config_path.display()))?,
    )?;
    let mut varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
    let model = TwoTower::new(config.clone(), vb)?;
    varmap
        .load(dir.join("model.safetensors"))
        .with_context(|| format!("cannot load the weights in {}", dir.display()))?;
    let tokenizer = WordTokenizer::load(&dir.join("vocab.json"), config.max_len)?;
    Ok((model, varmap, tokenizer))
}

/// The reference model with random weights (`seed`) and a word tokenizer
/// built from `world`'s captions, exported into `out`: an encoder that
/// loads through the contract in seconds, for tests and benchmarks that
/// need one but not a trained one.
pub fn export_random_reference(world: &Path, out: &Path, seed: u64) -> anyhow::Result<Manifest> {
    let captions = std::fs::read_to_string(world.join("captions.jsonl"))
        .with_context(|| format!("no captions.jsonl in {}", world.display()))?;
    let tokenizer = WordTokenizer::build(captions.lines(), 1, 16);
    let varmap = VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(
        &varmap,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    );
    let model = TwoTower::new(crate::ModelConfig::reference(tokenizer.vocab_size()), vb)?;
    crate::model::seeded_init(&varmap, seed)?;
    export(&model, &varmap, &tokenizer, out, Default::default())
}
