//! `kalonctl index`, `kalonctl deploy` and `kalonctl serve`: putting model
//! versions into search.

use std::path::PathBuf;

use clap::Args;
use kalon_encoder::EncoderOptions;
use kalon_registry::indexer::{self, IndexJob};

use crate::Endpoints;

#[derive(Debug, Clone, Args)]
pub struct IndexArgs {
    /// Name of the version (1-64 of A-Z a-z 0-9 . _ -), e.g. `ref-2026-11-27`.
    #[arg(long)]
    pub model_version: String,
    /// The version's encoder directory (docs/ENCODER_CONTRACT.md).
    #[arg(long)]
    pub model: PathBuf,
    /// The catalog: a folder of `<image id>.png`, or a world directory
    /// (its `images/` folder is used).
    #[arg(long)]
    pub images: PathBuf,
    /// The version this one was aligned from; by default found from the
    /// encoder's manifest (an aligned encoder notes its parent's directory).
    #[arg(long)]
    pub parent: Option<String>,
    /// Run the image tower even when the parent's embeddings could be reused.
    #[arg(long)]
    pub full: bool,
    /// Images per image-tower batch.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
}

impl IndexArgs {
    pub fn image_folder(&self) -> PathBuf {
        let nested = self.images.join("images");
        if nested.is_dir() {
            nested
        } else {
            self.images.clone()
        }
    }
}

/// Embeds the catalog under a version, with a progress bar; prints the
/// outcome as the last line (JSON).
pub async fn index(endpoints: &Endpoints, args: &IndexArgs) -> anyhow::Result<indexer::Indexed> {
    let pool = kalon_db::connect(&endpoints.database_url, 4).await?;
    kalon_db::check_schema(&pool).await?;
    let options = EncoderOptions::from_env()?;
    let folder = args.image_folder();
    let bar = crate::progress_bar(0, "indexing");
    let outcome = indexer::index_version(
        &pool,
        IndexJob {
            version: &args.model_version,
            encoder_dir: &args.model,
            images: &folder,
            parent: args.parent.as_deref(),
            force_tower: args.full,
            batch: args.batch,
            options: &options,
        },
        |done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        },
    )
    .await?;
    bar.finish_and_clear();
    eprintln!(
        "indexed {} images under {} in {:.1} s ({:.0} images/s, {})",
        outcome.images,
        outcome.model_version,
        outcome.seconds,
        outcome.images_per_s,
        outcome.method
    );
    println!("{}", serde_json::to_string(&outcome)?);
    Ok(outcome)
}

#[derive(Debug, Clone, Args)]
pub struct DeployArgs {
    /// An indexed version.
    #[arg(long)]
    pub model_version: String,
    /// The variant name responses and impressions carry (e.g. `control`,
    /// `canary`); a name already in use moves to this version.
    #[arg(long, default_value = "main")]
    pub variant: String,
    /// Share of traffic, relative to the other deployments' weights.
    #[arg(long, default_value_t = 1.0)]
    pub weight: f64,
    /// Take the version out of service instead.
    #[arg(long, conflicts_with_all = ["variant", "weight"])]
    pub remove: bool,
}

/// Writes the deployment and announces it to every search replica.
pub async fn deploy(endpoints: &Endpoints, args: &DeployArgs) -> anyhow::Result<()> {
    let pool = kalon_db::connect(&endpoints.database_url, 2).await?;
    kalon_db::check_schema(&pool).await?;
    if args.remove {
        if !kalon_registry::deploy::withdraw(&pool, &endpoints.kafka, &args.model_version).await? {
            anyhow::bail!("{} is not deployed", args.model_version);
        }
    } else {
        kalon_registry::deploy::deploy(
            &pool,
            &endpoints.kafka,
            &args.model_version,
            &args.variant,
            args.weight,
        )
        .await?;
    }
    for d in kalon_registry::store::deployments(&pool).await? {
        eprintln!(
            "{:<12} {:<24} weight {}",
            d.variant, d.model_version, d.weight
        );
    }
    Ok(())
}

#[derive(Debug, Clone, Args)]
pub struct BootstrapArgs {
    /// Where the catalog and the model go (`DIR/world`, `DIR/models/VERSION`).
    #[arg(long)]
    pub dir: PathBuf,
    /// Simulated world seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Images in the simulated catalog.
    #[arg(long, default_value_t = 10_000)]
    pub images: usize,
    /// Version name of the reference model.
    #[arg(long, default_value = "ref-1")]
    pub model_version: String,
}

/// A search that answers out of the box: a simulated catalog, the reference
/// model pretrained on it, indexed and deployed as `main`. Each step is
/// skipped when its result is already there, so running it again is cheap
/// (docker-compose runs it on every start).
pub async fn bootstrap(endpoints: &Endpoints, args: &BootstrapArgs) -> anyhow::Result<()> {
    let world = args.dir.join("world");
    let model = args.dir.join("models").join(&args.model_version);
    let (seed, images) = (args.seed, args.images);
    let (w, m) = (world.clone(), model.clone());
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        if !w.join("world.json").exists() {
            crate::sim::generate(seed, images, 64, &w)?;
        }
        if !m.join(kalon_encoder::MANIFEST_FILE).exists() {
            let mut pretrain = crate::model::PretrainArgs::defaults();
            pretrain.init_seed = Some(seed);
            crate::model::pretrain(&w, &m, &pretrain)?;
        }
        Ok(())
    })
    .await??;
    let pool = kalon_db::connect(&endpoints.database_url, 2).await?;
    kalon_db::check_schema(&pool).await?;
    let indexed = kalon_registry::store::version(&pool, &args.model_version).await?;
    if indexed.is_none_or(|v| v.images_indexed == 0) {
        index(
            endpoints,
            &IndexArgs {
                model_version: args.model_version.clone(),
                model: model.clone(),
                images: world.clone(),
                parent: None,
                full: false,
                batch: 64,
            },
        )
        .await?;
    }
    let deployed = kalon_registry::store::deployments(&pool).await?;
    if deployed.is_empty() {
        kalon_registry::deploy::deploy(
            &pool,
            &endpoints.kafka,
            &args.model_version,
            // the canary controller's stable variant (`--stable-variant`)
            "main",
            1.0,
        )
        .await?;
        eprintln!("deployed {} as main", args.model_version);
    } else {
        eprintln!("deployments already present; left as they are");
    }
    // the trainer trains from the promoted version: the first model is it
    if kalon_registry::lifecycle::promoted(&pool).await?.is_none() {
        let state = kalon_registry::store::version(&pool, &args.model_version)
            .await?
            .map(|v| v.state);
        if state == Some(kalon_registry::lifecycle::State::Indexed) {
            kalon_registry::lifecycle::promote(
                &pool,
                &args.model_version,
                "kalonctl search-bootstrap",
                "the first model: the trainer trains from it",
                serde_json::json!({}),
            )
            .await?;
            eprintln!(
                "promoted {} (the trainer trains from it)",
                args.model_version
            );
        }
    }
    Ok(())
}
