//! `kalon-bench encoder`: both towers' throughput on ONNX Runtime.

use std::path::Path;
use std::time::Instant;

use kalon_encoder::{Encoder, EncoderOptions};
use kalonctl::model::{held_out_files, prepare, PretrainArgs};

/// `kalon-bench encoder`: throughput of both towers at batch 1 and 32.
pub fn bench_encoder(
    state_dir: &Path,
    seed: u64,
    images: usize,
    model: Option<&Path>,
    count: usize,
) -> anyhow::Result<()> {
    anyhow::ensure!(count > 0, "--count must be positive");
    let prepared = prepare(
        state_dir,
        seed,
        images,
        model,
        false,
        &PretrainArgs::defaults(),
    )?;
    let (mut files, mut captions) = held_out_files(&prepared.world)?;
    while files.len() < count {
        files.extend_from_within(..);
        captions.extend_from_within(..);
    }
    files.truncate(count);
    captions.truncate(count);
    let mut figures = serde_json::Map::new();
    println!(
        "{:<8} {:>6} {:>12} {:>12}",
        "tower", "batch", "per second", "ms / call"
    );
    for batch in [1usize, 32] {
        let options = EncoderOptions {
            batch_size: batch,
            ..EncoderOptions::from_env()?
        };
        let encoder = Encoder::load(&prepared.model, &options)?;
        // warm up (first calls allocate)
        encoder.image.embed_files(&files[..batch])?;
        encoder.text.embed_texts(&captions[..batch])?;
        let started = Instant::now();
        encoder.image.embed_files(&files)?;
        let image_s = started.elapsed().as_secs_f64();
        let started = Instant::now();
        encoder.text.embed_texts(&captions)?;
        let text_s = started.elapsed().as_secs_f64();
        let calls = count.div_ceil(batch) as f64;
        for (tower, seconds) in [("image", image_s), ("text", text_s)] {
            let rate = count as f64 / seconds;
            println!(
                "{tower:<8} {batch:>6} {rate:>12.0} {:>12.3}",
                seconds * 1e3 / calls
            );
            figures.insert(
                format!("{tower}s_per_s_batch_{batch}"),
                serde_json::json!(rate.round()),
            );
        }
    }
    figures.insert("count".into(), count.into());
    figures.insert("model".into(), prepared.model.display().to_string().into());
    println!("{}", serde_json::Value::Object(figures));
    Ok(())
}
