//! `kalonctl train align` and `kalonctl eval align`: Ranked DPO alignment.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use kalon_align::adapter::AdapterKind;
use kalon_align::dataset::{self, Embedded};
use kalon_align::eval;
use kalon_align::pipeline::{self, checkpointed, parent_config, Progress};
use kalon_align::rephrase::PromptVariant;
use kalon_align::train::AlignConfig;
use kalon_align::{AestheticScorer, ImageSource, LmmScorer, LowLevelScorer, ModelScorer};
use kalon_encoder::{Encoder, EncoderOptions};
use kalon_llm::blocking::Blocking;
use kalon_llm::{Judge, LlmClient, LlmConfig};
use kalon_sim_llm::WorldRephraser;
use kalon_sim_llm::{SimConfig, SimServer};

use crate::model::{pooling_tag, prepare, PretrainArgs};

#[derive(Clone, Args)]
pub struct AlignArgs {
    /// D_po: candidates retrieved per training query (K).
    #[arg(long, default_value_t = AlignConfig::default().spec.k)]
    pub dpo_k: usize,
    /// D_po: semantic bands, the matrix rows (u).
    #[arg(long, default_value_t = AlignConfig::default().spec.u)]
    pub dpo_u: usize,
    /// D_po: images per band, the matrix columns (v).
    #[arg(long, default_value_t = AlignConfig::default().spec.v)]
    pub dpo_v: usize,
    /// D_po: take every stride-th candidate in relevance order.
    #[arg(long, default_value_t = AlignConfig::default().spec.stride)]
    pub dpo_stride: usize,
    /// Optimisation steps of the adapter.
    #[arg(long, default_value_t = AlignConfig::default().steps)]
    pub steps: usize,
    /// Training queries used to build D_po.
    #[arg(long, default_value_t = AlignConfig::default().queries)]
    pub queries: usize,
    /// The LLM prompt variant whose rephrasing retrieves D_po's candidates.
    #[arg(long, default_value = "detail")]
    pub variant: PromptVariant,
    #[arg(long, default_value_t = AlignConfig::default().params.beta)]
    pub beta: f64,
    #[arg(long, default_value_t = AlignConfig::default().params.eps)]
    pub eps: f64,
    /// Weight of the InfoNCE regulariser.
    #[arg(long, default_value_t = AlignConfig::default().params.alpha)]
    pub alpha: f64,
    #[arg(long, default_value_t = AlignConfig::default().learning_rate)]
    pub learning_rate: f64,
    /// Train the whole image tower of Kalon's reference model (its candle
    /// weights) instead of the adapter.
    #[arg(long)]
    pub tower: bool,
    /// The adapter's shape: `matrix` trains all d x d entries; `beauty`
    /// trains a beauty read-out added along the queries' mean direction
    /// (with --tower: `beauty` adds that head to the tower, `matrix` trains
    /// the tower alone).
    #[arg(long, default_value = "matrix")]
    pub adapter: AdapterKind,
    /// Save the weights every this many steps into OUT/checkpoints (0: never).
    #[arg(long, default_value_t = 100)]
    pub checkpoint_every: usize,
    /// More preference pairs to train on beside D_po: JSONL, one
    /// {"query", "winner", "loser", "source", "weight", "provenance"} per line
    /// (clicks, ratings, LMM judgments).
    #[arg(long)]
    pub pairs: Option<PathBuf>,
    /// Continue from a checkpoint of this run (OUT/checkpoints/checkpoint-<step>.safetensors).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// What orders each D_po row by beauty: `lmm`, the LMM judge ranking
    /// the row in both orders; `model`, your aesthetic model
    /// (--aesthetic-model); or `low-level` image statistics.
    #[arg(long, value_enum, default_value_t = TeacherKind::Lmm)]
    pub teacher: TeacherKind,
    /// The LMM teacher's OpenAI-compatible endpoint (the other KALON_LLM_*
    /// settings apply). Without it the world's simulated endpoint
    /// (`kalon-sim-llm`) runs in-process.
    #[arg(long, env = "KALON_LLM_BASE_URL")]
    pub llm_base_url: Option<String>,
    /// Where the LMM can fetch the world's images (BASE/<id>.png); without
    /// it they are sent inline as base64 PNG.
    #[arg(long)]
    pub image_base_url: Option<String>,
    /// The `model` teacher: an ONNX score head on the encoder's image
    /// embeddings (`[batch, dim]` in, `[batch]` or `[batch, 1]` out).
    #[arg(long)]
    pub aesthetic_model: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TeacherKind {
    Lmm,
    Model,
    LowLevel,
}

/// The aesthetic teacher `args` asks for, on the world in `world`.
pub fn teacher(
    args: &AlignArgs,
    world: &Path,
    model: &Path,
) -> anyhow::Result<Box<dyn AestheticScorer>> {
    match (args.teacher, &args.aesthetic_model) {
        (TeacherKind::LowLevel, _) => return Ok(Box::new(LowLevelScorer::default())),
        (TeacherKind::Model, Some(head)) => {
            return Ok(Box::new(ModelScorer::load(
                model,
                head,
                &EncoderOptions::from_env()?,
            )?))
        }
        (TeacherKind::Model, None) => {
            anyhow::bail!("--teacher model needs --aesthetic-model FILE.onnx")
        }
        (TeacherKind::Lmm, _) => {}
    }
    let source = match &args.image_base_url {
        Some(base) => ImageSource::Url(base.clone()),
        None => ImageSource::Files(world.to_owned()),
    };
    let blocking = Blocking::new("kalon-lmm-teacher")?;
    let config = match &args.llm_base_url {
        Some(url) => LlmConfig::from_lookup(|name| {
            if name == "KALON_LLM_BASE_URL" {
                Some(url.clone())
            } else {
                std::env::var(name).ok()
            }
        })?,
        None => {
            let spec: serde_json::Value = serde_json::from_slice(
                &std::fs::read(world.join("world.json"))
                    .with_context(|| format!("{} is not a world directory", world.display()))?,
            )?;
            let seed = spec["spec"]["seed"]
                .as_u64()
                .context("world.json has no seed")?;
            let images = spec["images"]
                .as_u64()
                .context("world.json has no image count")? as usize;
            let mut sim = SimConfig::new(seed, images);
            sim.world_dir = Some(world.to_owned());
            let server = blocking.run(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
                SimServer::start(sim, listener).await
            })??;
            eprintln!(
                "teacher: the world's simulated LMM judge, in-process at {}",
                server.base_url()
            );
            let mut config = LlmConfig::new(server.base_url(), "kalon-sim-1");
            config.rate_per_s = 1e6;
            config.burst = 1_000_000;
            // dropping the handle detaches the server task, which keeps
            // serving on `blocking`'s runtime for as long as the scorer lives
            config
        }
    };
    let judge = Judge::new(LlmClient::new(config)?);
    Ok(Box::new(LmmScorer::on(judge, source, blocking)))
}

impl AlignArgs {
    pub fn config(&self, seed: u64) -> AlignConfig {
        let mut config = AlignConfig {
            seed,
            steps: self.steps,
            queries: self.queries,
            learning_rate: self.learning_rate,
            checkpoint_every: self.checkpoint_every,
            resume: self.resume.clone(),
            variant: self.variant,
            pairs_file: self.pairs.clone(),
            adapter: self.adapter,
            ..AlignConfig::default()
        };
        config.params.beta = self.beta;
        config.params.eps = self.eps;
        config.params.alpha = self.alpha;
        config.spec = kalon_align::algorithm::DpoSpec {
            k: self.dpo_k,
            u: self.dpo_u,
            v: self.dpo_v,
            stride: self.dpo_stride,
        };
        config
    }
}

/// Builds D_po on `world` with the encoder in `model` (the world's
/// rephraser), trains and writes the aligned encoder to `out`, with a
/// progress bar; returns the embedded world.
pub fn align(
    world: &Path,
    model: &Path,
    out: &Path,
    config: &AlignConfig,
    tower: bool,
    teacher: &dyn AestheticScorer,
) -> anyhow::Result<Embedded> {
    let job = pipeline::AlignJob {
        dataset: world,
        parent: model,
        out,
        config,
        tower,
        teacher,
        rephraser: &WorldRephraser { seed: config.seed },
    };
    let mut bar = None;
    let aligned = pipeline::align(&job, &mut |progress| match progress {
        Progress::Note(line) => eprintln!("{line}"),
        Progress::Training { steps } => bar = Some(crate::progress_bar(steps as u64, "align")),
        Progress::Step(step) => {
            if let Some(bar) = &bar {
                bar.set_position(step.step as u64);
                bar.set_message(format!("loss {:.3}", step.loss));
            }
        }
    })?;
    if let Some(bar) = bar {
        bar.finish();
    }
    eprintln!(
        "aligned in {:.1} s; encoder written to {}",
        aligned.seconds,
        out.display()
    );
    Ok(aligned.data)
}

/// `pretrain`: how the reference model is pretrained when the world has
/// none yet (its pooling also names the aligned model's directory).
pub fn eval_align(
    state_dir: &Path,
    seed: u64,
    images: usize,
    pretrain: &PretrainArgs,
    json: Option<&Path>,
    args: &AlignArgs,
    retrain: bool,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let prepared = prepare(state_dir, seed, images, None, false, pretrain)?;
    let what = match (args.tower, args.adapter) {
        (false, AdapterKind::Matrix) => "aligned",
        (false, AdapterKind::Beauty) => "aligned-beauty",
        (true, AdapterKind::Matrix) => "aligned-tower",
        (true, AdapterKind::Beauty) => "aligned-tower-beauty",
    };
    let aligned_dir = state_dir.join("models").join(
        format!(
            "{what}{}-{:?}-seed-{seed}-{images}",
            pooling_tag(pretrain.pooling),
            args.teacher
        )
        .to_lowercase(),
    );
    let config = args.config(seed);
    let teacher = teacher(args, &prepared.world, &prepared.model)?;
    // reused only when made with these settings from this very parent
    let recorded = serde_json::to_value(checkpointed(&config, &aligned_dir))?;
    let parent = parent_config(&kalon_encoder::Manifest::load(&prepared.model)?);
    let made = crate::model::made_with(
        &aligned_dir,
        &[("config", &recorded), ("parent_config", &parent)],
    );
    if !made && !retrain && aligned_dir.join(kalon_encoder::MANIFEST_FILE).exists() {
        eprintln!(
            "{} was aligned with other settings or from another model: aligning again",
            aligned_dir.display()
        );
    }
    let data = if retrain || !made {
        align(
            &prepared.world,
            &prepared.model,
            &aligned_dir,
            &config,
            args.tower,
            teacher.as_ref(),
        )?
    } else {
        let encoder = Encoder::load(&prepared.model, &EncoderOptions::from_env()?)?;
        Embedded::load(&prepared.world, &encoder)?
    };
    let items = dataset::read_hpir(&prepared.world)?;
    let options = EncoderOptions::from_env()?;
    let pretrained = Encoder::load(&prepared.model, &options)?;
    let aligned = Encoder::load(&aligned_dir, &options)?;
    let rephraser = WorldRephraser::default();
    let report = eval::alignment_report(
        &pretrained,
        &aligned,
        &data,
        &items,
        teacher.as_ref(),
        &rephraser,
    )?;
    println!(
        "held-out evaluation, world seed {seed}: {} HPIR items, {} held-out captions",
        items.len(),
        data.len() - data.train
    );
    println!(
        "{:<12} {:>14} {:>14} {:>12}",
        "model", "hpir_accuracy", "hpir_aesthetic", "recall@10"
    );
    for (name, f) in [
        ("pretrained", &report.pretrained),
        ("aligned", &report.aligned),
    ] {
        println!(
            "{name:<12} {:>14.3} {:>14.3} {:>12.3}",
            f.hpir_accuracy, f.hpir_aesthetic, f.recall_at_10
        );
    }
    let points = |c: eval::Change| {
        format!(
            "{:+.1} +- {:.1}",
            100.0 * c.change,
            100.0 * c.standard_error
        )
    };
    println!(
        "{:<12} {:>14} {:>14}   (points, paired standard error over the same items)",
        "change",
        points(report.change.hpir_accuracy),
        points(report.change.hpir_aesthetic)
    );
    println!(
        "{:<12} {:>14.3} {:>14.3} {:>12}",
        "teacher", report.scorer.hpir_accuracy, report.scorer.hpir_aesthetic, "-"
    );
    println!(
        "(teacher: the {} scorer alone, rows by mean score)",
        teacher.name()
    );
    println!(
        "\nrephrasing ablation (pretrained model, eval queries rephrased by the world's LLM):"
    );
    println!(
        "{:<12} {:>14} {:>14}",
        "variant", "hpir_accuracy", "hpir_aesthetic"
    );
    for variant in PromptVariant::ALL {
        let agreement = &report.rephrasing_ablation[variant.name()];
        println!(
            "{:<12} {:>14.3} {:>14.3}",
            variant.name(),
            agreement.hpir_accuracy,
            agreement.hpir_aesthetic
        );
    }
    let serde_json::Value::Object(mut report) = serde_json::to_value(&report)? else {
        unreachable!("a struct serialises to an object")
    };
    report.insert("seed".into(), seed.into());
    let report = serde_json::Value::Object(report);
    if let Some(path) = json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    eprintln!("done in {:.1} s", started.elapsed().as_secs_f64());
    println!("{report}");
    Ok(())
}

#[derive(Clone, Args)]
pub struct TrainAlignArgs {
    /// World directory (`kalonctl sim generate`).
    #[arg(long, default_value = "world")]
    pub world: PathBuf,
    /// The pretrained encoder directory to align.
    #[arg(long, default_value = "models/ref")]
    pub model: PathBuf,
    /// Where to write the aligned encoder.
    #[arg(long, default_value = "models/aligned")]
    pub out: PathBuf,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    #[command(flatten)]
    pub args: AlignArgs,
}
