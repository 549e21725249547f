//! Alignment on a world directory: D_po construction, adapter training with
//! the Ranked DPO objective, and the offline evaluation.
//!
//! Everything the model sees goes through the encoder contract (ONNX
//! Runtime): image embeddings of the catalog, text embeddings of queries,
//! rephrasings and captions are computed once; the adapter then trains on
//! them. Candidates for D_po come from the training images only, so the
//! held-out captions' images stay unseen.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use kalon_encoder::image::RgbImage;
use kalon_encoder::{Embeddings, Encoder};
use kalon_model::train::{info_nce, Pairs, Split};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::adapter::{Adapter, AdapterKind};
use crate::algorithm::{
    dpo_matrix, dpo_pairs, hpir_agreement, paired_change, ranked_dpo_loss, DpoParams, DpoSpec,
    Judged,
};
use crate::rephrase::{PromptVariant, Rephraser};
use crate::scorer::{normalise, AestheticScorer, Candidate};

/// A world's data, embedded once by the (frozen) encoder.
pub struct Embedded {
    /// Image-caption pairs, training pairs first, then the held-out ones.
    pub pairs: Pairs,
    pub index: HashMap<String, usize>,
    /// Unit image embeddings, in `pairs` order.
    pub images: Embeddings,
    pub caption_embeds: Embeddings,
    /// How many leading rows are training pairs.
    pub train: usize,
}

impl Embedded {
    pub fn load(world: &Path, encoder: &Encoder) -> anyhow::Result<Embedded> {
        let size = encoder.manifest.image.size as usize;
        let mut pairs = Pairs::load(world, Split::Train, size, None)?;
        let train = pairs.len();
        let held = Pairs::load(world, Split::HeldOut, size, None)?;
        pairs.ids.extend(held.ids);
        pairs.captions.extend(held.captions);
        pairs.rgb.extend(held.rgb);
        let mut pixels = Vec::with_capacity(pairs.len() * 3 * size * size);
        for image in pairs.rgb.chunks_exact(3 * size * size) {
            kalon_encoder::preprocess::push_rgb8(image, &encoder.manifest.image, &mut pixels);
        }
        let images = encoder.image.embed_pixels(&pixels)?;
        let caption_embeds = encoder.text.embed_texts(&pairs.captions)?;
        let index = pairs
            .ids
            .iter()
            .enumerate()
            .map(|(i, id)| (id.clone(), i))
            .collect();
        Ok(Embedded {
            pairs,
            index,
            images,
            caption_embeds,
            train,
        })
    }

    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    pub fn image(&self, i: usize) -> RgbImage {
        let size = self.pairs.size;
        let per = 3 * size * size;
        RgbImage::from_raw(
            size as u32,
            size as u32,
            self.pairs.rgb[i * per..(i + 1) * per].to_vec(),
        )
        .expect("whole image")
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Indices of the `k` rows of `images[..limit]` most similar to `text`.
fn top_k(text: &[f32], images: &Embeddings, limit: usize, k: usize) -> Vec<usize> {
    let mut scored: Vec<(f32, usize)> = (0..limit).map(|i| (dot(text, images.row(i)), i)).collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0));
    scored.into_iter().take(k).map(|(_, i)| i).collect()
}

/// One D_po pair as indices: query row, winner image, loser image.
#[derive(Debug, Clone, Copy)]
pub struct IndexedPair {
    pub query: usize,
    pub winner: usize,
    pub loser: usize,
    pub weight: f32,
}

/// D_po for `queries`: rephrase, retrieve top K for the rephrasing among the
/// training images, order by relevance to the original query, take every
/// `stride`-th into a `u x v` matrix with rows sorted by `scorer`, pairs by
/// the product order. Returns the pairs and the original queries' embeddings.
pub fn build_dpo(
    data: &Embedded,
    encoder: &Encoder,
    queries: &[String],
    rephraser: &dyn Rephraser,
    variant: PromptVariant,
    scorer: &dyn AestheticScorer,
    spec: &DpoSpec,
) -> anyhow::Result<(Vec<IndexedPair>, Embeddings)> {
    spec.validate()?;
    let rephrased = queries
        .iter()
        .map(|q| rephraser.rephrase(q, variant))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let original = encoder.text.embed_texts(queries)?;
    let enriched = encoder.text.embed_texts(&rephrased)?;
    let mut pairs = Vec::new();
    for (q, query) in queries.iter().enumerate() {
        let candidates = top_k(enriched.row(q), &data.images, data.train, spec.k);
        // order of semantic relevance to the ORIGINAL query
        let mut ranked = candidates.clone();
        ranked.sort_by(|a, b| {
            dot(original.row(q), data.images.row(*b))
                .total_cmp(&dot(original.row(q), data.images.row(*a)))
        });
        // the scorer sees only the u x v candidates D_po takes, one
        // semantic band (row) per call: rows are sorted within themselves
        let taken: Vec<usize> = (0..ranked.len())
            .take(spec.k)
            .step_by(spec.stride)
            .take(spec.u * spec.v)
            .collect();
        anyhow::ensure!(
            taken.len() == spec.u * spec.v,
            "only {} candidates for a {}x{} D_po matrix (k {}, stride {}): the catalog is too small",
            taken.len(),
            spec.u,
            spec.v,
            spec.k,
            spec.stride
        );
        let mut scores = vec![0.0; ranked.len()];
        for band in taken.chunks(spec.v) {
            let images: Vec<RgbImage> = band.iter().map(|&c| data.image(ranked[c])).collect();
            let candidates: Vec<Candidate> = band
                .iter()
                .zip(&images)
                .map(|(&c, image)| Candidate {
                    id: &data.pairs.ids[ranked[c]],
                    image,
                })
                .collect();
            let mut band_scores = scorer.score(query, &candidates)?;
            anyhow::ensure!(
                band_scores.len() == band.len() && band_scores.iter().all(|s| s.is_finite()),
                "scorer {} gave {} scores for {} images, or a non-finite one",
                scorer.name(),
                band_scores.len(),
                band.len()
            );
            normalise(&mut band_scores);
            for (&c, s) in band.iter().zip(band_scores) {
                scores[c] = s;
            }
        }
        let local: Vec<usize> = (0..ranked.len()).collect();
        let matrix = dpo_matrix(&local, &scores, spec);
        for (w, l) in dpo_pairs(&matrix) {
            pairs.push(IndexedPair {
                query: q,
                winner: ranked[w],
                loser: ranked[l],
                weight: 1.0,
            });
        }
    }
    Ok((pairs, original))
}

/// Adds preference pairs of any source (clicks, ratings, LMM judgments;
/// see [`crate::feedback`]) to a training set's `pairs` and `queries`: each
/// pair is validated, its query embedded by `encoder`, its images looked up
/// among the training images. Returns how many pairs were skipped because
/// an image is not a training image of this world.
pub fn add_pairs(
    data: &Embedded,
    encoder: &Encoder,
    extra: &[crate::PreferencePair],
    pairs: &mut Vec<IndexedPair>,
    queries: &mut Embeddings,
) -> anyhow::Result<usize> {
    let mut texts: Vec<&str> = Vec::new();
    let mut query_row: HashMap<&str, usize> = HashMap::new();
    let mut skipped = 0;
    let mut indexed = Vec::new();
    for (i, pair) in extra.iter().enumerate() {
        pair.validate()
            .map_err(|e| anyhow::anyhow!("preference pair {}: {e}", i + 1))?;
        let image = |id: &str| data.index.get(id).copied().filter(|&r| r < data.train);
        let (Some(winner), Some(loser)) = (image(&pair.winner), image(&pair.loser)) else {
            skipped += 1;
            continue;
        };
        let next = queries.len() + texts.len();
        let query = *query_row.entry(pair.query.as_str()).or_insert_with(|| {
            texts.push(pair.query.as_str());
            next
        });
        indexed.push(IndexedPair {
            query,
            winner,
            loser,
            weight: pair.weight as f32,
        });
    }
    if !texts.is_empty() {
        let embedded = encoder.text.embed_texts(&texts)?;
        anyhow::ensure!(
            embedded.dim == queries.dim || queries.is_empty(),
            "query embeddings of dimension {} and {} cannot be mixed",
            embedded.dim,
            queries.dim
        );
        queries.dim = embedded.dim;
        queries.data.extend(embedded.data);
    }
    pairs.extend(indexed);
    Ok(skipped)
}

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
}

/// Reads a JSONL file of preference pairs; a bad line is an error naming it.
pub fn read_pairs(path: &Path) -> anyhow::Result<Vec<crate::PreferencePair>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            serde_json::from_str(line).map_err(|e| {
                anyhow::anyhow!(
                    "{} line {}: not a preference pair: {e}",
                    path.display(),
                    i + 1
                )
            })
        })
        .collect()
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
    for step in first..config.steps {
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

/// One HPIR item of `hpir.jsonl`, as the world writes it.
pub use kalon_world::HpirItem as HpirLine;

pub fn read_hpir(world: &Path) -> anyhow::Result<Vec<HpirLine>> {
    let path = world.join("hpir.jsonl");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    text.lines().map(|l| Ok(serde_json::from_str(l)?)).collect()
}

/// Training queries of a world (`queries.jsonl`, split train).
pub fn train_queries(world: &Path) -> anyhow::Result<Vec<String>> {
    let path = world.join("queries.jsonl");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    let mut out = Vec::new();
    for line in text.lines() {
        let row: serde_json::Value = serde_json::from_str(line)?;
        if row["split"] == "train" {
            out.push(row["text"].as_str().unwrap_or_default().to_owned());
        }
    }
    Ok(out)
}

/// Agreement per aspect of a scoring `(query text embedding row, image row)`.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Agreement {
    pub hpir_accuracy: f64,
    pub hpir_aesthetic: f64,
}

/// Each HPIR item's judgment per aspect under one model: its two row
/// scores beside the people's choice, in item order.
#[derive(Debug, Clone)]
pub struct Judgments {
    pub accuracy: Vec<Judged>,
    pub aesthetic: Vec<Judged>,
}

/// A change of agreement between two models on the same items, with its
/// paired standard error ([`paired_change`]), as fractions.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Change {
    pub change: f64,
    pub standard_error: f64,
}

/// The change per aspect from one model to another.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct AgreementChange {
    pub hpir_accuracy: Change,
    pub hpir_aesthetic: Change,
}

impl Judgments {
    pub fn agreement(&self) -> Agreement {
        Agreement {
            hpir_accuracy: hpir_agreement(&self.accuracy),
            hpir_aesthetic: hpir_agreement(&self.aesthetic),
        }
    }

    /// How agreement changed from `before` (judged on the same items).
    pub fn change_from(&self, before: &Judgments) -> AgreementChange {
        let change = |b: &[Judged], a: &[Judged]| {
            let (change, standard_error) = paired_change(b, a);
            Change {
                change,
                standard_error,
            }
        };
        AgreementChange {
            hpir_accuracy: change(&before.accuracy, &self.accuracy),
            hpir_aesthetic: change(&before.aesthetic, &self.aesthetic),
        }
    }
}

/// Each item's judgments when `row_score(item, row)` scores a row of item
/// number `item` (the model prefers the row with the higher score).
pub fn judgments_by(
    items: &[HpirLine],
    mut row_scores: impl FnMut(usize, &HpirLine) -> anyhow::Result<(f64, f64)>,
) -> anyhow::Result<Judgments> {
    let mut judgments = Judgments {
        accuracy: Vec::with_capacity(items.len()),
        aesthetic: Vec::with_capacity(items.len()),
    };
    for (i, item) in items.iter().enumerate() {
        let (a, b) = row_scores(i, item)?;
        for (label, out) in [
            (&item.accuracy, &mut judgments.accuracy),
            (&item.aesthetic, &mut judgments.aesthetic),
        ] {
            out.push(Judged {
                mean_a: a,
                mean_b: b,
                people_chose_a: label.choice == kalon_world::oracle::Choice::A,
                confidence: label.confidence,
            });
        }
    }
    Ok(judgments)
}

/// HPIR agreement per aspect of a row scoring ([`judgments_by`]).
pub fn agreement_by(
    items: &[HpirLine],
    row_scores: impl FnMut(usize, &HpirLine) -> anyhow::Result<(f64, f64)>,
) -> anyhow::Result<Agreement> {
    Ok(judgments_by(items, row_scores)?.agreement())
}

fn catalog_row(data: &Embedded, id: &str) -> anyhow::Result<usize> {
    data.index
        .get(id)
        .copied()
        .ok_or_else(|| anyhow::anyhow!("HPIR image {id} is not in the catalog"))
}

/// HPIR judgments of a model: `query_embeds[i]` embeds `items[i].query`
/// (possibly rephrased); `images` are its catalog embeddings; a row scores
/// its mean similarity.
pub fn judgments(
    items: &[HpirLine],
    query_embeds: &Embeddings,
    data: &Embedded,
    images: &Embeddings,
) -> anyhow::Result<Judgments> {
    judgments_by(items, |i, item| {
        let mean = |row: &[String]| -> anyhow::Result<f64> {
            let mut sum = 0.0;
            for id in row {
                sum += f64::from(dot(query_embeds.row(i), images.row(catalog_row(data, id)?)));
            }
            Ok(sum / row.len() as f64)
        };
        Ok((mean(&item.row_a)?, mean(&item.row_b)?))
    })
}

/// Recall@10 of held-out captions against held-out images.
pub fn held_out_recall_at_10(data: &Embedded, images: &Embeddings) -> f64 {
    let dim = images.dim;
    let rows = |e: &Embeddings| Embeddings {
        dim,
        data: e.data[data.train * dim..].to_vec(),
    };
    kalon_model::eval::recall_at(&rows(&data.caption_embeds), &rows(images), &[10])[0]
}

/// HPIR agreement of an aesthetic scorer alone (rows by mean score): how
/// good the teacher of D_po's re-ranking is, on the same held-out items.
pub fn scorer_agreement(
    items: &[HpirLine],
    data: &Embedded,
    scorer: &dyn AestheticScorer,
) -> anyhow::Result<Agreement> {
    // both rows in one call: a ranking judge's scores compare within a call
    agreement_by(items, |_, item| {
        let ids: Vec<&String> = item.row_a.iter().chain(&item.row_b).collect();
        let images = ids
            .iter()
            .map(|id| Ok(data.image(catalog_row(data, id)?)))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let candidates: Vec<Candidate> = ids
            .iter()
            .zip(&images)
            .map(|(id, image)| Candidate { id, image })
            .collect();
        let scores = scorer.score(&item.query, &candidates)?;
        let n = item.row_a.len();
        let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len().max(1) as f64;
        Ok((mean(&scores[..n]), mean(&scores[n..])))
    })
}
