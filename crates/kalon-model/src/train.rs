//! Contrastive pretraining (the paper's PT stage).
//!
//! Pairs are (image, caption) from a world directory (`captions.jsonl` and
//! `images/<id>.png`, as `kalonctl sim generate` writes it, or any data in
//! that layout). Every tenth pair is held out for evaluation and never
//! trained on. The loss is CLIP's symmetric InfoNCE over a batch, with
//! label smoothing: for the similarity logits `s * I T^T` each row (image to
//! texts) and each column (text to images) is a classification whose
//! target puts `1 - eps` on the matching pair and spreads `eps` uniformly.

use std::io::BufRead;
use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device, Tensor, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use kalon_encoder::{preprocess, ImageSpec, WordTokenizer};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::model::{ModelConfig, Pooling, TwoTower};

/// Whether pair `index` (line number in `captions.jsonl`) is held out.
pub fn held_out(index: usize) -> bool {
    index % 10 == 9
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    HeldOut,
}

/// Settings of one pretraining run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PretrainConfig {
    pub seed: u64,
    /// Passes over the training pairs: 30 by default. At 10 the model was
    /// far from converged (world seed 5: recall@10 0.286 at 10 epochs,
    /// 0.438 at 30; HPIR accuracy about +5 points, aesthetic about -5), so
    /// alignment measured against it was measured against a model that
    /// more pretraining alone would improve (docs/ALGORITHM.md).
    pub epochs: usize,
    pub batch_size: usize,
    pub learning_rate: f64,
    pub weight_decay: f64,
    /// Label smoothing of the InfoNCE targets.
    pub label_smoothing: f64,
    /// Use at most this many training pairs (all when `None`).
    pub max_pairs: Option<usize>,
    /// The image tower's global pooling: mean and std by default (twice
    /// the recall of mean pooling at the same cost; docs/ALGORITHM.md).
    pub pooling: Pooling,
}

impl Default for PretrainConfig {
    fn default() -> Self {
        PretrainConfig {
            seed: 0,
            epochs: 30,
            batch_size: 128,
            learning_rate: 3e-3,
            weight_decay: 0.01,
            label_smoothing: 0.1,
            max_pairs: None,
            pooling: Pooling::MeanStd,
        }
    }
}

/// Image-caption pairs with the images decoded to RGB8 at the model's size.
pub struct Pairs {
    pub ids: Vec<String>,
    pub captions: Vec<String>,
    /// `len * size * size * 3` bytes.
    pub rgb: Vec<u8>,
    pub size: usize,
}

#[derive(Deserialize)]
struct CaptionLine {
    image_id: String,
    caption: String,
}

impl Pairs {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Reads the pairs of `split` from a world directory.
    pub fn load(
        world: &Path,
        split: Split,
        size: usize,
        limit: Option<usize>,
    ) -> anyhow::Result<Pairs> {
        let path = world.join("captions.jsonl");
        let file = std::fs::File::open(&path).with_context(|| {
            format!(
                "cannot open {} (generate a world with `kalonctl sim generate`)",
                path.display()
            )
        })?;
        let mut pairs = Pairs {
            ids: Vec::new(),
            captions: Vec::new(),
            rgb: Vec::new(),
            size,
        };
        for (index, line) in std::io::BufReader::new(file).lines().enumerate() {
            if (split == Split::HeldOut) != held_out(index) {
                continue;
            }
            if limit.is_some_and(|n| pairs.len() >= n) {
                break;
            }
            let line = line?;
            let row: CaptionLine = serde_json::from_str(&line)
                .with_context(|| format!("{}:{}: not a caption line", path.display(), index + 1))?;
            let image_path = world.join("images").join(format!("{}.png", row.image_id));
            let bytes = std::fs::read(&image_path)
                .with_context(|| format!("cannot read {}", image_path.display()))?;
            let image = preprocess::decode(&bytes)
                .with_context(|| format!("cannot decode {}", image_path.display()))?;
            pairs
                .rgb
                .extend_from_slice(preprocess::fit(&image, size as u32).as_raw());
            pairs.ids.push(row.image_id);
            pairs.captions.push(row.caption);
        }
        anyhow::ensure!(
            !pairs.is_empty(),
            "no {split:?} pairs in {}",
            path.display()
        );
        Ok(pairs)
    }

    /// The normalised `[n, 3, size, size]` tensor of pairs `rows`.
    pub fn pixels(
        &self,
        rows: &[usize],
        spec: &ImageSpec,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let per = self.size * self.size * 3;
        let mut data = Vec::with_capacity(rows.len() * per);
        for &r in rows {
            preprocess::push_rgb8(&self.rgb[r * per..(r + 1) * per], spec, &mut data);
        }
        Tensor::from_vec(data, (rows.len(), 3, self.size, self.size), device)
    }
}

/// The image preprocessing a model config implies.
pub fn image_spec(config: &ModelConfig) -> ImageSpec {
    ImageSpec {
        file: "image.onnx".into(),
        size: config.image_size as u32,
        mean: config.mean,
        std: config.std,
    }
}

/// Token ids and mask tensors `[n, max_len]` of `texts`.
pub fn tokens(
    tokenizer: &WordTokenizer,
    texts: &[&str],
    device: &Device,
) -> candle_core::Result<(Tensor, Tensor)> {
    let (ids, mask) = tokenizer.encode_batch(texts);
    let shape = (texts.len(), tokenizer.max_len());
    Ok((
        Tensor::from_vec(ids, shape, device)?,
        Tensor::from_vec(mask, shape, device)?,
    ))
}

/// Cross-entropy of each row of `logits` against the diagonal, with label
/// smoothing `eps`, averaged over rows.
fn smoothed_cross_entropy(logits: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let n = logits.dim(0)?;
    let log_p = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let eye = Tensor::eye(n, DType::F32, logits.device())?;
    let nll = (log_p.mul(&eye)?.sum_all()? / n as f64)?.neg()?;
    let uniform = log_p.mean_all()?.neg()?;
    (nll * (1.0 - eps))? + (uniform * eps)?
}

/// The symmetric InfoNCE loss of unit image and text embeddings `[n, d]`.
pub fn info_nce(
    images: &Tensor,
    texts: &Tensor,
    log_scale: &Tensor,
    eps: f64,
) -> candle_core::Result<Tensor> {
    let scale = log_scale.clamp(0f32, 100f32.ln())?.exp()?;
    let logits = images.matmul(&texts.t()?)?.broadcast_mul(&scale)?;
    let i2t = smoothed_cross_entropy(&logits, eps)?;
    let t2i = smoothed_cross_entropy(&logits.t()?.contiguous()?, eps)?;
    (i2t + t2i)? / 2.0
}

/// One optimisation step, for progress display and logs.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Step {
    pub step: usize,
    pub steps: usize,
    pub epoch: usize,
    pub loss: f32,
}

pub struct Pretrained {
    pub model: TwoTower,
    pub varmap: VarMap,
    pub tokenizer: WordTokenizer,
    pub pairs: usize,
    pub losses: Vec<f32>,
    pub seconds: f64,
}

/// The vocabulary: every word of the training captions, plus the world's
/// training queries when `queries.jsonl` is there.
pub fn build_tokenizer(
    world: &Path,
    train: &Pairs,
    max_len: usize,
) -> anyhow::Result<WordTokenizer> {
    let mut texts: Vec<String> = train.captions.clone();
    let queries = world.join("queries.jsonl");
    if queries.exists() {
        for line in std::fs::read_to_string(&queries)?.lines() {
            let row: serde_json::Value = serde_json::from_str(line)?;
            if row["split"] == "train" {
                if let Some(text) = row["text"].as_str() {
                    texts.push(text.to_owned());
                }
            }
        }
    }
    Ok(WordTokenizer::build(
        texts.iter().map(String::as_str),
        1,
        max_len,
    ))
}

/// Fixes candle's CPU thread count for the process: sets `RAYON_NUM_THREADS`
/// to the physical core count (candle's own default) unless it is set.
///
/// candle 0.11 looks its thread count up on every matrix product, and with
/// neither `RAYON_NUM_THREADS` nor `CANDLE_CPU_MASK` set that lookup parses
/// `/proc/cpuinfo` (`num_cpus::get_physical`): about a dozen times per
/// alignment step, 7% of the adapter trainer's time on two cores. Call it
/// first thing in `main`, before any thread is started (it changes the
/// process environment).
pub fn pin_cpu_threads() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", num_cpus::get_physical().to_string());
    }
}

/// The device training runs on, from `KALON_TRAIN_DEVICE`: `cpu`, or
/// `cuda` (device 0; needs a build with the `cuda` feature). Unset: CUDA
/// when the build has it, else the CPU.
pub fn training_device() -> anyhow::Result<Device> {
    let wanted = std::env::var("KALON_TRAIN_DEVICE").unwrap_or_default();
    match (wanted.trim(), cfg!(feature = "cuda")) {
        ("cpu", _) | ("", false) => Ok(Device::Cpu),
        ("cuda", true) | ("", true) => Device::new_cuda(0).map_err(|e| {
            anyhow::anyhow!(
                "cannot open CUDA device 0 ({e}): is there a GPU and its driver? KALON_TRAIN_DEVICE=cpu trains on the CPU"
            )
        }),
        ("cuda", false) => anyhow::bail!(
            "KALON_TRAIN_DEVICE=cuda, but this build has no CUDA support: build with `--features cuda` (scripts/build-cuda.sh does, no CUDA toolkit needed)"
        ),
        (other, _) => anyhow::bail!("KALON_TRAIN_DEVICE={other:?}: use cpu or cuda"),
    }
}

/// Pretrains the reference model on a world's training pairs.
pub fn pretrain(
    world: &Path,
    config: &PretrainConfig,
    mut on_step: impl FnMut(Step),
) -> anyhow::Result<Pretrained> {
    let started = Instant::now();
    let device = training_device()?;
    let probe = ModelConfig::reference(0);
    let train = Pairs::load(world, Split::Train, probe.image_size, config.max_pairs)?;
    let tokenizer = build_tokenizer(world, &train, probe.max_len)?;
    let model_config = ModelConfig::reference(tokenizer.vocab_size()).with_pooling(config.pooling);
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
    let model = TwoTower::new(model_config.clone(), vb)?;
    crate::model::seeded_init(&varmap, config.seed)?;
    let spec = image_spec(&model_config);
    let mut optimizer = AdamW::new(
        varmap.all_vars(),
        ParamsAdamW {
            lr: config.learning_rate,
            weight_decay: config.weight_decay,
            ..Default::default()
        },
    )?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(config.seed);
    let batch = config.batch_size.min(train.len()).max(2);
    let per_epoch = train.len() / batch;
    let steps = per_epoch * config.epochs;
    let warmup = (steps / 20).max(1);
    let mut losses = Vec::with_capacity(steps);
    let mut order: Vec<usize> = (0..train.len()).collect();
    for epoch in 0..config.epochs {
        order.shuffle(&mut rng);
        for rows in order.chunks_exact(batch) {
            let step = losses.len();
            // linear warm-up, then cosine decay to a tenth
            let progress = step as f64 / steps.max(1) as f64;
            let lr = if step < warmup {
                config.learning_rate * (step + 1) as f64 / warmup as f64
            } else {
                config.learning_rate
                    * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()))
            };
            optimizer.set_learning_rate(lr);
            let pixels = train.pixels(rows, &spec, &device)?;
            let captions: Vec<&str> = rows.iter().map(|&r| train.captions[r].as_str()).collect();
            let (ids, mask) = tokens(&tokenizer, &captions, &device)?;
            let images = model.image.forward(&pixels)?;
            let texts = model.text.forward(&ids, &mask)?;
            let loss = info_nce(&images, &texts, &model.log_scale, config.label_smoothing)?;
            optimizer.backward_step(&loss)?;
            let loss = loss.to_scalar::<f32>()?;
            anyhow::ensure!(loss.is_finite(), "loss diverged at step {step}");
            losses.push(loss);
            on_step(Step {
                step: step + 1,
                steps,
                epoch: epoch + 1,
                loss,
            });
        }
    }
    Ok(Pretrained {
        model,
        varmap,
        tokenizer,
        pairs: train.len(),
        losses,
        seconds: started.elapsed().as_secs_f64(),
    })
}
