//! Encoder artifacts: an encoder directory stored in an object store
//! (a local directory, S3, GCS or Azure), addressed by the sha256 of its
//! content, so a search replica on any host fetches exactly the encoder
//! that was gated, and refuses anything else.
//!
//! Layout in the store, under the store URL's prefix:
//!
//! ```text
//! encoders/<sha256>/<file>               every file of the directory
//! encoders/<sha256>/kalon-artifact.json  the index: files, sizes, hashes (written last)
//! ```
//!
//! The content hash ([`dir_sha256`]) is the sha256 of a canonical listing:
//! the relative paths in byte order, each as `path \0 size \0 sha256-of-file
//! \n`. Every regular file counts, in subdirectories too, except the
//! top-level `checkpoints/` directory (training checkpoints are not part
//! of the encoder); a symlink or any other kind of file is refused.
//!
//! A fetched artifact is cached at `<cache>/<sha256>/`: downloaded into a
//! temporary directory beside it, verified file by file and as a whole,
//! its manifest's dimension checked, then renamed into place, so a
//! partially written copy is never served. The cached copy is hashed again
//! on every load.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::StreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, ObjectStoreScheme};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::store::ModelVersion;

/// The index object's name inside an artifact.
pub const INDEX_FILE: &str = "kalon-artifact.json";
/// The index format this code writes and reads.
pub const FORMAT: &str = "kalon-artifact/1";
/// The top-level directory an encoder directory may have that is not
/// part of the encoder (training checkpoints).
pub const SKIPPED_DIR: &str = "checkpoints";
/// Where artifacts live under a store's prefix.
const ENCODERS: &str = "encoders";

#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("artifact store URL {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("object store {url}: {source}")]
    Store {
        url: String,
        source: object_store::Error,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{dir} is not a loadable encoder directory: {detail}")]
    NotAnEncoder { dir: PathBuf, detail: String },
    #[error("{path}: {what} cannot be stored in an artifact (regular files only)")]
    Unsupported { path: PathBuf, what: String },
    #[error("{}{what} has sha256 {actual}, expected {expected}: refused", version_prefix(.version))]
    HashMismatch {
        version: Option<String>,
        /// What was hashed (a file, the directory, the cached copy).
        what: String,
        expected: String,
        actual: String,
    },
    #[error("artifact {uri} is incomplete: {detail}")]
    Incomplete { uri: String, detail: String },
    #[error("artifact {uri}: {detail}")]
    BadIndex { uri: String, detail: String },
    #[error("{}the encoder at {dir} is {actual}-d, the version is registered as {expected}-d", version_prefix(.version))]
    Dimension {
        version: Option<String>,
        dir: PathBuf,
        expected: usize,
        actual: usize,
    },
    #[error("model version {version}: {detail}")]
    NoEncoder { version: String, detail: String },
    #[error("hashing task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

fn version_prefix(version: &Option<String>) -> String {
    version
        .as_ref()
        .map(|v| format!("model version {v}: "))
        .unwrap_or_default()
}

impl ArtifactError {
    /// Names the version a hash or dimension error is about.
    pub fn for_version(mut self, name: &str) -> Self {
        match &mut self {
            ArtifactError::HashMismatch { version, .. }
            | ArtifactError::Dimension { version, .. } => *version = Some(name.to_owned()),
            _ => {}
        }
        self
    }
}

pub type Result<T, E = ArtifactError> = std::result::Result<T, E>;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ArtifactError + '_ {
    move |source| ArtifactError::Io {
        path: path.to_owned(),
        source,
    }
}

/// One file of an artifact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// Relative to the encoder directory, `/`-separated.
    pub path: String,
    pub size: u64,
    pub sha256: String,
}

/// `kalon-artifact.json`: what an artifact holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArtifactIndex {
    pub format: String,
    /// [`listing_sha256`] of `files`.
    pub sha256: String,
    /// The encoder manifest's name and dimension.
    pub name: String,
    pub embedding_dim: usize,
    /// In path order.
    pub files: Vec<FileEntry>,
}

/// An encoder directory in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredArtifact {
    /// `<store url>/encoders/<sha256>`.
    pub uri: String,
    /// [`dir_sha256`] of the directory.
    pub sha256: String,
    pub files: usize,
    pub bytes: u64,
    /// The encoder manifest's `embedding_dim`.
    pub embedding_dim: usize,
}

/// Where a version's encoder comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EncoderSource {
    /// A directory on this host (a person's `kalonctl index`).
    Dir(PathBuf),
    /// An artifact in a store, fetched and verified.
    Artifact { uri: String, sha256: String },
}

impl EncoderSource {
    /// The artifact when there is one (it can be verified), else the
    /// directory; `None` when the row has neither.
    pub fn of(dir: Option<&str>, uri: Option<&str>, sha256: Option<&str>) -> Option<Self> {
        match (uri, sha256, dir) {
            (Some(uri), Some(sha256), _) => Some(EncoderSource::Artifact {
                uri: uri.to_owned(),
                sha256: sha256.to_owned(),
            }),
            (_, _, Some(dir)) => Some(EncoderSource::Dir(PathBuf::from(dir))),
            _ => None,
        }
    }
}

impl fmt::Display for EncoderSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EncoderSource::Dir(dir) => write!(f, "dir:{}", dir.display()),
            EncoderSource::Artifact { sha256, .. } => write!(f, "sha256:{sha256}"),
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn is_sha256(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The sha256 of a file, streamed.
pub fn file_sha256(path: &Path) -> Result<(u64, String)> {
    let mut file = std::fs::File::open(path).map_err(io(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((size, hex(&hasher.finalize())))
}

/// The sha256 of a canonical listing (entries in path order).
pub fn listing_sha256(entries: &[FileEntry]) -> String {
    let mut sorted: Vec<&FileEntry> = entries.iter().collect();
    sorted.sort_by(|a, b| a.path.as_bytes().cmp(b.path.as_bytes()));
    let mut hasher = Sha256::new();
    for e in sorted {
        hasher.update(e.path.as_bytes());
        hasher.update(b"\0");
        hasher.update(e.size.to_string().as_bytes());
        hasher.update(b"\0");
        hasher.update(e.sha256.as_bytes());
        hasher.update(b"\n");
    }
    hex(&hasher.finalize())
}

/// A relative path component as artifacts accept it.
fn valid_component(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\\', '\0', '\n'])
}

/// Every file of an encoder directory (see the module docs for what
/// counts), hashed, in path order.
pub fn list_dir(dir: &Path) -> Result<Vec<FileEntry>> {
    fn walk(root: &Path, rel: &str, out: &mut Vec<FileEntry>) -> Result<()> {
        let here = if rel.is_empty() {
            root.to_owned()
        } else {
            root.join(rel)
        };
        for entry in std::fs::read_dir(&here).map_err(io(&here))? {
            let entry = entry.map_err(io(&here))?;
            let path = entry.path();
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                return Err(ArtifactError::Unsupported {
                    path,
                    what: "a file name that is not UTF-8".into(),
                });
            };
            if !valid_component(&name) {
                return Err(ArtifactError::Unsupported {
                    path,
                    what: format!("the file name {name:?}"),
                });
            }
            let relpath = if rel.is_empty() {
                name.clone()
            } else {
                format!("{rel}/{name}")
            };
            // symlink_metadata: a link is refused, not followed
            let kind = entry.file_type().map_err(io(&path))?;
            if kind.is_dir() {
                if rel.is_empty() && name == SKIPPED_DIR {
                    continue;
                }
                walk(root, &relpath, out)?;
            } else if kind.is_file() {
                let (size, sha256) = file_sha256(&path)?;
                out.push(FileEntry {
                    path: relpath,
                    size,
                    sha256,
                });
            } else {
                let what = if kind.is_symlink() {
                    "a symbolic link"
                } else {
                    "a special file"
                };
                return Err(ArtifactError::Unsupported {
                    path,
                    what: what.into(),
                });
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, "", &mut out)?;
    out.sort_by(|a, b| a.path.as_bytes().cmp(b.path.as_bytes()));
    Ok(out)
}

/// An encoder directory's content hash: [`listing_sha256`] of [`list_dir`].
pub fn dir_sha256(dir: &Path) -> Result<String> {
    Ok(listing_sha256(&list_dir(dir)?))
}

/// Checks that `dir` is an encoder directory Kalon can load: its manifest
/// reads, and the files it names are among `files`. Returns the manifest.
fn check_encoder(dir: &Path, files: &[FileEntry]) -> Result<kalon_encoder::Manifest> {
    let manifest = kalon_encoder::Manifest::load(dir).map_err(|e| ArtifactError::NotAnEncoder {
        dir: dir.to_owned(),
        detail: e.to_string(),
    })?;
    for named in [
        &manifest.image.file,
        &manifest.text.file,
        &manifest.text.vocab,
    ] {
        if !files.iter().any(|f| &f.path == named) {
            return Err(ArtifactError::NotAnEncoder {
                dir: dir.to_owned(),
                detail: format!("its manifest names {named}, which is not a file there"),
            });
        }
    }
    Ok(manifest)
}

/// The default store: `file://<absolute state_dir>/artifacts`.
pub fn default_url(state_dir: &Path) -> String {
    let dir = std::path::absolute(state_dir).unwrap_or_else(|_| state_dir.to_owned());
    format!("file://{}", dir.join("artifacts").display())
}

/// Where fetched artifacts are cached: `$KALON_CACHE_DIR/models`, else
/// `~/.cache/kalon/models` (kalon-stack's cache directory).
pub fn default_cache_dir() -> PathBuf {
    let root = match std::env::var_os("KALON_CACHE_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/tmp"))
            .join(".cache")
            .join("kalon"),
    };
    root.join("models")
}

/// An object store holding encoder artifacts.
#[derive(Debug, Clone)]
pub struct ArtifactStore {
    store: Arc<dyn ObjectStore>,
    /// The store's URL without a trailing `/`.
    url: String,
    prefix: ObjectPath,
}

impl ArtifactStore {
    /// A store from its URL: `file:///abs/dir` (created if missing),
    /// `s3://bucket/prefix`, `gs://bucket/prefix`, `az://container/prefix`
    /// (or `azure://`). Cloud credentials and settings come from the
    /// environment (`AWS_*`, `GOOGLE_*`, `AZURE_*`, as object_store's
    /// builders read them).
    pub fn from_url(url: &str) -> Result<ArtifactStore> {
        Self::open(url, true)
    }

    fn open(url: &str, create: bool) -> Result<ArtifactStore> {
        let bad = |reason: String| ArtifactError::Url {
            url: url.to_owned(),
            reason,
        };
        let trimmed = url.trim_end_matches('/');
        let parsed = url::Url::parse(trimmed).map_err(|e| bad(e.to_string()))?;
        let store_error = |source| ArtifactError::Store {
            url: trimmed.to_owned(),
            source,
        };
        if parsed.scheme() == "file" {
            if parsed.host_str().is_some_and(|h| !h.is_empty()) {
                return Err(bad(
                    "a file URL needs an absolute path: file:///absolute/dir".into(),
                ));
            }
            let dir = parsed.to_file_path().map_err(|()| {
                bad("a file URL needs an absolute path: file:///absolute/dir".into())
            })?;
            if create {
                std::fs::create_dir_all(&dir).map_err(io(&dir))?;
            } else if !dir.is_dir() {
                return Err(bad(format!(
                    "the directory {} does not exist on this host",
                    dir.display()
                )));
            }
            let store =
                object_store::local::LocalFileSystem::new_with_prefix(&dir).map_err(store_error)?;
            return Ok(ArtifactStore {
                store: Arc::new(store),
                url: format!("file://{}", dir.display()),
                prefix: ObjectPath::default(),
            });
        }
        let (scheme, prefix) = ObjectStoreScheme::parse(&parsed).map_err(|e| bad(e.to_string()))?;
        // the cloud builders make their HTTPS client now: rustls needs its
        // provider (every Kalon process installs ring; Err: one already is)
        let _ = rustls::crypto::ring::default_provider().install_default();
        let store: Arc<dyn ObjectStore> = match scheme {
            ObjectStoreScheme::AmazonS3 if parsed.scheme().starts_with("s3") => Arc::new(
                object_store::aws::AmazonS3Builder::from_env()
                    .with_url(trimmed)
                    .build()
                    .map_err(store_error)?,
            ),
            ObjectStoreScheme::GoogleCloudStorage => Arc::new(
                object_store::gcp::GoogleCloudStorageBuilder::from_env()
                    .with_url(trimmed)
                    .build()
                    .map_err(store_error)?,
            ),
            ObjectStoreScheme::MicrosoftAzure
                if matches!(parsed.scheme(), "az" | "azure" | "abfs" | "abfss") =>
            {
                Arc::new(
                    object_store::azure::MicrosoftAzureBuilder::from_env()
                        .with_url(trimmed)
                        .build()
                        .map_err(store_error)?,
                )
            }
            _ => {
                return Err(bad(
                    "unsupported scheme; use file:///abs/dir, s3://bucket/prefix, \
                     gs://bucket/prefix or az://container/prefix"
                        .into(),
                ))
            }
        };
        Ok(ArtifactStore {
            store,
            url: trimmed.to_owned(),
            prefix,
        })
    }

    /// The store's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The URI of the artifact with content hash `sha256`.
    pub fn uri_of(&self, sha256: &str) -> String {
        format!("{}/{ENCODERS}/{sha256}", self.url)
    }

    fn object(&self, sha256: &str, relpath: &str) -> ObjectPath {
        let mut path = self.prefix.clone().join(ENCODERS).join(sha256);
        for part in relpath.split('/') {
            path = path.join(part);
        }
        path
    }

    fn store_error(&self) -> impl FnOnce(object_store::Error) -> ArtifactError + '_ {
        move |source| ArtifactError::Store {
            url: self.url.clone(),
            source,
        }
    }

    /// Stores an encoder directory (see the module docs for what is
    /// stored) after checking that it is one: its manifest reads and names
    /// files that are there. Storing the same content again changes
    /// nothing and gives the same URI.
    pub async fn put_dir(&self, dir: &Path) -> Result<StoredArtifact> {
        let owned = dir.to_owned();
        let (files, manifest) = tokio::task::spawn_blocking(move || {
            if !owned.is_dir() {
                return Err(ArtifactError::NotAnEncoder {
                    dir: owned.clone(),
                    detail: "not a directory".into(),
                });
            }
            let files = list_dir(&owned)?;
            let manifest = check_encoder(&owned, &files)?;
            Ok((files, manifest))
        })
        .await??;
        let sha256 = listing_sha256(&files);
        let stored = StoredArtifact {
            uri: self.uri_of(&sha256),
            sha256: sha256.clone(),
            files: files.len(),
            bytes: files.iter().map(|f| f.size).sum(),
            embedding_dim: manifest.embedding_dim,
        };
        let index_path = self.object(&sha256, INDEX_FILE);
        match self.store.head(&index_path).await {
            // the index is written last: its presence means all is there
            Ok(_) => return Ok(stored),
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(self.store_error()(e)),
        }
        for file in &files {
            let source = dir.join(&file.path);
            let mut reader = tokio::fs::File::open(&source).await.map_err(io(&source))?;
            let mut writer = object_store::buffered::BufWriter::new(
                self.store.clone(),
                self.object(&sha256, &file.path),
            );
            let copied = tokio::io::copy(&mut reader, &mut writer).await;
            let closed = match copied {
                Ok(_) => writer.shutdown().await,
                Err(e) => {
                    let _ = writer.abort().await;
                    Err(e)
                }
            };
            closed.map_err(io(&source))?;
        }
        let index = ArtifactIndex {
            format: FORMAT.into(),
            sha256: sha256.clone(),
            name: manifest.name.clone(),
            embedding_dim: manifest.embedding_dim,
            files,
        };
        let body = serde_json::to_vec_pretty(&index).expect("an index serializes");
        self.store
            .put(&index_path, body.into())
            .await
            .map_err(self.store_error())?;
        tracing::info!(uri = %stored.uri, files = stored.files, bytes = stored.bytes, "artifact stored");
        Ok(stored)
    }

    /// The artifact `uri` (which must be this store's `encoders/<sha256>`)
    /// as a local directory under `cache`, verified: every file's hash,
    /// the directory's hash against `sha256`, and the manifest's dimension
    /// against `expected_dim`. A cached copy is verified again on every
    /// call; one that no longer matches is removed and refused (the next
    /// call downloads it again).
    pub async fn fetch(
        &self,
        uri: &str,
        sha256: &str,
        expected_dim: usize,
        cache: &Path,
    ) -> Result<PathBuf> {
        if !is_sha256(sha256) {
            return Err(ArtifactError::BadIndex {
                uri: uri.to_owned(),
                detail: format!("{sha256:?} is not a sha256"),
            });
        }
        if uri.trim_end_matches('/') != self.uri_of(sha256) {
            return Err(ArtifactError::BadIndex {
                uri: uri.to_owned(),
                detail: format!(
                    "expected the URI {} for sha256 {sha256}",
                    self.uri_of(sha256)
                ),
            });
        }
        std::fs::create_dir_all(cache).map_err(io(cache))?;
        let target = cache.join(sha256);
        if target.is_dir() {
            let (dir, expected) = (target.clone(), sha256.to_owned());
            return tokio::task::spawn_blocking(move || {
                let checked = verify_dir(&dir, &expected, expected_dim, "the cached copy");
                if let Err(ArtifactError::HashMismatch { .. }) = &checked {
                    tracing::error!(dir = %dir.display(), "cached artifact does not match its hash; removed");
                    let _ = std::fs::remove_dir_all(&dir);
                }
                checked.map(|()| dir)
            })
            .await?;
        }
        let index = self.read_index(uri, sha256).await?;
        let partial = tempfile::Builder::new()
            .prefix(".partial-")
            .tempdir_in(cache)
            .map_err(io(cache))?;
        for entry in &index.files {
            self.download(uri, sha256, entry, partial.path()).await?;
        }
        // the files were verified one by one against the index, and the
        // index against `sha256`; the directory holds only those files
        let dir = partial.path().to_owned();
        let manifest =
            kalon_encoder::Manifest::load(&dir).map_err(|e| ArtifactError::NotAnEncoder {
                dir: dir.clone(),
                detail: e.to_string(),
            })?;
        if manifest.embedding_dim != expected_dim {
            return Err(ArtifactError::Dimension {
                version: None,
                dir: PathBuf::from(uri),
                expected: expected_dim,
                actual: manifest.embedding_dim,
            });
        }
        let kept = partial.keep();
        match std::fs::rename(&kept, &target) {
            Ok(()) => {}
            // another fetch of the same artifact finished first
            Err(_) if target.is_dir() => {
                let _ = std::fs::remove_dir_all(&kept);
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&kept);
                return Err(io(&target)(e));
            }
        }
        tracing::info!(uri, dir = %target.display(), "artifact fetched and verified");
        Ok(target)
    }

    async fn read_index(&self, uri: &str, sha256: &str) -> Result<ArtifactIndex> {
        let bytes = match self.store.get(&self.object(sha256, INDEX_FILE)).await {
            Ok(got) => got.bytes().await.map_err(self.store_error())?,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(ArtifactError::Incomplete {
                    uri: uri.to_owned(),
                    detail: format!("no {INDEX_FILE} in the store"),
                })
            }
            Err(e) => return Err(self.store_error()(e)),
        };
        let bad = |detail: String| ArtifactError::BadIndex {
            uri: uri.to_owned(),
            detail,
        };
        let index: ArtifactIndex = serde_json::from_slice(&bytes)
            .map_err(|e| bad(format!("{INDEX_FILE} does not read: {e}")))?;
        if index.format != FORMAT {
            return Err(bad(format!(
                "{INDEX_FILE} format is {:?}, this Kalon reads {FORMAT:?}",
                index.format
            )));
        }
        for entry in &index.files {
            if !entry.path.split('/').all(valid_component) {
                return Err(bad(format!("file path {:?} is not allowed", entry.path)));
            }
        }
        let listed = listing_sha256(&index.files);
        if listed != sha256 {
            return Err(ArtifactError::HashMismatch {
                version: None,
                what: format!("the file list in {uri}/{INDEX_FILE}"),
                expected: sha256.to_owned(),
                actual: listed,
            });
        }
        Ok(index)
    }

    /// One file into `into`, hashed as it streams, checked against `entry`.
    async fn download(
        &self,
        uri: &str,
        sha256: &str,
        entry: &FileEntry,
        into: &Path,
    ) -> Result<()> {
        let location = self.object(sha256, &entry.path);
        let got = match self.store.get(&location).await {
            Ok(got) => got,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(ArtifactError::Incomplete {
                    uri: uri.to_owned(),
                    detail: format!("{} is missing from the store", entry.path),
                })
            }
            Err(e) => return Err(self.store_error()(e)),
        };
        let path = into.join(&entry.path);
        if let Some(parent) = path.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(io(parent))?;
        }
        let mut file = tokio::fs::File::create(&path).await.map_err(io(&path))?;
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let mut stream = got.into_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(self.store_error())?;
            hasher.update(&chunk);
            size += chunk.len() as u64;
            file.write_all(&chunk).await.map_err(io(&path))?;
        }
        file.flush().await.map_err(io(&path))?;
        if size != entry.size {
            return Err(ArtifactError::Incomplete {
                uri: uri.to_owned(),
                detail: format!(
                    "{} is {size} bytes in the store, the index says {}",
                    entry.path, entry.size
                ),
            });
        }
        let actual = hex(&hasher.finalize());
        if actual != entry.sha256 {
            return Err(ArtifactError::HashMismatch {
                version: None,
                what: format!("{uri}/{}", entry.path),
                expected: entry.sha256.clone(),
                actual,
            });
        }
        Ok(())
    }
}

/// Hashes a local copy and checks it against `sha256`, and its manifest's
/// dimension against `expected_dim`.
fn verify_dir(dir: &Path, sha256: &str, expected_dim: usize, what: &str) -> Result<()> {
    let actual = dir_sha256(dir)?;
    if actual != sha256 {
        return Err(ArtifactError::HashMismatch {
            version: None,
            what: format!("{what} at {}", dir.display()),
            expected: sha256.to_owned(),
            actual,
        });
    }
    let manifest = kalon_encoder::Manifest::load(dir).map_err(|e| ArtifactError::NotAnEncoder {
        dir: dir.to_owned(),
        detail: e.to_string(),
    })?;
    if manifest.embedding_dim != expected_dim {
        return Err(ArtifactError::Dimension {
            version: None,
            dir: dir.to_owned(),
            expected: expected_dim,
            actual: manifest.embedding_dim,
        });
    }
    Ok(())
}

/// The store an artifact URI (`<store url>/encoders/<sha256>`) lives in.
pub fn store_of(uri: &str, sha256: &str) -> Result<ArtifactStore> {
    let base = uri
        .trim_end_matches('/')
        .strip_suffix(&format!("/{ENCODERS}/{sha256}"))
        .ok_or_else(|| ArtifactError::BadIndex {
            uri: uri.to_owned(),
            detail: format!("an artifact URI ends in /{ENCODERS}/<its sha256> ({sha256})"),
        })?;
    ArtifactStore::open(base, false)
}

/// A version's encoder as a local directory: its artifact fetched (or
/// taken from `cache`) and verified, else its encoder directory, which
/// must exist.
pub async fn materialize(version: &ModelVersion, cache: &Path) -> Result<PathBuf> {
    let source = version.source().ok_or_else(|| ArtifactError::NoEncoder {
        version: version.version.clone(),
        detail: "neither an encoder directory nor an artifact".into(),
    })?;
    materialize_source(
        &version.version,
        &source,
        version.embedding_dim as usize,
        cache,
    )
    .await
}

/// [`materialize`] from a version's name, source and dimension (what a
/// deployment row carries).
pub async fn materialize_source(
    version: &str,
    source: &EncoderSource,
    dimension: usize,
    cache: &Path,
) -> Result<PathBuf> {
    match source {
        EncoderSource::Dir(dir) => {
            if !dir.join(kalon_encoder::MANIFEST_FILE).is_file() {
                return Err(ArtifactError::NoEncoder {
                    version: version.to_owned(),
                    detail: format!(
                        "its encoder directory {} has no {} on this host",
                        dir.display(),
                        kalon_encoder::MANIFEST_FILE
                    ),
                });
            }
            Ok(dir.clone())
        }
        EncoderSource::Artifact { uri, sha256 } => {
            let store = store_of(uri, sha256)?;
            store
                .fetch(uri, sha256, dimension, cache)
                .await
                .map_err(|e| e.for_version(version))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_listing_hash_is_canonical() {
        let a = FileEntry {
            path: "a".into(),
            size: 1,
            sha256: "00".into(),
        };
        let b = FileEntry {
            path: "b/c".into(),
            size: 2,
            sha256: "11".into(),
        };
        assert_eq!(
            listing_sha256(&[a.clone(), b.clone()]),
            listing_sha256(&[b.clone(), a.clone()])
        );
        let mut bigger = b.clone();
        bigger.size = 3;
        assert_ne!(
            listing_sha256(&[a.clone(), b]),
            listing_sha256(&[a, bigger])
        );
        // sha256 of the empty listing
        assert_eq!(
            listing_sha256(&[]),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn dir_hash_skips_checkpoints_and_refuses_links() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("x.onnx"), b"abc").unwrap();
        let before = dir_sha256(dir.path()).unwrap();
        std::fs::create_dir(dir.path().join(SKIPPED_DIR)).unwrap();
        std::fs::write(dir.path().join(SKIPPED_DIR).join("step-1"), b"zz").unwrap();
        assert_eq!(dir_sha256(dir.path()).unwrap(), before);
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub").join("y"), b"").unwrap();
        let listed = list_dir(dir.path()).unwrap();
        assert_eq!(
            listed.iter().map(|f| f.path.as_str()).collect::<Vec<_>>(),
            ["sub/y", "x.onnx"]
        );
        assert_eq!(
            listed[1].sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        std::os::unix::fs::symlink("x.onnx", dir.path().join("link")).unwrap();
        let error = dir_sha256(dir.path()).unwrap_err().to_string();
        assert!(error.contains("symbolic link"), "{error}");
    }

    #[test]
    fn store_urls() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}/store", dir.path().display());
        let store = ArtifactStore::from_url(&url).unwrap();
        assert!(dir.path().join("store").is_dir());
        assert_eq!(store.uri_of("ab"), format!("{url}/encoders/ab"));
        for bad in [
            "file://relative/dir",
            "ftp://host/x",
            "/abs/path",
            "memory:///",
        ] {
            let error = ArtifactStore::from_url(bad).unwrap_err().to_string();
            assert!(error.contains(bad.trim_end_matches('/')), "{error}");
        }
        // builders from the environment; nothing is contacted until used
        let s3 = ArtifactStore::from_url("s3://bucket/some/prefix").unwrap();
        assert_eq!(
            s3.object("ab", "x/y.onnx").as_ref(),
            "some/prefix/encoders/ab/x/y.onnx"
        );
        assert!(ArtifactStore::from_url("gs://bucket/prefix").is_ok());
        assert_eq!(
            default_url(Path::new("/srv/kalon")),
            "file:///srv/kalon/artifacts"
        );
    }
}
