//! The Ranked DPO training loop: the adapter (or the whole image tower)
//! trained on D_po and extra pairs, with the captions' contrastive loss as
//! the anchor, checkpoints and resume.

use std::path::Path;

use candle_core::{Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use kalon_encoder::Embeddings;
use kalon_model::train::info_nce;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::adapter::{Adapter, AdapterKind};
use crate::algorithm::{ranked_dpo_loss, DpoParams, DpoSpec};
use crate::rephrase::PromptVariant;

use crate::dataset::Embedded;
use crate::dpo::IndexedPair;

/// Settings of an alignment run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AlignConfig {
    pub seed: u64,
    pub steps: usize,
    pub pair_batch: usize,
    pub caption_batch: usize,
    pub learning_rate: f64,
    pub params: DpoParams,
    pub spec: DpoSpec,
    /// Training queries used for D_po.
    pub queries: usize,
    pub variant: PromptVariant,
    /// Save the trained weights every this many steps (0: never) into
    /// `checkpoint_dir` as `checkpoint-<step>.safetensors`.
    pub checkpoint_every: usize,
    pub checkpoint_dir: Option<std::path::PathBuf>,
    /// Continue from this checkpoint (`checkpoint-<step>.safetensors` of
    /// the same model and settings): its weights are loaded, the batch
    /// sampler is replayed to its step, and training runs the remaining
    /// steps. AdamW's moment estimates are not in checkpoints and restart.
    #[serde(default)]
    pub resume: Option<std::path::PathBuf>,
    /// More preference pairs (JSONL of [`crate::PreferencePair`]: clicks,
    /// ratings, judgments) trained on beside D_po.
    #[serde(default)]
    pub pairs_file: Option<std::path::PathBuf>,
    /// The adapter's shape; with the whole tower, `beauty` appends the
    /// beauty head to the tower (trained with it) and `matrix` trains the
    /// tower alone.
    #[serde(default)]
    pub adapter: AdapterKind,
    /// Stop with an error (nothing exported) when training runs longer
    /// than this many seconds.
    #[serde(default)]
    pub time_budget_s: Option<f64>,
    /// Set by another thread to stop training at the next step, with an
    /// error (nothing exported): a trainer shutting down or losing its run.
    #[serde(skip)]
    pub cancel: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

/// The step a checkpoint file was written after, from its name.
pub fn checkpoint_step(path: &Path) -> anyhow::Result<usize> {
    path.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("checkpoint-"))
        .and_then(|n| n.strip_suffix(".safetensors"))
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "{} is not a checkpoint file (checkpoint-<step>.safetensors)",
                path.display()
            )
        })
}

impl Default for AlignConfig {
    fn default() -> Self {
        AlignConfig {
            seed: 1,
            steps: 400,
            pair_batch: 256,
            caption_batch: 256,
            learning_rate: 3e-3,
            params: DpoParams::default(),
            spec: DpoSpec {
                k: 48,
                u: 3,
                v: 4,
                stride: 3,
            },
            queries: 600,
            variant: PromptVariant::Detail,
            checkpoint_every: 0,
            checkpoint_dir: None,
            resume: None,
            pairs_file: None,
            adapter: AdapterKind::default(),
            time_budget_s: None,
            cancel: None,
        }
    }
}

/// One training step's figures (JSONL log and progress).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct AlignStep {
    pub step: usize,
    pub steps: usize,
    pub loss: f32,
    pub dpo_loss: f32,
    pub pt_loss: f32,
    /// Share of the batch's pairs the adapted model orders right.
    pub pair_accuracy: f32,
}

fn gather(rows: &Embeddings, idx: &[usize], device: &Device) -> candle_core::Result<Tensor> {
    let mut data = Vec::with_capacity(idx.len() * rows.dim);
    for &i in idx {
        data.extend_from_slice(rows.row(i));
    }
    Tensor::from_vec(data, (idx.len(), rows.dim), device)
}

/// What the adapter trains on: unit embeddings computed once by the frozen
/// encoder. Image row `i < train` belongs with caption row `i`.
pub struct TrainingSet<'a> {
    pub images: &'a Embeddings,
    pub captions: &'a Embeddings,
    pub train: usize,
    pub queries: &'a Embeddings,
    pub pairs: &'a [IndexedPair],
}

impl Embedded {
    /// This world's embeddings with D_po's queries and pairs.
    pub fn training_set<'a>(
        &'a self,
        queries: &'a Embeddings,
        pairs: &'a [IndexedPair],
    ) -> TrainingSet<'a> {
        TrainingSet {
            images: &self.images,
            captions: &self.caption_embeds,
            train: self.train,
            queries,
            pairs,
        }
    }
}

/// The Ranked DPO + `alpha` InfoNCE loop shared by what can be trained:
/// `embed` maps image rows to the trained model's unit embeddings, `vars`
/// are what the optimiser moves, on `device` (the one the caller opened).
/// Reference scores come from the frozen encoder's embeddings in `set`.
fn optimise(
    device: &Device,
    set: &TrainingSet<'_>,
    config: &AlignConfig,
    varmap: &candle_nn::VarMap,
    vars: Vec<candle_core::Var>,
    embed: &dyn Fn(&[usize]) -> candle_core::Result<Tensor>,
    on_step: &mut dyn FnMut(AlignStep),
) -> anyhow::Result<()> {
    let (queries, pairs) = (set.queries, set.pairs);
    anyhow::ensure!(!pairs.is_empty(), "no preference pairs to train on");
    anyhow::ensure!(set.train >= 2, "need at least two caption pairs");
    let checked = vars.clone();
    let mut optimizer = AdamW::new(
        vars,
        ParamsAdamW {
            lr: config.learning_rate,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(config.seed);
    let tau = config.params.tau;
    // InfoNCE at the score's own temperature: logits = cos / tau
    let log_scale = Tensor::new(&[(1.0 / tau).ln() as f32], device)?.reshape(())?;
    let sample = |rng: &mut rand::rngs::StdRng| {
        let batch: Vec<IndexedPair> = (0..config.pair_batch.min(pairs.len()))
            .map(|_| pairs[rng.random_range(0..pairs.len())])
            .collect();
        let captions: Vec<usize> =
            rand::seq::index::sample(rng, set.train, config.caption_batch.min(set.train))
                .into_vec();
        (batch, captions)
    };
    let mut first = 0;
    if let Some(path) = &config.resume {
        first = checkpoint_step(path)?;
        anyhow::ensure!(
            first < config.steps,
            "checkpoint {} is from step {first}; nothing left of {} steps",
            path.display(),
            config.steps
        );
        let mut loading = varmap.clone();
        loading.load(path).map_err(|e| {
            anyhow::anyhow!(
                "checkpoint {} does not fit this model (another model, tower or dimension?): {e}",
                path.display()
            )
        })?;
        for _ in 0..first {
            sample(&mut rng);
        }
    }
    let started = std::time::Instant::now();
    for step in first..config.steps {
        if let Some(cancel) = &config.cancel {
            anyhow::ensure!(
                !cancel.load(std::sync::atomic::Ordering::Relaxed),
                "training was cancelled at step {step} of {}; nothing is exported",
                config.steps
            );
        }
        if let Some(budget) = config.time_budget_s {
            anyhow::ensure!(
                started.elapsed().as_secs_f64() <= budget,
                "training ran past its time budget of {budget} s at step {step} of {}; nothing is exported",
                config.steps
            );
        }
        let (batch, captions) = sample(&mut rng);
        let rows = |pick: fn(&IndexedPair) -> usize| batch.iter().map(pick).collect::<Vec<_>>();
        // winners, losers and captions go through the model as one batch
        let n = batch.len();
        let mut all = rows(|p| p.winner);
        all.extend(rows(|p| p.loser));
        let q = gather(queries, &rows(|p| p.query), device)?;
        let score =
            |v: &Tensor| -> candle_core::Result<Tensor> { (q.mul(v)?.sum(1)? / tau)?.contiguous() };
        let reference = gather(set.images, &all, device)?;
        let (ref_w, ref_l) = (
            score(&reference.narrow(0, 0, n)?)?,
            score(&reference.narrow(0, n, n)?)?,
        );
        all.extend_from_slice(&captions);
        let embedded = embed(&all)?;
        let (theta_w, theta_l) = (
            score(&embedded.narrow(0, 0, n)?)?,
            score(&embedded.narrow(0, n, n)?)?,
        );
        let weights = Tensor::from_vec(
            batch.iter().map(|p| p.weight).collect::<Vec<_>>(),
            batch.len(),
            device,
        )?;
        let dpo = ranked_dpo_loss(&theta_w, &ref_w, &theta_l, &ref_l, &weights, &config.params)?;
        let images = embedded.narrow(0, 2 * n, captions.len())?;
        let texts = gather(set.captions, &captions, device)?;
        let pt = info_nce(&images, &texts, &log_scale, 0.1)?;
        let loss = (&dpo + (&pt * config.params.alpha)?)?;
        let grads = loss.backward()?;
        // one device -> host read per step (each read waits for the GPU):
        // the loss, its parts, the pair accuracy and the gradients' total
        // |g| (not finite when any gradient is not)
        let dtype = candle_core::DType::F32;
        let mut grad_total = Tensor::zeros((), dtype, device)?;
        for var in &checked {
            if let Some(grad) = grads.get(var) {
                grad_total = (grad_total + grad.abs()?.sum_all()?.to_dtype(dtype)?)?;
            }
        }
        let right = theta_w.ge(&theta_l)?.to_dtype(dtype)?.mean_all()?;
        let figures =
            Tensor::stack(&[&loss, &dpo, &pt, &right, &grad_total], 0)?.to_vec1::<f32>()?;
        let [value, dpo_loss, pt_loss, pair_accuracy, grad_total] = figures[..] else {
            unreachable!("five figures stacked")
        };
        anyhow::ensure!(
            value.is_finite(),
            "the loss is {value} at step {}: lower the learning rate or beta; nothing is exported",
            step + 1
        );
        anyhow::ensure!(
            grad_total.is_finite(),
            "a gradient is not finite at step {}: lower the learning rate or beta; nothing is exported",
            step + 1
        );
        optimizer.step(&grads)?;
        if let (Some(dir), true) = (&config.checkpoint_dir, config.checkpoint_every > 0) {
            if (step + 1) % config.checkpoint_every == 0 {
                std::fs::create_dir_all(dir)?;
                varmap.save(dir.join(format!("checkpoint-{:06}.safetensors", step + 1)))?;
            }
        }
        on_step(AlignStep {
            step: step + 1,
            steps: config.steps,
            loss: value,
            dpo_loss,
            pt_loss,
            pair_accuracy,
        });
    }
    Ok(())
}

/// Trains the alignment adapter (any image tower; embeddings only) on
/// `device` ([`kalon_model::train::training_device`]).
pub fn train_adapter(
    device: &Device,
    set: &TrainingSet<'_>,
    config: &AlignConfig,
    mut on_step: impl FnMut(AlignStep),
) -> anyhow::Result<Adapter> {
    let adapter = Adapter::in_varmap(
        candle_nn::VarMap::new(),
        set.images.dim,
        config.adapter,
        Some(&set.queries.data),
        device,
    )?;
    let embed = |rows: &[usize]| adapter.forward(&gather(set.images, rows, device)?);
    let vars = adapter.vars();
    optimise(
        device,
        set,
        config,
        &adapter.varmap,
        vars,
        &embed,
        &mut on_step,
    )?;
    Ok(adapter)
}

/// What [`train_tower`] returns: the model, its weights (the head's too),
/// its tokenizer, and the beauty head when one was trained with it.
pub struct TrainedTower {
    pub model: kalon_model::TwoTower,
    pub varmap: candle_nn::VarMap,
    pub tokenizer: kalon_encoder::WordTokenizer,
    pub head: Option<Adapter>,
}

impl TrainedTower {
    /// Writes the trained model as an encoder directory; a head is
    /// appended to the exported image tower's graph.
    pub fn export(
        &self,
        out: &Path,
        notes: serde_json::Map<String, serde_json::Value>,
    ) -> anyhow::Result<kalon_encoder::Manifest> {
        let manifest =
            kalon_model::export::export(&self.model, &self.varmap, &self.tokenizer, out, notes)?;
        if let Some(head) = &self.head {
            let path = out.join(&manifest.image.file);
            let tower = std::fs::read(&path)?;
            std::fs::write(&path, head.append_to_tower(&tower)?)?;
        }
        Ok(manifest)
    }
}

/// Trains the whole image tower of Kalon's reference model (its candle
/// weights in `model_dir`) on `device`; the text tower stays frozen.
pub fn train_tower(
    device: &Device,
    data: &Embedded,
    set: &TrainingSet<'_>,
    model_dir: &Path,
    config: &AlignConfig,
    mut on_step: impl FnMut(AlignStep),
) -> anyhow::Result<TrainedTower> {
    let (model, varmap, tokenizer) = kalon_model::export::load(model_dir, device)?;
    let mut vars = {
        let all = varmap.data().lock().expect("varmap lock");
        let mut named: Vec<(&String, &candle_core::Var)> = all
            .iter()
            .filter(|(name, _)| name.starts_with("image."))
            .collect();
        named.sort_by(|a, b| a.0.cmp(b.0));
        named
            .into_iter()
            .map(|(_, var)| var.clone())
            .collect::<Vec<_>>()
    };
    anyhow::ensure!(
        !vars.is_empty(),
        "{} has no image tower weights",
        model_dir.display()
    );
    let head = match config.adapter {
        AdapterKind::Matrix => None,
        AdapterKind::Beauty => {
            let head = Adapter::in_varmap(
                varmap.clone(),
                model.config.dim,
                AdapterKind::Beauty,
                Some(&set.queries.data),
                device,
            )?;
            vars.extend(head.vars());
            Some(head)
        }
    };
    let spec = kalon_model::train::image_spec(&model.config);
    let embed = |rows: &[usize]| {
        let v = model
            .image
            .forward(&data.pairs.pixels(rows, &spec, device)?)?;
        match &head {
            Some(head) => head.forward(&v),
            None => Ok(v),
        }
    };
    optimise(device, set, config, &varmap, vars, &embed, &mut on_step)?;
    Ok(TrainedTower {
        model,
        varmap,
        tokenizer,
        head,
    })
}
