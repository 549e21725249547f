//! Corpus embedding: the catalog's images under one model version, into
//! Postgres (`kalonctl index`).
//!
//! An aligned version that differs from its parent only by an alignment
//! adapter (an encoder directory with `adapter.safetensors`, made by
//! `kalonctl train align`) does not run the image tower again: its tower is
//! the parent's with `v' = normalise(v + v A^T)` appended, and that is
//! scale-invariant in `v`, so the parent's stored (unit) embeddings are the
//! backbone features and the adapter is one d x d product per image.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use kalon_encoder::{EncoderOptions, ImageEncoder, Manifest};
use serde::Serialize;
use sqlx::PgPool;

use crate::store;

/// File name of the adapter weights next to an aligned encoder's manifest.
pub const ADAPTER_FILE: &str = "adapter.safetensors";

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

/// The adapter matrix `A` (`d x d`, row-major) of an aligned encoder.
pub fn read_adapter(path: &Path) -> anyhow::Result<(usize, Vec<f32>)> {
    let bytes =
        std::fs::read(path).with_context(|| format!("cannot read adapter {}", path.display()))?;
    let bad = |why: &str| anyhow::anyhow!("{} is not an adapter file: {why}", path.display());
    let header_len = bytes
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize)
        .ok_or_else(|| bad("shorter than a safetensors header"))?;
    let header: serde_json::Value = bytes
        .get(8..8 + header_len)
        .and_then(|h| serde_json::from_slice(h).ok())
        .ok_or_else(|| bad("unreadable safetensors header"))?;
    let tensor = &header["adapter.weight"];
    if tensor["dtype"] != "F32" {
        return Err(bad("adapter.weight is missing or not F32"));
    }
    let shape: Vec<usize> = serde_json::from_value(tensor["shape"].clone())
        .map_err(|_| bad("adapter.weight has no shape"))?;
    let offsets: [usize; 2] = serde_json::from_value(tensor["data_offsets"].clone())
        .map_err(|_| bad("adapter.weight has no data offsets"))?;
    let [d, d2] = shape[..] else {
        return Err(bad("adapter.weight is not a matrix"));
    };
    let data = bytes
        .get(8 + header_len + offsets[0]..8 + header_len + offsets[1])
        .filter(|data| d == d2 && data.len() == d * d * 4)
        .ok_or_else(|| bad("adapter.weight is not square or its data is cut short"))?;
    let values = data
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Ok((d, values))
}

/// `normalise(v + v A^T)` for each unit row of `rows`.
pub fn apply_adapter(rows: &[f32], a: &[f32], dim: usize) -> Vec<f32> {
    let mut out = vec![0f32; rows.len()];
    for (v, y) in rows.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
        for (i, yi) in y.iter_mut().enumerate() {
            let a_row = &a[i * dim..(i + 1) * dim];
            *yi = v[i] + a_row.iter().zip(v).map(|(x, w)| x * w).sum::<f32>();
        }
        let norm = y.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
        y.iter_mut().for_each(|x| *x /= norm);
    }
    out
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
/// version. `progress(done, total)` is called after each batch.
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

    // the parent whose embeddings an adapter-only version can reuse
    let adapter_path = dir.join(ADAPTER_FILE);
    let parent = match job.parent {
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
    store::register_version(
        pool,
        job.version,
        &dir.display().to_string(),
        parent.as_ref().map(|p| p.version.as_str()),
        dim,
    )
    .await?;

    let method = if let Some(parent) = &reuse {
        let (adim, a) = read_adapter(&adapter_path)?;
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
            let adapted = apply_adapter(rows, &a, dim);
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
    store::finish_index(pool, job.version, &serde_json::to_value(&outcome)?).await?;
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_adapter_is_v_plus_v_a_transposed_normalised() {
        // A = [[0, 1], [0, 0]]: v A^T = (v1, 0); v = (0.6, 0.8) -> (1.4, 0.8)
        let a = [0.0, 1.0, 0.0, 0.0];
        let out = apply_adapter(&[0.6, 0.8], &a, 2);
        let norm = (1.4f32 * 1.4 + 0.8 * 0.8).sqrt();
        assert!((out[0] - 1.4 / norm).abs() < 1e-6);
        assert!((out[1] - 0.8 / norm).abs() < 1e-6);
        // A = 0 is the identity
        assert_eq!(apply_adapter(&[0.6, 0.8], &[0.0; 4], 2), vec![0.6, 0.8]);
    }
}
