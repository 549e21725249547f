//! `kalonctl sim ...`: the simulated world.

use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Subcommand;
use kalon_world::WorldSpec;

#[derive(Clone, Subcommand)]
pub enum Sim {
    /// Generate a world into a folder: PNG images, captions, queries, HPIR items, hidden truth.
    Generate {
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, default_value_t = 10_000)]
        images: usize,
        /// Edge of the square images in pixels.
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[arg(long, default_value = "world")]
        out: PathBuf,
    },
    /// Serve the world's OpenAI-compatible LLM/LMM endpoint (rephrasing, judging) with noise, position bias, latency and faults.
    ServeLlm(kalon_sim_llm::cli::ServeArgs),
}

pub fn run(sim: &Sim) -> anyhow::Result<()> {
    match sim {
        Sim::Generate {
            seed,
            images,
            size,
            out,
        } => {
            let started = Instant::now();
            let exported = generate(*seed, *images, *size, out)?;
            let seconds = started.elapsed().as_secs_f64();
            println!(
                "{}",
                serde_json::json!({"sim": "generate", "seed": seed, "images": exported.images, "seconds": (seconds * 100.0).round() / 100.0, "images_per_s": (exported.images as f64 / seconds).round()})
            );
            Ok(())
        }
        Sim::ServeLlm(_) => unreachable!("served on the async runtime by main"),
    }
}

/// The settings `generate` builds a world with.
pub fn spec(seed: u64, images: usize, size: usize) -> WorldSpec {
    WorldSpec {
        image_size: size,
        ..WorldSpec::new(seed, images)
    }
}

/// Generates a world into `out` with a progress bar; says what it wrote on
/// stderr.
pub fn generate(
    seed: u64,
    images: usize,
    size: usize,
    out: &Path,
) -> anyhow::Result<kalon_world::Exported> {
    anyhow::ensure!(size >= 16, "--size must be at least 16 pixels");
    let spec = spec(seed, images, size);
    let bar = crate::progress_bar(images as u64, "images");
    let exported = kalon_world::export(&spec, out, |n| {
        if n % 100 == 0 {
            bar.set_position(n as u64);
        }
    })?;
    bar.finish();
    eprintln!(
        "world seed {seed}: {} images ({:.1} MB of PNG), {} queries, {} HPIR items in {}",
        exported.images,
        exported.png_bytes as f64 / 1e6,
        exported.queries,
        exported.hpir_items,
        out.display()
    );
    Ok(exported)
}
