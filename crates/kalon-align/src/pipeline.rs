//! The whole alignment run as one library call: embed the dataset, build
//! D_po (and add extra pairs), train the adapter or the tower with Ranked
//! DPO, write the aligned encoder with its notes. `kalonctl train align`
//! drives it with a progress bar; the coming trainer service drives it from
//! its schedule. The rephraser and the teacher are the caller's (the
//! simulated world's, or real LLM/LMM endpoints), so nothing here links the
//! simulator.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use kalon_encoder::{Encoder, EncoderOptions};
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::adapter::AdapterKind;
use crate::dataset::Embedded;
use crate::rephrase::Rephraser;
use crate::train::{AlignConfig, AlignStep};
use crate::{dataset, dpo, train, AestheticScorer, PreferencePair};

/// One alignment run.
pub struct AlignJob<'a> {
    /// The dataset folder (`kalon_dataset`'s format).
    pub dataset: &'a Path,
    /// The encoder directory to align.
    pub parent: &'a Path,
    /// Where the aligned encoder goes (with `align-log.jsonl` and checkpoints).
    pub out: &'a Path,
    pub config: &'a AlignConfig,
    /// Train the whole image tower (Kalon's reference model) instead of the adapter.
    pub tower: bool,
    /// Orders each D_po row by beauty.
    pub teacher: &'a dyn AestheticScorer,
    /// Rephrases the training queries that retrieve D_po's candidates.
    pub rephraser: &'a dyn Rephraser,
}

/// What a run reports while it works.
pub enum Progress<'a> {
    /// A line for people (what was built, how big).
    Note(String),
    /// Training starts: this many steps.
    Training { steps: usize },
    /// One optimisation step done (also written to `align-log.jsonl`).
    Step(&'a AlignStep),
}

/// A finished run.
pub struct Aligned {
    /// The dataset as the parent encoder embedded it.
    pub data: Embedded,
    /// Training pairs (D_po and extra).
    pub pairs: usize,
    pub seconds: f64,
}

enum Trained {
    Adapter(crate::adapter::Adapter),
    Tower(Box<train::TrainedTower>),
}

/// `config` as a run into `out` applies it: checkpoints in OUT/checkpoints
/// (what the aligned model's notes record).
pub fn checkpointed(config: &AlignConfig, out: &Path) -> AlignConfig {
    AlignConfig {
        checkpoint_dir: Some(out.join("checkpoints")),
        ..config.clone()
    }
}

/// How an encoder was trained (its manifest's `config` note; null for an
/// encoder Kalon did not train).
pub fn parent_config(manifest: &kalon_encoder::Manifest) -> serde_json::Value {
    manifest
        .notes
        .get("config")
        .cloned()
        .unwrap_or(serde_json::Value::Null)
}

/// Builds D_po on the dataset with the parent encoder, trains, and writes
/// the aligned encoder to `job.out`.
pub fn align(job: &AlignJob, progress: &mut dyn FnMut(Progress<'_>)) -> anyhow::Result<Aligned> {
    let (world, model, out, config) = (job.dataset, job.parent, job.out, job.config);
    let started = Instant::now();
    let encoder = Encoder::load(model, &EncoderOptions::from_env()?)?;
    let data = Embedded::load(world, &encoder)?;
    let mut queries = dataset::train_queries(world)?;
    queries.shuffle(&mut rand::rngs::StdRng::seed_from_u64(config.seed));
    queries.truncate(config.queries);
    let (mut pairs, mut query_embeds) = dpo::build_dpo(
        &data,
        &encoder,
        &queries,
        job.rephraser,
        config.variant,
        job.teacher,
        &config.spec,
    )?;
    progress(Progress::Note(format!(
        "D_po: {} pairs from {} training queries ({:?} rephrasing, rows ordered by the {} teacher)",
        pairs.len(),
        queries.len(),
        config.variant,
        job.teacher.name()
    )));
    if let Some(path) = &config.pairs_file {
        let extra = dataset::read_pairs(path)?;
        let skipped = dpo::add_pairs(&data, &encoder, &extra, &mut pairs, &mut query_embeds)?;
        progress(Progress::Note(format!(
            "feedback: {} pairs from {} added ({skipped} skipped: an image is not a training image of this world)",
            extra.len() - skipped,
            path.display()
        )));
    }
    if config.adapter == AdapterKind::Beauty {
        // the beauty term reaches query q with weight t(q) . m
        if let Some(m) = crate::adapter::mean_direction(&query_embeds.data, query_embeds.dim) {
            let reach: Vec<f32> = query_embeds
                .data
                .chunks_exact(query_embeds.dim)
                .map(|t| t.iter().zip(&m).map(|(a, b)| a * b).sum())
                .collect();
            let min = reach.iter().copied().fold(f32::INFINITY, f32::min);
            let mean = reach.iter().sum::<f32>() / reach.len() as f32;
            progress(Progress::Note(format!(
                "beauty head: t(q) . m over the training queries: mean {mean:.3}, min {min:.3} ({} of {} positive)",
                reach.iter().filter(|r| **r > 0.0).count(),
                reach.len()
            )));
        }
    }
    progress(Progress::Training {
        steps: config.steps,
    });
    let config = &checkpointed(config, out);
    let device = kalon_model::train::training_device()?;
    let set = data.training_set(&query_embeds, &pairs);
    let training = Instant::now();
    let (trained, last) = logged_steps(out, progress, |on_step| {
        Ok(if job.tower {
            Trained::Tower(Box::new(train::train_tower(
                &device, &data, &set, model, config, on_step,
            )?))
        } else {
            Trained::Adapter(train::train_adapter(&device, &set, config, on_step)?)
        })
    })?;
    let train_seconds = training.elapsed().as_secs_f64();
    let seconds = started.elapsed().as_secs_f64();
    let notes = serde_json::json!({
        "parent_config": parent_config(&encoder.manifest),
        "trainer": if job.tower { "kalonctl train align --tower (Ranked DPO, whole image tower)" } else { "kalonctl train align (Ranked DPO adapter)" },
        "parent": model.display().to_string(),
        "world": world.display().to_string(),
        "pairs": pairs.len(),
        "config": config,
        "last_step": last,
        "seconds": (seconds * 10.0).round() / 10.0,
        "pairs_per_s": ((config.steps * config.pair_batch) as f64 / train_seconds).round(),
    });
    let serde_json::Value::Object(notes) = notes else {
        unreachable!("an object literal")
    };
    match trained {
        Trained::Adapter(adapter) => {
            adapter.export(model, out, notes)?;
        }
        Trained::Tower(trained) => {
            trained.export(out, notes)?;
        }
    }
    Ok(Aligned {
        data,
        pairs: pairs.len(),
        seconds,
    })
}

/// Runs `train` with a step callback that reports each step to `progress`
/// and appends it to `out/align-log.jsonl` (one flushed line per step, so
/// `tail -f` follows the run); returns what it trained and the last step.
fn logged_steps<T>(
    out: &Path,
    progress: &mut dyn FnMut(Progress<'_>),
    train: impl FnOnce(&mut dyn FnMut(AlignStep)) -> anyhow::Result<T>,
) -> anyhow::Result<(T, Option<AlignStep>)> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let log_path = out.join("align-log.jsonl");
    let mut log = std::io::BufWriter::new(
        std::fs::File::create(&log_path)
            .with_context(|| format!("cannot create {}", log_path.display()))?,
    );
    let mut last = None;
    let trained = train(&mut |step: AlignStep| {
        progress(Progress::Step(&step));
        let _ = serde_json::to_writer(&mut log, &step);
        let _ = log.write_all(b"\n").and_then(|()| log.flush());
        last = Some(step);
    })?;
    log.flush()?;
    Ok((trained, last))
}

/// A training run on preference pairs alone (the trainer service's): the
/// adapter on `parent`, trained with Ranked DPO on `pairs` (every source,
/// each with its confidence weight) and the dataset's captions as the
/// anchor, exported to `out`.
pub struct PairsJob<'a> {
    /// The dataset folder: the catalog's images and captions.
    pub dataset: &'a Path,
    pub parent: &'a Path,
    pub out: &'a Path,
    pub config: &'a AlignConfig,
    pub pairs: &'a [PreferencePair],
    pub device: &'a candle_core::Device,
    /// Written into the aligned encoder's manifest notes (run id, window).
    pub notes: serde_json::Map<String, serde_json::Value>,
}

/// Seconds per phase of a [`train_on_pairs`] run.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct PhaseSeconds {
    pub load: f64,
    pub train: f64,
    pub export: f64,
}

/// A finished [`train_on_pairs`] run.
pub struct TrainedOnPairs {
    /// The parent encoder, and the dataset as it embedded it.
    pub parent: Encoder,
    pub data: Embedded,
    /// Pairs trained on, and pairs skipped because an image is not a
    /// training image of the catalog.
    pub used: usize,
    pub skipped: usize,
    pub last: Option<AlignStep>,
    pub seconds: PhaseSeconds,
}

/// What [`train_on_pairs`] found before training: too few usable pairs.
#[derive(Debug, thiserror::Error)]
#[error("{usable} usable pairs ({skipped} skipped: an image is not a training image of the catalog); a run needs at least {needed}")]
pub struct TooFewPairs {
    pub usable: usize,
    pub skipped: usize,
    pub needed: usize,
}

/// Trains the adapter on `job.pairs` (at least `min_pairs` of them usable).
pub fn train_on_pairs(
    job: &PairsJob,
    min_pairs: usize,
    progress: &mut dyn FnMut(Progress<'_>),
) -> anyhow::Result<TrainedOnPairs> {
    let started = Instant::now();
    let parent = Encoder::load(job.parent, &EncoderOptions::from_env()?)
        .with_context(|| format!("cannot load the parent encoder {}", job.parent.display()))?;
    let data = Embedded::load(job.dataset, &parent)?;
    let mut pairs = Vec::new();
    let mut queries = kalon_encoder::Embeddings {
        dim: parent.manifest.embedding_dim,
        data: Vec::new(),
    };
    let skipped = dpo::add_pairs(&data, &parent, job.pairs, &mut pairs, &mut queries)?;
    if pairs.len() < min_pairs.max(1) {
        return Err(TooFewPairs {
            usable: pairs.len(),
            skipped,
            needed: min_pairs.max(1),
        }
        .into());
    }
    let load = started.elapsed().as_secs_f64();
    progress(Progress::Note(format!(
        "{} pairs ({skipped} skipped), {} queries, {} catalog images embedded in {load:.1} s",
        pairs.len(),
        queries.len(),
        data.len()
    )));
    progress(Progress::Training {
        steps: job.config.steps,
    });
    let set = data.training_set(&queries, &pairs);
    let training = Instant::now();
    let (adapter, last) = logged_steps(job.out, progress, |on_step| {
        train::train_adapter(job.device, &set, job.config, on_step)
    })?;
    let train_seconds = training.elapsed().as_secs_f64();
    let exporting = Instant::now();
    let mut notes = job.notes.clone();
    notes.insert("parent_config".into(), parent_config(&parent.manifest));
    notes.insert("pairs".into(), pairs.len().into());
    notes.insert("config".into(), serde_json::to_value(job.config)?);
    notes.insert("last_step".into(), serde_json::to_value(last)?);
    adapter.export(job.parent, job.out, notes)?;
    let used = pairs.len();
    Ok(TrainedOnPairs {
        parent,
        data,
        used,
        skipped,
        last,
        seconds: PhaseSeconds {
            load,
            train: train_seconds,
            export: exporting.elapsed().as_secs_f64(),
        },
    })
}
