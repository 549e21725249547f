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
            "the tansu broker is not installed at {}; run `kalonctl tools install` \
             (builds it once, 12 to 45 minutes on 2 cores), or set KALON_TANSU_BIN",
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
        "installing tansu {TANSU_VERSION} into {} (one time, 12 to 45 minutes on 2 cores; cargo shows its progress)...",
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
    // the build folder holds gigabytes nobody needs once tansu is installed
    let _ = std::fs::remove_dir_all(cache_dir().join("tansu-build"));
    find_tansu()
}

/// Puts ONNX Runtime's shared library at `library` (a path ending in
/// `libonnxruntime.so.VERSION`) unless it is there: downloads PyPI's CPU
/// wheel `onnxruntime==version` with pip and takes the library files out of
/// `onnxruntime/capi/` into `library`'s folder. About 24 MB; pip shows its
/// progress. Needs `python3` with pip and access to PyPI.
pub fn install_onnxruntime(library: &std::path::Path, version: &str) -> anyhow::Result<()> {
    if library.is_file() {
        return Ok(());
    }
    let dir = library
        .parent()
        .context("the ONNX Runtime library path has no folder")?;
    let platform = match std::env::consts::ARCH {
        "x86_64" => "manylinux_2_28_x86_64",
        "aarch64" => "manylinux_2_28_aarch64",
        other => bail!(
            "no ONNX Runtime wheel for {other}: point ORT_DYLIB_PATH at your own libonnxruntime.so.{version}"
        ),
    };
    eprintln!(
        "fetching ONNX Runtime {version} (about 24 MB, PyPI's onnxruntime wheel) into {}...",
        dir.display()
    );
    let wheels = tempdir_in(&cache_dir(), "ort-wheel")?;
    let status = Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:"])
        .args(["--python-version", "3.11", "--platform", platform])
        .arg(format!("onnxruntime=={version}"))
        .arg("-d")
        .arg(&wheels)
        .status()
        .context("failed to run `python3 -m pip` (ONNX Runtime comes from PyPI's wheel; install Python 3 with pip, or point ORT_DYLIB_PATH at your own library)")?;
    if !status.success() {
        let _ = std::fs::remove_dir_all(&wheels);
        bail!("pip could not download onnxruntime=={version} ({status}); is PyPI reachable?");
    }
    // unpack into a folder of this process's own, then move each file into
    // place with a rename: a half-written library is never taken for a
    // whole one, and two first runs at once do not disturb each other
    let staging = tempdir_in(
        dir.parent().unwrap_or(dir),
        &format!(
            "{}.partial",
            dir.file_name().unwrap_or_default().to_string_lossy()
        ),
    )?;
    let unpack = r#"
import glob, sys, zipfile
wheels, out = sys.argv[1:]
(wheel,) = glob.glob(f"{wheels}/onnxruntime-*.whl")
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith("onnxruntime/capi/libonnxruntime"):
            with z.open(name) as src, open(f"{out}/{name.rsplit('/', 1)[1]}", "wb") as dst:
                dst.write(src.read())
"#;
    let unpacked = Command::new("python3")
        .args(["-c", unpack])
        .arg(&wheels)
        .arg(&staging)
        .status()
        .context("failed to run python3 to unpack the wheel");
    let _ = std::fs::remove_dir_all(&wheels);
    let moved = unpacked.and_then(|status| {
        let name = library.file_name().context("no file name")?;
        if !status.success() || !staging.join(name).is_file() {
            bail!(
                "the onnxruntime=={version} wheel holds no {}",
                name.to_string_lossy()
            );
        }
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        // the library itself last: once it is there, the rest is too
        let mut files: Vec<PathBuf> = std::fs::read_dir(&staging)?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()?;
        files.sort_by_key(|f| f.file_name() == Some(name));
        for file in files {
            let to = dir.join(file.file_name().context("no file name")?);
            std::fs::rename(&file, &to)
                .with_context(|| format!("cannot move {} into place", to.display()))?;
        }
        Ok(())
    });
    let _ = std::fs::remove_dir_all(&staging);
    moved?;
    eprintln!("ONNX Runtime {version} is at {}", library.display());
    Ok(())
}

/// A new empty folder under `parent` (made if missing).
fn tempdir_in(parent: &std::path::Path, prefix: &str) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(parent)
        .with_context(|| format!("cannot create {}", parent.display()))?;
    let dir = parent.join(format!("{prefix}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}
