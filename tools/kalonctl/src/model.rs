//! `kalonctl train ...` and `kalonctl eval ...`: the reference model.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::{Args, Subcommand};
use kalon_encoder::{Encoder, EncoderOptions, Manifest};
use kalon_model::eval::RetrievalReport;
use kalon_model::train::{Pairs, PretrainConfig, Split};
use kalon_model::Pooling;

#[derive(Clone, Args)]
pub struct PretrainArgs {
    /// Seed of the initial weights and the batch order [default: the world's seed, else 1].
    #[arg(long)]
    pub init_seed: Option<u64>,
    #[arg(long, default_value_t = PretrainConfig::default().epochs)]
    pub epochs: usize,
    #[arg(long, default_value_t = PretrainConfig::default().batch_size)]
    pub batch_size: usize,
    #[arg(long, default_value_t = PretrainConfig::default().learning_rate)]
    pub learning_rate: f64,
    /// Label smoothing of the InfoNCE targets.
    #[arg(long, default_value_t = PretrainConfig::default().label_smoothing)]
    pub label_smoothing: f64,
    /// Train on at most this many pairs.
    #[arg(long)]
    pub max_pairs: Option<usize>,
    /// The image tower's global pooling: `mean-std` (the per-channel mean
    /// and standard deviation; sees more of an image's content and
    /// aesthetics), or `mean` (what models before it used).
    #[arg(long, default_value_t = PretrainConfig::default().pooling)]
    pub pooling: Pooling,
}

impl PretrainArgs {
    /// The command-line defaults.
    pub fn defaults() -> Self {
        let c = PretrainConfig::default();
        PretrainArgs {
            init_seed: None,
            epochs: c.epochs,
            batch_size: c.batch_size,
            learning_rate: c.learning_rate,
            label_smoothing: c.label_smoothing,
            max_pairs: c.max_pairs,
            pooling: c.pooling,
        }
    }

    fn config(&self) -> PretrainConfig {
        PretrainConfig {
            seed: self.init_seed.unwrap_or(1),
            epochs: self.epochs,
            batch_size: self.batch_size,
            learning_rate: self.learning_rate,
            label_smoothing: self.label_smoothing,
            max_pairs: self.max_pairs,
            pooling: self.pooling,
            ..PretrainConfig::default()
        }
    }
}

#[derive(Clone, Subcommand)]
pub enum Train {
    /// Contrastive pretraining (symmetric InfoNCE, label smoothing) of the reference two-tower model on a world's captions, exported to ONNX.
    Pretrain {
        /// A world directory (`kalonctl sim generate`).
        #[arg(long, default_value = "world")]
        world: PathBuf,
        /// Encoder directory to write.
        #[arg(long, default_value = "models/ref")]
        out: PathBuf,
        #[command(flatten)]
        args: PretrainArgs,
    },
    /// Ranked DPO alignment: D_po from LLM rephrasing + aesthetic re-ranking, an adapter on the image tower trained on the original queries, exported into the tower's ONNX graph.
    Align(crate::align::TrainAlignArgs),
    /// Ask the trainer service to train now (from the promoted version, on the pairs in its window).
    Now(crate::trainer::NowArgs),
}

#[derive(Clone, Subcommand)]
pub enum Eval {
    /// Zero-shot retrieval of held-out captions against their images through ONNX Runtime; builds the world and pretrains the model first when they are not there.
    Retrieval {
        /// The world's seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Images in the world (a tenth are held out).
        #[arg(long, default_value_t = 10_000)]
        images: usize,
        /// Evaluate this encoder directory instead of the one pretrained for the seed.
        #[arg(long)]
        model: Option<PathBuf>,
        /// Pretrain again even when a model for this world exists.
        #[arg(long)]
        retrain: bool,
        #[command(flatten)]
        args: PretrainArgs,
    },
    /// Pretrained vs aligned on held-out queries: HPIR agreement per aspect, recall@10, and the rephrasing ablation; builds world, pretrained and aligned models when missing.
    Align {
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, default_value_t = 10_000)]
        images: usize,
        /// Also write the figures as one JSON object to this file.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Align again even when an aligned model for this world exists.
        #[arg(long)]
        retrain: bool,
        /// The pretrained reference model's image pooling (`mean-std` or
        /// `mean`); each pooling keeps its own models.
        #[arg(long, default_value_t = PretrainConfig::default().pooling)]
        pooling: Pooling,
        /// Epochs of the reference model's pretraining (a cached model
        /// pretrained otherwise is pretrained again).
        #[arg(long, default_value_t = PretrainConfig::default().epochs)]
        pretrain_epochs: usize,
        /// Batch size of the reference model's pretraining.
        #[arg(long, default_value_t = PretrainConfig::default().batch_size)]
        pretrain_batch_size: usize,
        #[command(flatten)]
        args: crate::align::AlignArgs,
    },
}

/// Pretrains on `world` into `out` with a progress bar.
pub fn pretrain(world: &Path, out: &Path, args: &PretrainArgs) -> anyhow::Result<()> {
    let config = args.config();
    let bar = crate::progress_bar(0, "pretrain");
    let trained = kalon_model::train::pretrain(world, &config, |step| {
        if bar.length() != Some(step.steps as u64) {
            bar.set_length(step.steps as u64);
        }
        bar.set_position(step.step as u64);
        bar.set_message(format!("loss {:.3}", step.loss));
    })?;
    bar.finish();
    let notes = serde_json::json!({
        "trainer": "kalonctl train pretrain",
        "world": world.display().to_string(),
        "pairs": trained.pairs,
        "config": config,
        "first_loss": trained.losses.first(),
        "final_loss": trained.losses.last(),
        "seconds": (trained.seconds * 10.0).round() / 10.0,
    });
    let serde_json::Value::Object(notes) = notes else {
        unreachable!("an object literal")
    };
    kalon_model::export::export(
        &trained.model,
        &trained.varmap,
        &trained.tokenizer,
        out,
        notes,
    )?;
    let first = trained.losses.first().copied().unwrap_or_default();
    let last = trained.losses.last().copied().unwrap_or_default();
    eprintln!(
        "pretrained on {} pairs in {:.1} s ({} steps, loss {first:.3} -> {last:.3}); encoder written to {}",
        trained.pairs,
        trained.seconds,
        trained.losses.len(),
        out.display()
    );
    Ok(())
}

/// The world of a seed and size under the state directory, built when
/// missing or when it was built with other settings than today's
/// (`world.json`'s spec: an older world has fewer HPIR items, say).
pub fn cached_world(state_dir: &Path, seed: u64, images: usize) -> anyhow::Result<PathBuf> {
    let world = state_dir
        .join("worlds")
        .join(format!("seed-{seed}-{images}"));
    let wanted = serde_json::to_value(crate::sim::spec(seed, images, 64))?;
    let built = std::fs::read(world.join("world.json"))
        .ok()
        .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok());
    if built.as_ref().map(|b| &b["spec"]) != Some(&wanted) {
        let again = if built.is_some() {
            " again: it was built with other settings"
        } else {
            ""
        };
        eprintln!(
            "building world seed {seed} ({images} images) in {}{again}",
            world.display()
        );
        crate::sim::generate(seed, images, 64, &world)?;
    }
    Ok(world)
}

/// Whether the encoder in `dir` was made with these settings: each
/// `(key, value)` is in its manifest's notes. False when there is no
/// encoder there, so a cached model made with other options is made again
/// instead of being reused under the wrong name.
pub fn made_with(dir: &Path, settings: &[(&str, &serde_json::Value)]) -> bool {
    Manifest::load(dir).is_ok_and(|manifest| {
        settings
            .iter()
            .all(|(key, value)| manifest.notes.get(*key) == Some(*value))
    })
}

/// The world and model `eval` and `bench` use for a seed, built when missing.
pub struct Prepared {
    pub world: PathBuf,
    pub model: PathBuf,
}

pub fn prepare(
    state_dir: &Path,
    seed: u64,
    images: usize,
    model: Option<&Path>,
    retrain: bool,
    args: &PretrainArgs,
) -> anyhow::Result<Prepared> {
    let world = cached_world(state_dir, seed, images)?;
    let model = match model {
        Some(dir) => dir.to_owned(),
        None => {
            let dir = state_dir.join("models").join(format!(
                "ref{}-seed-{seed}-{images}",
                pooling_tag(args.pooling)
            ));
            let mut args = args.clone();
            args.init_seed = args.init_seed.or(Some(seed));
            let config = serde_json::to_value(args.config())?;
            if retrain || !made_with(&dir, &[("config", &config)]) {
                let again = if dir.join(kalon_encoder::MANIFEST_FILE).exists() && !retrain {
                    " again: the cached model was pretrained with other settings"
                } else {
                    ""
                };
                eprintln!("pretraining the reference model for world seed {seed}{again}");
                pretrain(&world, &dir, &args)?;
            }
            dir
        }
    };
    Ok(Prepared { world, model })
}

/// What a model directory's name says of its pooling: nothing for mean
/// pooling (the default before mean-std; its directories keep their names).
pub fn pooling_tag(pooling: Pooling) -> String {
    match pooling {
        Pooling::Mean => String::new(),
        other => format!("-{other}"),
    }
}

/// Image file bytes of held-out pairs, with their captions.
pub fn held_out_files(world: &Path) -> anyhow::Result<(Vec<Vec<u8>>, Vec<String>)> {
    let pairs = Pairs::load(world, Split::HeldOut, 64, None)?;
    let files = pairs
        .ids
        .iter()
        .map(|id| {
            let path = world.join("images").join(format!("{id}.png"));
            std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok((files, pairs.captions))
}

pub fn run_train(train: &Train) -> anyhow::Result<()> {
    match train {
        Train::Pretrain { world, out, args } => pretrain(world, out, args),
        Train::Now(_) => unreachable!("kalonctl runs `train now` on the async runtime"),
        Train::Align(a) => {
            let teacher = crate::align::teacher(&a.args, &a.world, &a.model)?;
            crate::align::align(
                &a.world,
                &a.model,
                &a.out,
                &a.args.config(a.seed),
                a.args.tower,
                teacher.as_ref(),
            )
            .map(|_| ())
        }
    }
}

pub fn run_eval(state_dir: &Path, eval: &Eval) -> anyhow::Result<()> {
    match eval {
        Eval::Retrieval {
            seed,
            images,
            model,
            retrain,
            args,
        } => {
            let started = Instant::now();
            let prepared = prepare(state_dir, *seed, *images, model.as_deref(), *retrain, args)?;
            let encoder = Encoder::load(&prepared.model, &EncoderOptions::from_env()?)?;
            let (files, captions) = held_out_files(&prepared.world)?;
            let image_embeds = encoder.image.embed_files(&files)?;
            let text_embeds = encoder.text.embed_texts(&captions)?;
            let report = RetrievalReport::new(*seed, &text_embeds, &image_embeds);
            let manifest = Manifest::load(&prepared.model)?;
            println!(
                "held-out caption -> image retrieval, world seed {seed}, {} pairs, model {} ({})",
                report.pairs,
                manifest.name,
                prepared.model.display()
            );
            println!("{:<10} {:>8} {:>8}", "metric", "model", "chance");
            for (k, got, chance) in [
                (1, report.recall_at_1, report.chance_at_1),
                (5, report.recall_at_5, report.chance_at_5),
                (10, report.recall_at_10, report.chance_at_10),
            ] {
                println!("{:<10} {got:>8.3} {chance:>8.3}", format!("recall@{k}"));
            }
            eprintln!("done in {:.1} s", started.elapsed().as_secs_f64());
            println!("{}", serde_json::to_string(&report)?);
            Ok(())
        }
        Eval::Align {
            seed,
            images,
            json,
            retrain,
            pooling,
            pretrain_epochs,
            pretrain_batch_size,
            args,
        } => {
            let pretrain = PretrainArgs {
                pooling: *pooling,
                epochs: *pretrain_epochs,
                batch_size: *pretrain_batch_size,
                ..PretrainArgs::defaults()
            };
            crate::align::eval_align(
                state_dir,
                *seed,
                *images,
                &pretrain,
                json.as_deref(),
                args,
                *retrain,
            )
        }
    }
}

#[derive(Clone, Subcommand)]
pub enum EncoderAction {
    /// Load an encoder directory through ONNX Runtime, check it against the contract (docs/ENCODER_CONTRACT.md) and embed one image and one text.
    Check {
        /// The encoder directory (holding kalon-model.json).
        #[arg(long)]
        model: PathBuf,
    },
}

pub fn run_encoder(action: &EncoderAction) -> anyhow::Result<()> {
    match action {
        EncoderAction::Check { model } => {
            let encoder = Encoder::load(model, &EncoderOptions::from_env()?)?;
            let m = &encoder.manifest;
            let grey = kalon_encoder::image::RgbImage::from_pixel(
                m.image.size,
                m.image.size,
                kalon_encoder::image::Rgb([128, 128, 128]),
            );
            let image = encoder.image.embed_images(&[grey])?;
            let text = encoder.text.embed_texts(&["a photo"])?;
            println!(
                "{}",
                serde_json::json!({
                    "model": model.display().to_string(),
                    "name": m.name,
                    "embedding_dim": m.embedding_dim,
                    "image_size": m.image.size,
                    "max_len": m.text.max_len,
                    "vocab_size": encoder.text.tokenizer().vocab_size(),
                    "image_embedding_norm": image.row(0).iter().map(|x| x * x).sum::<f32>().sqrt(),
                    "text_embedding_norm": text.row(0).iter().map(|x| x * x).sum::<f32>().sqrt(),
                    "contract": "ok",
                })
            );
            Ok(())
        }
    }
}
