//! D_po from live queries: for a query the enricher rephrased, retrieve the
//! top K for the rephrasing with the serving (promoted) version, order the
//! rows with the teacher, and store the product order's pairs for the
//! ORIGINAL query: `kalon_align::dpo::dpo_for_query`, the very function the
//! offline construction (`kalonctl eval align`) runs.
//!
//! The serving version's encoder is fetched from the registry (verified by
//! its hash) and the catalog embedded with it once per version. A failing
//! teacher leaves the query pending with a backoff; the teacher's answers
//! are remembered for the life of the process, so a retry asks only what
//! was not answered.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use kalon_align::dataset::Embedded;
use kalon_align::scorer::{AestheticScorer, Candidate, LowLevelScorer, ModelScorer};
use kalon_align::{PairSource, PreferencePair};
use kalon_encoder::{Encoder, EncoderOptions};
use kalon_llm::PromptVariant;
use sqlx::PgPool;
use tracing::{info, warn};

use crate::config::{PreferencesConfig, Teacher};
use crate::store::{self, DpoItem, PairRow};

/// The serving version, loaded: its encoder and the catalog it embedded.
pub struct Serving {
    pub version: String,
    pub encoder: Encoder,
    pub data: Embedded,
    pub dir: PathBuf,
}

impl Serving {
    /// Loads `dir` (the version's encoder) and embeds the dataset with it.
    pub fn load(version: &str, dir: &Path, dataset: &Path) -> anyhow::Result<Serving> {
        let encoder = Encoder::load(dir, &EncoderOptions::from_env()?)
            .with_context(|| format!("cannot load version {version}'s encoder"))?;
        let data = Embedded::load(dataset, &encoder)?;
        Ok(Serving {
            version: version.to_owned(),
            encoder,
            data,
            dir: dir.to_owned(),
        })
    }
}

/// A teacher whose answers are remembered: a query retried after a failure
/// asks only for the rows not yet scored.
pub struct Remembering {
    inner: Box<dyn AestheticScorer>,
    seen: Mutex<HashMap<Asked, Vec<f64>>>,
}

/// A question to the teacher: a query and the ids of one row.
type Asked = (String, Vec<String>);

/// Answers kept at most; beyond, the memory starts again.
const REMEMBERED: usize = 50_000;

impl Remembering {
    pub fn new(inner: Box<dyn AestheticScorer>) -> Self {
        Remembering {
            inner,
            seen: Mutex::new(HashMap::new()),
        }
    }
}

impl AestheticScorer for Remembering {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn score(&self, query: &str, candidates: &[Candidate<'_>]) -> anyhow::Result<Vec<f64>> {
        let key = (
            query.to_owned(),
            candidates.iter().map(|c| c.id.to_owned()).collect(),
        );
        if let Some(scores) = self.seen.lock().expect("teacher memory").get(&key) {
            return Ok(scores.clone());
        }
        let scores = self.inner.score(query, candidates)?;
        let mut seen = self.seen.lock().expect("teacher memory");
        if seen.len() >= REMEMBERED {
            seen.clear();
        }
        seen.insert(key, scores.clone());
        Ok(scores)
    }
}

/// The teacher the configuration asks for. The `model` teacher scores with
/// the serving encoder's image tower, so it is built per serving version.
pub fn teacher(
    config: &PreferencesConfig,
    llm: Option<&kalon_llm::LlmClient>,
    serving_dir: &Path,
) -> anyhow::Result<Box<dyn AestheticScorer>> {
    Ok(match config.teacher() {
        Teacher::LowLevel => Box::new(LowLevelScorer::default()),
        Teacher::Model => {
            let head = config
                .aesthetic_model
                .as_ref()
                .context("--teacher model needs --aesthetic-model FILE.onnx")?;
            Box::new(ModelScorer::load(
                serving_dir,
                head,
                &EncoderOptions::from_env()?,
            )?)
        }
        Teacher::Lmm => {
            let llm = llm.context(
                "the lmm teacher needs an endpoint: set KALON_LLM_BASE_URL (or choose --teacher low-level / model)",
            )?;
            let source = match &config.image_base_url {
                Some(base) => kalon_align::lmm::ImageSource::Url(base.clone()),
                None => kalon_align::lmm::ImageSource::Files(config.dataset.clone()),
            };
            let judge = kalon_llm::Judge::new(llm.clone());
            Box::new(kalon_align::lmm::LmmScorer::new(judge, source)?)
        }
    })
}

/// Why a queued query makes no pairs, ever.
#[derive(Debug)]
pub enum Outcome {
    Pairs(Vec<PairRow>),
    Refused(String),
}

/// D_po for one queued query with `serving` and `teacher` (blocking: it
/// embeds and asks the teacher).
pub fn build(
    item: &DpoItem,
    serving: &Serving,
    teacher: &dyn AestheticScorer,
    variants: &[PromptVariant],
    spec: &kalon_align::algorithm::DpoSpec,
) -> anyhow::Result<Outcome> {
    let needed = (spec.u * spec.v - 1) * spec.stride + 1;
    if serving.data.train < needed {
        return Ok(Outcome::Refused(format!(
            "the catalog has {} training images; a {}x{} matrix at stride {} needs {needed}",
            serving.data.train, spec.u, spec.v, spec.stride
        )));
    }
    let rephrasings: Vec<(PromptVariant, String)> = variants
        .iter()
        .filter_map(|v| {
            item.rephrasings
                .get(v.name())
                .and_then(|r| r.as_str())
                .map(|r| (*v, r.to_owned()))
        })
        .collect();
    if rephrasings.is_empty() {
        return Ok(Outcome::Refused(format!(
            "none of the variants D_po uses ({}) was rephrased",
            variants
                .iter()
                .map(|v| v.name())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let original = serving.encoder.text.embed_texts(&[item.query.as_str()])?;
    let texts: Vec<&str> = rephrasings.iter().map(|(_, r)| r.as_str()).collect();
    let enriched = serving.encoder.text.embed_texts(&texts)?;
    let mut rows = Vec::new();
    for (i, (variant, rephrased)) in rephrasings.iter().enumerate() {
        let cells = kalon_align::dpo::dpo_for_query(
            &serving.data,
            &item.query,
            original.row(0),
            enriched.row(i),
            teacher,
            spec,
        )?;
        for (winner, loser) in cells {
            let identity = serde_json::json!({
                "variant": variant.name(),
                "rephrased": rephrased,
                "teacher": teacher.name(),
                "model_version": serving.version,
            });
            let pair = PreferencePair {
                query: item.query.clone(),
                winner: serving.data.pairs.ids[winner].clone(),
                loser: serving.data.pairs.ids[loser].clone(),
                source: PairSource::Dpo,
                weight: 1.0,
                provenance: serde_json::json!({
                    "variant": variant.name(),
                    "rephrased": rephrased,
                    "teacher": teacher.name(),
                    "rephrased_event": item.event_id.to_string(),
                }),
            };
            rows.push(PairRow {
                id: store::pair_id(&pair, &identity),
                pair,
                model_version: Some(serving.version.clone()),
                variant: None,
            });
        }
    }
    Ok(Outcome::Pairs(rows))
}

/// Keeps the serving version loaded: reloads when the promoted version
/// changes. Returns None while no version is promoted.
pub(crate) async fn serving(
    pool: &PgPool,
    config: &PreferencesConfig,
    cache: &Path,
    current: &mut Option<Arc<Serving>>,
) -> anyhow::Result<Option<Arc<Serving>>> {
    let Some(promoted) = kalon_registry::lifecycle::promoted(pool).await? else {
        return Ok(None);
    };
    if let Some(serving) = current {
        if serving.version == promoted.version {
            return Ok(Some(serving.clone()));
        }
    }
    let dir = kalon_registry::artifact::materialize(&promoted, cache).await?;
    let dataset = config.dataset.clone();
    let version = promoted.version.clone();
    info!(version, "loading the serving version for D_po");
    let loaded =
        tokio::task::spawn_blocking(move || Serving::load(&version, &dir, &dataset)).await??;
    let loaded = Arc::new(loaded);
    *current = Some(loaded.clone());
    Ok(Some(loaded))
}

/// The pause before the `attempt`-th retry: doubling from 1 s, capped.
pub(crate) fn backoff(attempt: i32, max: Duration) -> Duration {
    let exponent = attempt.clamp(1, 20) as u32 - 1;
    Duration::from_millis(1000u64.saturating_mul(1 << exponent)).min(max)
}

pub(crate) fn warn_failed(item: &DpoItem, error: &anyhow::Error, retry_in: Duration) {
    warn!(
        query = item.query,
        attempt = item.attempts,
        retry_in_s = retry_in.as_secs_f64(),
        "D_po failed: {error:#}"
    );
}
