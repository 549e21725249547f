//! Postgres side of search: model versions, their image embeddings, and the
//! deployments that route traffic (migrations/20261128000001_search.sql,
//! and 20261207000001_registry_and_trainer.sql for a version's lifecycle
//! state and artifact).

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use crate::artifact::EncoderSource;
use crate::lifecycle::{self, State};

/// A model version: where its encoder is, where it is in its life, how
/// much of the catalog it has embedded.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct ModelVersion {
    pub version: String,
    /// The encoder directory on the search host (a person's `kalonctl
    /// index`); `None` for an artifact version.
    pub encoder_dir: Option<String>,
    pub parent: Option<String>,
    pub embedding_dim: i32,
    pub images_indexed: i32,
    pub state: State,
    /// Where the encoder is in the artifact store (`.../encoders/<sha256>`)
    /// and the sha256 of its content (`artifact::dir_sha256`).
    pub artifact_uri: Option<String>,
    pub artifact_sha256: Option<String>,
    pub training_run_id: Option<Uuid>,
    /// The offline gate's figures and verdict (the trainer's versions).
    pub gate: Option<serde_json::Value>,
    pub indexed_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
}

impl ModelVersion {
    /// Where its encoder comes from: the artifact when it has one, else
    /// its directory.
    pub fn source(&self) -> Option<EncoderSource> {
        EncoderSource::of(
            self.encoder_dir.as_deref(),
            self.artifact_uri.as_deref(),
            self.artifact_sha256.as_deref(),
        )
    }
}

const VERSION_COLUMNS: &str = "version, encoder_dir, parent, embedding_dim, images_indexed, \
     state, artifact_uri, artifact_sha256, training_run_id, gate, indexed_at, created_at";

/// One row of the `deployments` table, with where its version's encoder is.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct Deployment {
    pub model_version: String,
    pub variant: String,
    pub weight: f64,
    pub encoder_dir: Option<String>,
    pub state: State,
    pub artifact_uri: Option<String>,
    pub artifact_sha256: Option<String>,
    pub embedding_dim: i32,
    /// The share of this variant's requests that get a team-draft
    /// interleaving with the promoted version's ranking (a canary's
    /// evidence; 0 for every other deployment).
    pub interleave: f64,
}

impl Deployment {
    /// Where its encoder comes from (see [`ModelVersion::source`]).
    pub fn source(&self) -> Option<EncoderSource> {
        EncoderSource::of(
            self.encoder_dir.as_deref(),
            self.artifact_uri.as_deref(),
            self.artifact_sha256.as_deref(),
        )
    }
}

/// A version name or variant name as the tables accept it.
pub fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error(transparent)]
    Db(#[from] sqlx::Error),
    #[error(transparent)]
    Lifecycle(#[from] lifecycle::LifecycleError),
    #[error("model version {0} is a stored artifact; it cannot be re-pointed at an encoder directory (choose another name)")]
    HasArtifact(String),
}

/// Registers a model version from an encoder directory (`kalonctl index`):
/// a new one enters as `indexed`, with its creating transition; an
/// existing directory version is re-pointed (its state kept). A version
/// stored as an artifact is never re-pointed.
pub async fn register_version(
    pool: &PgPool,
    version: &str,
    encoder_dir: &str,
    parent: Option<&str>,
    embedding_dim: usize,
) -> Result<(), RegisterError> {
    let mut tx = pool.begin().await?;
    let existing: Option<Option<String>> =
        sqlx::query_scalar("SELECT artifact_uri FROM model_versions WHERE version = $1 FOR UPDATE")
            .bind(version)
            .fetch_optional(&mut *tx)
            .await?;
    match existing {
        Some(Some(_)) => return Err(RegisterError::HasArtifact(version.to_owned())),
        Some(None) => {
            sqlx::query(
                "UPDATE model_versions SET encoder_dir = $2, parent = $3, embedding_dim = $4
                 WHERE version = $1",
            )
            .bind(version)
            .bind(encoder_dir)
            .bind(parent)
            .bind(embedding_dim as i32)
            .execute(&mut *tx)
            .await?;
        }
        None => {
            // a concurrent registration of the same name waits here, then
            // fails on the primary key: nothing is registered twice
            sqlx::query(
                "INSERT INTO model_versions (version, encoder_dir, parent, embedding_dim, state)
                 VALUES ($1, $2, $3, $4, 'indexed')",
            )
            .bind(version)
            .bind(encoder_dir)
            .bind(parent)
            .bind(embedding_dim as i32)
            .execute(&mut *tx)
            .await?;
            lifecycle::record_registered(&mut tx, version).await?;
        }
    }
    tx.commit().await?;
    Ok(())
}

pub async fn version(pool: &PgPool, version: &str) -> sqlx::Result<Option<ModelVersion>> {
    sqlx::query_as(&format!(
        "SELECT {VERSION_COLUMNS} FROM model_versions WHERE version = $1"
    ))
    .bind(version)
    .fetch_optional(pool)
    .await
}

/// Every version, oldest first.
pub async fn versions(pool: &PgPool) -> sqlx::Result<Vec<ModelVersion>> {
    versions_where(pool, "true").await
}

/// The versions a fixed SQL condition selects, oldest first.
pub(crate) async fn versions_where(
    pool: &PgPool,
    condition: &'static str,
) -> sqlx::Result<Vec<ModelVersion>> {
    sqlx::query_as(&format!(
        "SELECT {VERSION_COLUMNS} FROM model_versions WHERE {condition}
         ORDER BY created_at, version"
    ))
    .fetch_all(pool)
    .await
}

/// The version registered for an encoder directory, if any (an aligned
/// encoder records its parent's directory; this finds the parent version).
pub async fn version_by_dir(pool: &PgPool, dir: &str) -> sqlx::Result<Option<ModelVersion>> {
    sqlx::query_as(&format!(
        "SELECT {VERSION_COLUMNS} FROM model_versions
         WHERE encoder_dir = $1 AND images_indexed > 0
         ORDER BY created_at DESC LIMIT 1"
    ))
    .bind(dir)
    .fetch_optional(pool)
    .await
}

fn to_bytes(row: &[f32]) -> Vec<u8> {
    row.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Stores embeddings of `ids` (row-major, `dim` floats each), replacing
/// any the version had for those images.
pub async fn store_embeddings(
    pool: &PgPool,
    version: &str,
    ids: &[String],
    data: &[f32],
    dim: usize,
) -> sqlx::Result<()> {
    assert_eq!(ids.len() * dim, data.len(), "one row per id");
    let blobs: Vec<Vec<u8>> = data.chunks_exact(dim).map(to_bytes).collect();
    sqlx::query(
        "INSERT INTO image_embeddings (model_version, image_id, embedding)
         SELECT $1, * FROM UNNEST($2::text[], $3::bytea[])
         ON CONFLICT (model_version, image_id) DO UPDATE SET embedding = EXCLUDED.embedding",
    )
    .bind(version)
    .bind(ids)
    .bind(&blobs)
    .execute(pool)
    .await?;
    Ok(())
}

/// Records that indexing a version finished.
pub async fn finish_index(
    pool: &PgPool,
    version: &str,
    notes: &serde_json::Value,
) -> sqlx::Result<i64> {
    let (count,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM image_embeddings WHERE model_version = $1")
            .bind(version)
            .fetch_one(pool)
            .await?;
    sqlx::query(
        "UPDATE model_versions SET images_indexed = $2, indexed_at = now(), index_notes = $3
         WHERE version = $1",
    )
    .bind(version)
    .bind(count as i32)
    .bind(notes)
    .execute(pool)
    .await?;
    Ok(count)
}

/// A version's embeddings: image ids in id order and their rows.
#[derive(Debug, Clone, Default)]
pub struct StoredEmbeddings {
    pub ids: Vec<String>,
    pub data: Vec<f32>,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Db(#[from] sqlx::Error),
    #[error("embedding of {image} in version {version} is {bytes} bytes, not {dim} f32")]
    Corrupt {
        version: String,
        image: String,
        bytes: usize,
        dim: usize,
    },
}

pub async fn load_embeddings(
    pool: &PgPool,
    version: &str,
    dim: usize,
) -> Result<StoredEmbeddings, LoadError> {
    use futures::TryStreamExt;
    let mut rows = sqlx::query_as::<_, (String, Vec<u8>)>(
        "SELECT image_id, embedding FROM image_embeddings
         WHERE model_version = $1 ORDER BY image_id",
    )
    .bind(version)
    .fetch(pool);
    let mut out = StoredEmbeddings::default();
    while let Some((image, bytes)) = rows.try_next().await? {
        if bytes.len() != dim * 4 {
            return Err(LoadError::Corrupt {
                version: version.to_owned(),
                image,
                bytes: bytes.len(),
                dim,
            });
        }
        out.data.extend(
            bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        );
        out.ids.push(image);
    }
    Ok(out)
}

/// Every deployment, with where its encoder is, in variant order.
pub async fn deployments(pool: &PgPool) -> sqlx::Result<Vec<Deployment>> {
    sqlx::query_as(
        "SELECT d.model_version, d.variant, d.weight, v.encoder_dir, v.state,
                v.artifact_uri, v.artifact_sha256, v.embedding_dim, d.interleave
         FROM deployments d JOIN model_versions v ON v.version = d.model_version
         ORDER BY d.variant",
    )
    .fetch_all(pool)
    .await
}

#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error(transparent)]
    Db(#[from] sqlx::Error),
    #[error("model version {0} is not registered: run `kalonctl index --model-version {0}` first")]
    Unknown(String),
    #[error("model version {0} has no embeddings yet: run `kalonctl index --model-version {0}`")]
    NotIndexed(String),
    #[error("weight {0} is not a finite number in [0, 1000000]")]
    Weight(f64),
    #[error("variant name {0:?} must be 1-64 characters of A-Z a-z 0-9 . _ -")]
    Variant(String),
    #[error(
        "model version {version} is {state}: a version in that state is never offered to traffic"
    )]
    Refused { version: String, state: State },
}

/// Sets a version's variant and traffic weight (a new row or a change).
/// Refuses a version that is not indexed, and one whose state may not
/// serve (trained, gated_failed, rolled_back, retired).
pub async fn set_deployment(
    pool: &PgPool,
    version: &str,
    variant: &str,
    weight: f64,
) -> Result<(), DeployError> {
    if !weight.is_finite() || !(0.0..=1_000_000.0).contains(&weight) {
        return Err(DeployError::Weight(weight));
    }
    if !valid_name(variant) {
        return Err(DeployError::Variant(variant.to_owned()));
    }
    let mut tx = pool.begin().await?;
    // locked, so no transition slips in between this check and the write
    let found: Option<(State, i32)> = sqlx::query_as(
        "SELECT state, images_indexed FROM model_versions WHERE version = $1 FOR SHARE",
    )
    .bind(version)
    .fetch_optional(&mut *tx)
    .await?;
    match found {
        None => return Err(DeployError::Unknown(version.to_owned())),
        Some((state, _)) if !state.may_serve() => {
            return Err(DeployError::Refused {
                version: version.to_owned(),
                state,
            })
        }
        Some((_, 0)) => return Err(DeployError::NotIndexed(version.to_owned())),
        Some(_) => {}
    }
    // a variant name moves to the new version (e.g. "canary" re-pointed)
    sqlx::query("DELETE FROM deployments WHERE variant = $1 AND model_version <> $2")
        .bind(variant)
        .bind(version)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "INSERT INTO deployments (model_version, variant, weight) VALUES ($1, $2, $3)
         ON CONFLICT (model_version) DO UPDATE
           SET variant = EXCLUDED.variant, weight = EXCLUDED.weight, updated_at = now()",
    )
    .bind(version)
    .bind(variant)
    .bind(weight)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Sets the share of a deployed version's requests that search interleaves
/// with the promoted version's ranking. Returns whether the version is
/// deployed (nothing changes when it is not).
pub async fn set_interleave(pool: &PgPool, version: &str, share: f64) -> Result<bool, DeployError> {
    if !share.is_finite() || !(0.0..=1.0).contains(&share) {
        return Err(DeployError::Weight(share));
    }
    let done = sqlx::query(
        "UPDATE deployments SET interleave = $2, updated_at = now()
         WHERE model_version = $1 AND interleave IS DISTINCT FROM $2",
    )
    .bind(version)
    .bind(share)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() > 0)
}

/// Takes a version out of the deployments (its traffic goes to the others).
pub async fn remove_deployment(pool: &PgPool, version: &str) -> sqlx::Result<bool> {
    let done = sqlx::query("DELETE FROM deployments WHERE model_version = $1")
        .bind(version)
        .execute(pool)
        .await?;
    Ok(done.rows_affected() > 0)
}
