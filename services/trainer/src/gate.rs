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
}

impl GateConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        for (name, value) in [
            ("accuracy tolerance", self.accuracy_tolerance),
            ("aesthetic tolerance", self.aesthetic_tolerance),
            ("recall tolerance", self.recall_tolerance),
            ("z", self.z),
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
    /// The LMM judge's win rate is not part of this gate yet.
    pub judge: String,
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
/// will serve it) against `parent`, whose catalog embeddings `data` holds.
pub fn evaluate(
    parent: &Encoder,
    candidate: &Encoder,
    data: &Embedded,
    items: &[HpirLine],
    config: &GateConfig,
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
    let checks = vec![
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
    Ok(GateReport {
        passed: checks.iter().all(|c| c.passed),
        hpir_items: items.len(),
        held_out_captions: data.len() - data.train,
        checks,
        config: config.clone(),
        judge: "not evaluated: the LMM judge's win rate is not part of the gate yet".into(),
    })
}
