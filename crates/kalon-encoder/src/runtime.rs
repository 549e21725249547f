//! Finding and loading ONNX Runtime.
//!
//! Kalon builds `ort` with `load-dynamic`: nothing of ONNX Runtime is linked
//! at build time, the shared library is opened once per process at first
//! use. It is looked for at `ORT_DYLIB_PATH`, else in Kalon's cache
//! (`$KALON_CACHE_DIR`, default `~/.cache/kalon`, where
//! `kalonctl tools install`, and every kalonctl command that runs a model,
//! puts the library out of PyPI's `onnxruntime==1.31.1` wheel).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::environment::Environment;

use crate::{EncoderError, Result};

/// The ONNX Runtime release `ort` 2.0.0-rc.15 is written against.
pub const ORT_VERSION: &str = "1.31.1";

/// The library `ORT_DYLIB_PATH` names, when it is set and not empty.
pub fn library_override() -> Option<PathBuf> {
    std::env::var_os("ORT_DYLIB_PATH")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
}

/// Where the library is expected: `ORT_DYLIB_PATH`, else the cache.
pub fn library_path() -> PathBuf {
    if let Some(path) = library_override() {
        return path;
    }
    let cache = std::env::var_os("KALON_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/kalon")))
        .unwrap_or_else(|| PathBuf::from("/tmp/.cache/kalon"));
    cache
        .join(format!("onnxruntime-{ORT_VERSION}"))
        .join(format!("libonnxruntime.so.{ORT_VERSION}"))
}

static ENVIRONMENT: OnceLock<Result<Environment>> = OnceLock::new();

/// The process's ONNX Runtime environment, loading the library on first
/// call. A missing or unloadable library is an error, never a panic.
pub fn environment() -> Result<&'static Environment> {
    ENVIRONMENT
        .get_or_init(|| load(&library_path()))
        .as_ref()
        .map_err(Clone::clone)
}

/// Opens the library at `path` and builds the environment.
fn load(path: &Path) -> Result<Environment> {
    check_library(path)?;
    let builder = ort::init_from(path).map_err(|e| EncoderError::RuntimeLoad {
        path: path.to_owned(),
        detail: e.to_string(),
    })?;
    let environment =
        builder
            .with_name("kalon")
            .build()
            .map_err(|e| EncoderError::RuntimeLoad {
                path: path.to_owned(),
                detail: e.to_string(),
            })?;
    tracing::info!(library = %path.display(), "ONNX Runtime loaded");
    Ok(environment)
}

/// Checks that `path` names a readable file, before handing it to `dlopen`.
pub fn check_library(path: &Path) -> Result<()> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_file() => Ok(()),
        Ok(_) => Err(EncoderError::RuntimeLoad {
            path: path.to_owned(),
            detail: "not a file".into(),
        }),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            Err(EncoderError::RuntimeMissing {
                path: path.to_owned(),
            })
        }
        Err(error) => Err(EncoderError::RuntimeLoad {
            path: path.to_owned(),
            detail: error.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_library_says_where_it_was_looked_for_and_how_to_get_it() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("libonnxruntime.so.1.31.1");
        let error = check_library(&missing).unwrap_err();
        assert!(
            matches!(error, EncoderError::RuntimeMissing { .. }),
            "{error:?}"
        );
        let message = error.to_string();
        assert!(
            message.contains(&missing.display().to_string()),
            "{message}"
        );
        assert!(message.contains("kalonctl tools install"), "{message}");
        assert!(message.contains("ORT_DYLIB_PATH"), "{message}");
        // a folder is not a library either
        let error = check_library(dir.path()).unwrap_err();
        assert!(
            matches!(error, EncoderError::RuntimeLoad { .. }),
            "{error:?}"
        );
    }
}
