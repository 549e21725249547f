//! `kalonctl index`, `kalonctl deploy` and `kalonctl serve`: putting model
//! versions into search.

use std::path::PathBuf;

use clap::Args;
use kalon_encoder::EncoderOptions;
use kalon_search::indexer::{self, IndexJob};

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
        if !kalon_search::store::remove_deployment(&pool, &args.model_version).await? {
            anyhow::bail!("{} is not deployed", args.model_version);
        }
        kalon_search::deploy::announce(
            &endpoints.kafka,
            &kalon_search::DeploymentChanged {
                event_id: uuid::Uuid::now_v7(),
                occurred_at: chrono::Utc::now(),
                model_version: args.model_version.clone(),
                variant: None,
                weight: 0.0,
            },
        )
        .await?;
    } else {
        kalon_search::deploy(
            &pool,
            &endpoints.kafka,
            &args.model_version,
            &args.variant,
            args.weight,
        )
        .await?;
    }
    for d in kalon_search::store::deployments(&pool).await? {
        eprintln!(
            "{:<12} {:<24} weight {}",
            d.variant, d.model_version, d.weight
        );
    }
    Ok(())
}
