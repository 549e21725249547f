//! What Kalon needs on a machine besides its own binaries, installed once
//! into the cache (`$KALON_CACHE_DIR`, default `~/.cache/kalon`): the tansu
//! broker (built from crates.io) and ONNX Runtime's library (from PyPI's
//! wheel). The main job and the tests install them the same way, here.

use std::path::PathBuf;

use kalon_encoder::runtime::{library_override, library_path, ORT_VERSION};

/// ONNX Runtime's library, fetched into the cache when missing (nothing
/// is done when it is there). With
/// `ORT_DYLIB_PATH` set, that file must exist: nothing is fetched over it.
pub fn ensure_onnxruntime() -> anyhow::Result<PathBuf> {
    let path = library_path();
    if library_override().is_some() && !path.is_file() {
        anyhow::bail!(
            "ORT_DYLIB_PATH points at {}, which does not exist; unset it to use Kalon's own copy",
            path.display()
        );
    }
    kalon_stack::tools::install_onnxruntime(&path, ORT_VERSION)?;
    Ok(path)
}

/// Installs both tools (each skipped when present).
pub fn install() -> anyhow::Result<()> {
    let tansu = kalon_stack::tools::install_tansu()?;
    let ort = ensure_onnxruntime()?;
    eprintln!(
        "tansu: {}\nONNX Runtime: {}",
        tansu.display(),
        ort.display()
    );
    Ok(())
}

/// Says up front what a first run on this machine still has to fetch or
/// build, and roughly how long that takes (nothing when all is there).
pub fn announce_first_run(will_pretrain: bool) {
    let mut steps = Vec::new();
    if kalon_stack::tools::find_tansu().is_err() {
        steps.push("build the tansu broker from crates.io (12 to 45 min on 2 cores; skipped when a broker already answers)");
    }
    if !library_path().is_file() {
        steps.push("download ONNX Runtime from PyPI (about 24 MB, under a minute)");
    }
    if will_pretrain {
        steps.push("build a small world and pretrain the reference model (about 3 to 5 min)");
    }
    if steps.is_empty() {
        return;
    }
    eprintln!("first run here: this will");
    for step in steps {
        eprintln!("  - {step}");
    }
    eprintln!("(each is done once and kept; later runs skip it)");
}
