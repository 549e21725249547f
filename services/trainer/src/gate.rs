//! The offline gate (the blessing step, as TFX's Evaluator has it): on the
//! catalog's held-out data, a candidate must not be worse than its parent
//! beyond configured tolerances. A metric fails only when the evidence says
//! so: its change plus `z` paired standard errors is still below minus the
//! tolerance. A version that fails is registered `gated_failed` with these
//! figures and is never offered to the canary.

use clap::Args;
use kalon_align::dataset::{Embedded, HpirLine};
use kalon_align::eval::{self, AgreementChange, ModelFigures};
use kalon_encoder::{Embeddings, Encoder};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Args, Serialize, Deserialize)]
pub struct GateConfig {
    /// Largest HPIR accuracy (relevance) agreement drop tolerated, as a fraction.
    #[arg(long, env = "KALON_GATE_ACCURACY_TOLERANCE", default_value_t = 0.01)]
    pub accuracy_tolerance: f64,
    /// Largest HPIR aesthetic agreement drop tolerated, as a fraction.
    #[arg(long, env = "KALON_GATE_AESTHETIC_TOLERANCE", default_value_t = 0.01)]
    pub aesthetic_tolerance: f64,
    /// Largest held-out recall@10 drop tolerated, as a fraction.
    #[arg(long, env = "KALON_GATE_RECALL_TOLERANCE", default_value_t = 0.02)]
    pub recall_tolerance: f64,
    /// Standard errors of benefit of the doubt (1.64: one-sided 95%).
    #[arg(long, env = "KALON_GATE_Z", default_value_t = 1.64)]
    pub z: f64,
    /// Held-out queries whose top-10 rows (candidate vs parent) the LMM
    /// judge compares, per aspect, in both orders; 0: no judge. Needs an
    /// LLM endpoint (`KALON_LLM_BASE_URL`, ...).
    #[arg(long, env = "KALON_GATE_JUDGE_QUERIES", default_value_t = 40)]
    pub judge_queries: usize,
    /// Largest net loss (losses minus wins, as a share of the queries) of
    /// the candidate's rows to the parent's tolerated per aspect.
    #[arg(long, env = "KALON_GATE_JUDGE_TOLERANCE", default_value_t = 0.05)]
    pub judge_tolerance: f64,
}

impl GateConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        for (name, value) in [
            ("accuracy tolerance", self.accuracy_tolerance),
            ("aesthetic tolerance", self.aesthetic_tolerance),
            ("recall tolerance", self.recall_tolerance),
            ("z", self.z),
            ("judge tolerance", self.judge_tolerance),
        ] {
            anyhow::ensure!(
                value.is_finite() && value >= 0.0,
                "gate {name} must be a number >= 0, got {value}"
            );
        }
        Ok(())
    }
}

/// One metric's verdict.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Check {
    pub metric: String,
    pub parent: f64,
    pub candidate: f64,
    pub change: f64,
    /// Paired standard error of the change (0 where none is computed).
    pub standard_error: f64,
    pub tolerance: f64,
    pub passed: bool,
}

/// The gate's figures and verdict, stored with the version and its run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GateReport {
    pub passed: bool,
    /// Held-out HPIR items and captions evaluated.
    pub hpir_items: usize,
    pub held_out_captions: usize,
    pub checks: Vec<Check>,
    pub config: GateConfig,
    /// The LMM judge's order-consistent verdicts of candidate rows against
    /// parent rows, per aspect (its checks are among `checks`), or why it
    /// did not judge.
    pub judge: serde_json::Value,
}

/// The rows of the `k` catalog images most similar to `query`.
fn top_k(query: &[f32], images: &Embeddings, k: usize) -> Vec<usize> {
    let mut scored: Vec<(f32, usize)> = (0..images.len())
        .map(|i| (query.iter().zip(images.row(i)).map(|(a, b)| a * b).sum(), i))
        .collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    scored.into_iter().take(k).map(|(_, i)| i).collect()
}

/// The judge's verdicts on `queries` (held-out), candidate rows as A.
#[allow(clippy::too_many_arguments)]
fn judge_rows(
    judge: &kalon_llm::Judge,
    dataset: &std::path::Path,
    queries: &[&str],
    parent: &Encoder,
    candidate: &Encoder,
    parent_images: &Embeddings,
    candidate_images: &Embeddings,
    data: &Embedded,
) -> anyhow::Result<Vec<(kalon_llm::Aspect, kalon_llm::Tally, usize)>> {
    let before = parent.text.embed_texts(queries)?;
    let after = candidate.text.embed_texts(queries)?;
    let image = |row: usize| -> anyhow::Result<kalon_llm::ImageRef> {
        let id = &data.pairs.ids[row];
        let path = dataset.join("images").join(format!("{id}.png"));
        Ok(kalon_llm::ImageRef::Png(std::fs::read(&path).map_err(
            |e| anyhow::anyhow!("cannot read {}: {e}", path.display()),
        )?))
    };
    // each query's two rows, read once; identical rows need no call
    let mut rows = Vec::with_capacity(queries.len());
    for i in 0..queries.len() {
        let (a, b) = (
            top_k(after.row(i), candidate_images, 10),
            top_k(before.row(i), parent_images, 10),
        );
        rows.push(if a == b {
            None
        } else {
            let read = |row: Vec<usize>| {
                row.into_iter()
                    .map(image)
                    .collect::<anyhow::Result<Vec<_>>>()
            };
            Some((read(a)?, read(b)?))
        });
    }
    let identical = rows.iter().filter(|r| r.is_none()).count();
    let mut out = Vec::new();
    for aspect in [kalon_llm::Aspect::Relevance, kalon_llm::Aspect::Aesthetic] {
        // every comparison at once: the LLM client's own limits pace them
        let asks = queries.iter().zip(&rows).filter_map(|(query, rows)| {
            let (row_a, row_b) = rows.as_ref()?;
            Some(async move {
                judge
                    .compare(query, aspect, row_a, row_b)
                    .await
                    .map(|c| c.verdict)
                    .map_err(|e| anyhow::anyhow!("the LMM judge failed on {query:?}: {e}"))
            })
        });
        let verdicts = tokio::runtime::Handle::current().block_on(futures::future::join_all(asks));
        let mut tally = kalon_llm::Tally::default();
        for _ in 0..identical {
            tally.add(kalon_llm::Verdict::Similar);
        }
        for verdict in verdicts {
            tally.add(verdict?);
        }
        out.push((aspect, tally, identical));
    }
    Ok(out)
}

impl GateReport {
    /// The failed checks, for a reason line.
    pub fn failures(&self) -> String {
        self.checks
            .iter()
            .filter(|c| !c.passed)
            .map(|c| {
                format!(
                    "{} {:+.3} (+- {:.3}) beyond -{:.3}",
                    c.metric, c.change, c.standard_error, c.tolerance
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

fn figures(
    encoder: &Encoder,
    images: &Embeddings,
    data: &Embedded,
    items: &[HpirLine],
) -> anyhow::Result<(ModelFigures, eval::Judgments)> {
    let texts: Vec<&str> = items.iter().map(|i| i.query.as_str()).collect();
    let queries = encoder.text.embed_texts(&texts)?;
    let judgments = eval::judgments(items, &queries, data, images)?;
    let agreement = judgments.agreement();
    Ok((
        ModelFigures {
            hpir_accuracy: agreement.hpir_accuracy,
            hpir_aesthetic: agreement.hpir_aesthetic,
            recall_at_10: eval::held_out_recall_at_10(data, images),
        },
        judgments,
    ))
}

/// Evaluates the exported `candidate` (loaded from its directory, as search
/// will serve it) against `parent`, whose catalog embeddings `data` holds;
/// with `judge`, also the LMM judge's verdicts on held-out queries' top-10
/// rows (images from `dataset`). Call it on a blocking thread of a Tokio
/// runtime (the judge's calls run on that runtime).
pub fn evaluate(
    parent: &Encoder,
    candidate: &Encoder,
    data: &Embedded,
    items: &[HpirLine],
    config: &GateConfig,
    judge: Option<&kalon_llm::Judge>,
    dataset: &std::path::Path,
) -> anyhow::Result<GateReport> {
    anyhow::ensure!(
        !items.is_empty(),
        "the dataset has no HPIR items to gate on"
    );
    let (before, judged_before) = figures(parent, &data.images, data, items)?;
    let candidate_images = eval::embed_catalog(candidate, data)?;
    let (after, judged_after) = figures(candidate, &candidate_images, data, items)?;
    let AgreementChange {
        hpir_accuracy,
        hpir_aesthetic,
    } = judged_after.change_from(&judged_before);
    let check = |metric: &str, parent: f64, candidate: f64, se: f64, tolerance: f64| {
        let change = candidate - parent;
        Check {
            metric: metric.to_owned(),
            parent,
            candidate,
            change,
            standard_error: se,
            tolerance,
            passed: change + config.z * se >= -tolerance,
        }
    };
    let mut checks = vec![
        check(
            "hpir_accuracy",
            before.hpir_accuracy,
            after.hpir_accuracy,
            hpir_accuracy.standard_error,
            config.accuracy_tolerance,
        ),
        check(
            "hpir_aesthetic",
            before.hpir_aesthetic,
            after.hpir_aesthetic,
            hpir_aesthetic.standard_error,
            config.aesthetic_tolerance,
        ),
        check(
            "recall_at_10",
            before.recall_at_10,
            after.recall_at_10,
            0.0,
            config.recall_tolerance,
        ),
    ];
    let mut judged = serde_json::json!({});
    match judge {
        None => {
            judged =
                serde_json::json!({ "skipped": "no LLM endpoint configured (KALON_LLM_BASE_URL)" });
        }
        Some(_) if config.judge_queries == 0 => {
            judged = serde_json::json!({ "skipped": "--judge-queries 0" });
        }
        Some(judge) => {
            let mut queries: Vec<&str> = Vec::new();
            for item in items {
                if queries.len() == config.judge_queries {
                    break;
                }
                if !queries.contains(&item.query.as_str()) {
                    queries.push(&item.query);
                }
            }
            judged["queries"] = queries.len().into();
            for (aspect, tally, identical) in judge_rows(
                judge,
                dataset,
                &queries,
                parent,
                candidate,
                &data.images,
                &candidate_images,
                data,
            )? {
                let n = tally.total().max(1) as f64;
                let net = (tally.win as f64 - tally.loss as f64) / n;
                let second = (tally.win + tally.loss) as f64 / n;
                let se = ((second - net * net).max(0.0) / n).sqrt();
                let name = aspect.as_str();
                judged[name] = serde_json::json!({
                    "win": tally.win, "similar": tally.similar, "loss": tally.loss,
                    "identical_rows": identical,
                });
                checks.push(Check {
                    metric: format!("judge_{name}_net_win"),
                    parent: tally.loss as f64 / n,
                    candidate: tally.win as f64 / n,
                    change: net,
                    standard_error: se,
                    tolerance: config.judge_tolerance,
                    passed: net + config.z * se >= -config.judge_tolerance,
                });
            }
        }
    }
    Ok(GateReport {
        passed: checks.iter().all(|c| c.passed),
        hpir_items: items.len(),
        held_out_captions: data.len() - data.train,
        checks,
        config: config.clone(),
        judge: judged,
    })
}
