//! Corpus embedding: the catalog's images under one model version, into
//! Postgres (`kalonctl index`).
//!
//! An aligned version that differs from its parent only by an alignment
//! adapter (an encoder directory with `adapter.safetensors`, made by
//! `kalonctl train align`; `kalon_encoder::adapter`) does not run the image tower again: its tower is
//! the parent's with `v' = normalise(v + v A^T)` appended, and that is
//! scale-invariant in `v`, so the parent's stored (unit) embeddings are the
//! backbone features and the adapter is one d x d product per image.
//!
//! A version the trainer stored as an artifact is indexed from its
//! materialized directory (`artifact::materialize`); the directory must
//! hash to the version's artifact, and indexing moves a `gated_passed`
//! version to `indexed`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use kalon_encoder::{EncoderOptions, ImageEncoder, Manifest};
use serde::Serialize;
use sqlx::PgPool;

use crate::lifecycle::{self, State};
use crate::{artifact, store};

/// What indexing did.
#[derive(Debug, Clone, Serialize)]
pub struct Indexed {
    pub model_version: String,
    pub images: usize,
    /// `tower` (every image through the image tower) or `adapter-reuse`.
    pub method: &'static str,
    pub parent: Option<String>,
    pub seconds: f64,
    pub images_per_s: f64,
}

/// The catalog's image files, `<id>.png` in `folder`, in id order.
pub fn catalog_files(folder: &Path) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(folder)
        .with_context(|| format!("cannot read the image folder {}", folder.display()))?
    {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("png") {
            continue;
        }
        if let Some(id) = path.file_stem().and_then(|s| s.to_str()) {
            files.push((id.to_owned(), path.clone()));
        }
    }
    files.sort();
    if files.is_empty() {
        bail!("no <image id>.png files in {}", folder.display());
    }
    Ok(files)
}

/// Where an aligned encoder's parent is: the directory its manifest notes.
fn noted_parent_dir(manifest: &Manifest) -> Option<String> {
    let dir = manifest.notes.get("parent")?.as_str()?;
    Some(
        std::fs::canonicalize(dir)
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| dir.to_owned()),
    )
}

/// Options of [`index_version`].
pub struct IndexJob<'a> {
    pub version: &'a str,
    pub encoder_dir: &'a Path,
    pub images: &'a Path,
    /// The parent version; found from the manifest's notes when `None`.
    pub parent: Option<&'a str>,
    /// Run the image tower even when the parent's embeddings could be reused.
    pub force_tower: bool,
    pub batch: usize,
    pub options: &'a EncoderOptions,
}

/// Embeds the catalog under `job.version`, stores it, and registers the
/// version (a new name from a directory), or indexes a registered artifact
/// version from its materialized directory. `progress(done, total)` is
/// called after each batch.
pub async fn index_version(
    pool: &PgPool,
    job: IndexJob<'_>,
    mut progress: impl FnMut(usize, usize),
) -> anyhow::Result<Indexed> {
    if !store::valid_name(job.version) {
        bail!(
            "model version {:?} must be 1-64 characters of A-Z a-z 0-9 . _ -",
            job.version
        );
    }
    let started = Instant::now();
    let dir = std::fs::canonicalize(job.encoder_dir)
        .with_context(|| format!("no encoder directory {}", job.encoder_dir.display()))?;
    let manifest = Manifest::load(&dir)?;
    let dim = manifest.embedding_dim;
    let files = catalog_files(job.images)?;

    let existing = store::version(pool, job.version).await?;
    if let Some(v) = &existing {
        if !matches!(
            v.state,
            State::GatedPassed | State::Indexed | State::Canary | State::Promoted
        ) {
            bail!(
                "model version {} is {}; only a gated_passed, indexed, canary or promoted version is indexed",
                v.version,
                v.state
            );
        }
    }
    let artifact_version = existing.as_ref().filter(|v| v.artifact_sha256.is_some());
    if let Some(v) = artifact_version {
        let expected = v.artifact_sha256.clone().unwrap_or_default();
        let hashed = dir.clone();
        let actual = tokio::task::spawn_blocking(move || artifact::dir_sha256(&hashed)).await??;
        if actual != expected {
            bail!(
                "{} has sha256 {actual}, but model version {} is the artifact {expected}: \
                 index it from `artifact::materialize`",
                dir.display(),
                v.version
            );
        }
        if v.embedding_dim as usize != dim {
            bail!(
                "the encoder in {} is {dim}-d, model version {} is registered {}-d",
                dir.display(),
                v.version,
                v.embedding_dim
            );
        }
    }

    // the parent whose embeddings an adapter-only version can reuse
    let adapter_path = dir.join(kalon_encoder::adapter::ADAPTER_FILE);
    let registered_parent = artifact_version.and_then(|v| v.parent.as_deref());
    let parent = match job.parent.or(registered_parent) {
        Some(name) => Some(
            store::version(pool, name)
                .await?
                .with_context(|| format!("parent version {name} is not registered"))?,
        ),
        None => match noted_parent_dir(&manifest) {
            Some(parent_dir) if adapter_path.exists() => {
                store::version_by_dir(pool, &parent_dir).await?
            }
            _ => None,
        },
    };
    let reuse = parent
        .as_ref()
        .filter(|p| {
            !job.force_tower
                && adapter_path.exists()
                && p.images_indexed as usize == files.len()
                && p.embedding_dim as usize == dim
        })
        .cloned();
    if artifact_version.is_none() {
        store::register_version(
            pool,
            job.version,
            &dir.display().to_string(),
            parent.as_ref().map(|p| p.version.as_str()),
            dim,
        )
        .await?;
    }

    let method = if let Some(parent) = &reuse {
        let (adim, a) = kalon_encoder::adapter::read(&adapter_path)?;
        if adim != dim {
            bail!(
                "the adapter in {} is {adim}-d, the encoder {dim}-d",
                adapter_path.display()
            );
        }
        let stored = store::load_embeddings(pool, &parent.version, dim).await?;
        let total = stored.ids.len();
        let chunk = 4096;
        for (start, (ids, rows)) in stored
            .ids
            .chunks(chunk)
            .zip(stored.data.chunks(chunk * dim))
            .enumerate()
        {
            let adapted = kalon_encoder::adapter::apply(rows, &a, dim);
            store::store_embeddings(pool, job.version, ids, &adapted, dim).await?;
            progress((start * chunk + ids.len()).min(total), total);
        }
        "adapter-reuse"
    } else {
        let tower = Arc::new(ImageEncoder::load(&dir, &manifest, job.options)?);
        let total = files.len();
        let mut done = 0;
        for batch in files.chunks(job.batch.max(1)) {
            let ids: Vec<String> = batch.iter().map(|(id, _)| id.clone()).collect();
            let paths: Vec<PathBuf> = batch.iter().map(|(_, p)| p.clone()).collect();
            let tower = tower.clone();
            let embedded = tokio::task::spawn_blocking(move || {
                let bytes = paths
                    .iter()
                    .map(|p| std::fs::read(p).with_context(|| format!("reading {}", p.display())))
                    .collect::<anyhow::Result<Vec<_>>>()?;
                Ok::<_, anyhow::Error>(tower.embed_files(&bytes)?)
            })
            .await??;
            store::store_embeddings(pool, job.version, &ids, &embedded.data, dim).await?;
            done += ids.len();
            progress(done, total);
        }
        "tower"
    };
    let seconds = started.elapsed().as_secs_f64();
    let outcome = Indexed {
        model_version: job.version.to_owned(),
        images: files.len(),
        method,
        parent: parent.map(|p| p.version),
        seconds,
        images_per_s: files.len() as f64 / seconds.max(1e-9),
    };
    let notes = serde_json::to_value(&outcome)?;
    store::finish_index(pool, job.version, &notes).await?;
    if existing.is_some_and(|v| v.state == State::GatedPassed) {
        lifecycle::transition(
            pool,
            job.version,
            State::Indexed,
            "indexer",
            "the catalog is embedded under this version",
            notes,
        )
        .await?;
    }
    Ok(outcome)
}
