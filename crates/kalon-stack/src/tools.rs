//! Tools Kalon installs once into a cache folder outside the repository.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context};

/// The tansu release Kalon is tested with.
pub const TANSU_VERSION: &str = "0.6.0";

/// `$KALON_CACHE_DIR`, or `~/.cache/kalon`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("KALON_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    home.join(".cache").join("kalon")
}

/// Where the tansu binary lives: `$KALON_TANSU_BIN`, or the cache.
pub fn tansu_path() -> PathBuf {
    if let Some(path) = std::env::var_os("KALON_TANSU_BIN") {
        return PathBuf::from(path);
    }
    cache_dir()
        .join("tools")
        .join(format!("tansu-{TANSU_VERSION}"))
        .join("bin")
        .join("tansu")
}

/// The tansu binary, or a clear error saying how to get it.
pub fn find_tansu() -> anyhow::Result<PathBuf> {
    let path = tansu_path();
    if path.is_file() {
        Ok(path)
    } else {
        bail!(
            "the tansu broker is not installed at {}; run `kalonctl stack up` or `bash scripts/install-tools.sh` \
             (builds it once, about 12 minutes), or set KALON_TANSU_BIN",
            path.display()
        )
    }
}

/// Installs tansu into the cache unless it is there already. Slow the first
/// time; cargo's own progress output is shown.
pub fn install_tansu() -> anyhow::Result<PathBuf> {
    if let Ok(path) = find_tansu() {
        return Ok(path);
    }
    let path = tansu_path();
    let root = path
        .parent()
        .and_then(|bin| bin.parent())
        .context("tansu path has no install root")?;
    eprintln!(
        "installing tansu {TANSU_VERSION} into {} (one time, about 12 minutes on 2 cores)...",
        root.display()
    );
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args(["install", "tansu", "--version", TANSU_VERSION, "--locked"])
        .args(["--features", "dynostore,libsql", "--root"])
        .arg(root)
        // keep tansu's build out of a workspace target dir
        .env_remove("CARGO_TARGET_DIR")
        .env("CARGO_TARGET_DIR", cache_dir().join("tansu-build"))
        .status()
        .context("failed to run cargo install")?;
    if !status.success() {
        bail!("cargo install tansu failed ({status})");
    }
    find_tansu()
}
