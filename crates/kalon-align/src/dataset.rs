//! A dataset folder, embedded once by the (frozen) encoder: image-caption
//! pairs (training first, then held out), the training queries, the
//! HPIR-style items (`kalon_dataset`'s format), and extra preference pairs
//! read from JSONL.

use std::collections::HashMap;
use std::path::Path;

use kalon_encoder::image::RgbImage;
use kalon_encoder::{Embeddings, Encoder};
use kalon_model::train::{Pairs, Split};

/// A world's data, embedded once by the (frozen) encoder.
pub struct Embedded {
    /// Image-caption pairs, training pairs first, then the held-out ones.
    pub pairs: Pairs,
    pub index: HashMap<String, usize>,
    /// Unit image embeddings, in `pairs` order.
    pub images: Embeddings,
    pub caption_embeds: Embeddings,
    /// How many leading rows are training pairs.
    pub train: usize,
}

impl Embedded {
    pub fn load(world: &Path, encoder: &Encoder) -> anyhow::Result<Embedded> {
        let size = encoder.manifest.image.size as usize;
        let mut pairs = Pairs::load(world, Split::Train, size, None)?;
        let train = pairs.len();
        let held = Pairs::load(world, Split::HeldOut, size, None)?;
        pairs.ids.extend(held.ids);
        pairs.captions.extend(held.captions);
        pairs.rgb.extend(held.rgb);
        let mut pixels = Vec::with_capacity(pairs.len() * 3 * size * size);
        for image in pairs.rgb.chunks_exact(3 * size * size) {
            kalon_encoder::preprocess::push_rgb8(image, &encoder.manifest.image, &mut pixels);
        }
        let images = encoder.image.embed_pixels(&pixels)?;
        let caption_embeds = encoder.text.embed_texts(&pairs.captions)?;
        let index = pairs
            .ids
            .iter()
            .enumerate()
            .map(|(i, id)| (id.clone(), i))
            .collect();
        Ok(Embedded {
            pairs,
            index,
            images,
            caption_embeds,
            train,
        })
    }

    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    pub fn image(&self, i: usize) -> RgbImage {
        let size = self.pairs.size;
        let per = 3 * size * size;
        RgbImage::from_raw(
            size as u32,
            size as u32,
            self.pairs.rgb[i * per..(i + 1) * per].to_vec(),
        )
        .expect("whole image")
    }
}

/// Reads a JSONL file of preference pairs; a bad line is an error naming it.
pub fn read_pairs(path: &Path) -> anyhow::Result<Vec<crate::PreferencePair>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            serde_json::from_str(line).map_err(|e| {
                anyhow::anyhow!(
                    "{} line {}: not a preference pair: {e}",
                    path.display(),
                    i + 1
                )
            })
        })
        .collect()
}

/// One HPIR item of `hpir.jsonl` (the dataset format's).
pub use kalon_dataset::HpirItem as HpirLine;
pub use kalon_dataset::{read_hpir, train_queries};
