//! The LMM judge as an aesthetic scorer: it ranks a query's candidates,
//! asked in both orders (see `kalon_llm::judge::Judge::rank`), so D_po rows
//! are ordered by what a model of people's taste sees (harmony,
//! composition, style), not only by low-level statistics.

use std::path::PathBuf;

use anyhow::Context;
use kalon_llm::blocking::Blocking;
use kalon_llm::{Aspect, ImageRef, Judge};

use crate::scorer::{AestheticScorer, Candidate};

/// How the judge is shown an image.
#[derive(Debug, Clone)]
pub enum ImageSource {
    /// `BASE/<id>.png`, fetched by the model's provider.
    Url(String),
    /// The world's own PNG file (`DIR/images/<id>.png`), sent inline.
    Files(PathBuf),
}

impl ImageSource {
    fn image(&self, id: &str) -> anyhow::Result<ImageRef> {
        Ok(match self {
            ImageSource::Url(base) => {
                ImageRef::Url(format!("{}/{id}.png", base.trim_end_matches('/')))
            }
            ImageSource::Files(dir) => {
                let path = dir.join("images").join(format!("{id}.png"));
                ImageRef::Png(
                    std::fs::read(&path)
                        .with_context(|| format!("cannot read {}", path.display()))?,
                )
            }
        })
    }
}

pub struct LmmScorer {
    judge: Judge,
    source: ImageSource,
    blocking: Blocking,
}

impl LmmScorer {
    pub fn new(judge: Judge, source: ImageSource) -> anyhow::Result<Self> {
        Ok(LmmScorer {
            judge,
            source,
            blocking: Blocking::new("kalon-lmm-scorer")?,
        })
    }

    /// With an existing runtime (one that also serves an in-process endpoint).
    pub fn on(judge: Judge, source: ImageSource, blocking: Blocking) -> Self {
        LmmScorer {
            judge,
            source,
            blocking,
        }
    }
}

impl AestheticScorer for LmmScorer {
    fn name(&self) -> &str {
        "lmm-judge"
    }

    fn score(&self, query: &str, candidates: &[Candidate<'_>]) -> anyhow::Result<Vec<f64>> {
        let images = candidates
            .iter()
            .map(|c| self.source.image(c.id))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let judge = self.judge.clone();
        let query = query.to_owned();
        let (scores, _) = self
            .blocking
            .run(async move { judge.rank(&query, Aspect::Aesthetic, &images).await })??;
        Ok(scores)
    }
}
