//! Offline evaluation: HPIR agreement per aspect (with the paired change
//! between two models), held-out recall@10, and the teacher's own agreement.

use kalon_encoder::Embeddings;
use serde::Serialize;

use crate::algorithm::{hpir_agreement, paired_change, Judged};
use crate::rephrase::{PromptVariant, Rephraser};
use crate::scorer::{AestheticScorer, Candidate};

use crate::dataset::{Embedded, HpirLine};
use crate::dpo::dot;

/// Agreement per aspect of a scoring `(query text embedding row, image row)`.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Agreement {
    pub hpir_accuracy: f64,
    pub hpir_aesthetic: f64,
}

/// Each HPIR item's judgment per aspect under one model: its two row
/// scores beside the people's choice, in item order.
#[derive(Debug, Clone)]
pub struct Judgments {
    pub accuracy: Vec<Judged>,
    pub aesthetic: Vec<Judged>,
}

/// A change of agreement between two models on the same items, with its
/// paired standard error ([`paired_change`]), as fractions.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Change {
    pub change: f64,
    pub standard_error: f64,
}

/// The change per aspect from one model to another.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct AgreementChange {
    pub hpir_accuracy: Change,
    pub hpir_aesthetic: Change,
}

impl Judgments {
    pub fn agreement(&self) -> Agreement {
        Agreement {
            hpir_accuracy: hpir_agreement(&self.accuracy),
            hpir_aesthetic: hpir_agreement(&self.aesthetic),
        }
    }

    /// How agreement changed from `before` (judged on the same items).
    pub fn change_from(&self, before: &Judgments) -> AgreementChange {
        let change = |b: &[Judged], a: &[Judged]| {
            let (change, standard_error) = paired_change(b, a);
            Change {
                change,
                standard_error,
            }
        };
        AgreementChange {
            hpir_accuracy: change(&before.accuracy, &self.accuracy),
            hpir_aesthetic: change(&before.aesthetic, &self.aesthetic),
        }
    }
}

/// Each item's judgments when `row_score(item, row)` scores a row of item
/// number `item` (the model prefers the row with the higher score).
pub fn judgments_by(
    items: &[HpirLine],
    mut row_scores: impl FnMut(usize, &HpirLine) -> anyhow::Result<(f64, f64)>,
) -> anyhow::Result<Judgments> {
    let mut judgments = Judgments {
        accuracy: Vec::with_capacity(items.len()),
        aesthetic: Vec::with_capacity(items.len()),
    };
    for (i, item) in items.iter().enumerate() {
        let (a, b) = row_scores(i, item)?;
        for (label, out) in [
            (&item.accuracy, &mut judgments.accuracy),
            (&item.aesthetic, &mut judgments.aesthetic),
        ] {
            out.push(Judged {
                mean_a: a,
                mean_b: b,
                people_chose_a: label.choice == kalon_dataset::Choice::A,
                confidence: label.confidence,
            });
        }
    }
    Ok(judgments)
}

/// HPIR agreement per aspect of a row scoring ([`judgments_by`]).
pub fn agreement_by(
    items: &[HpirLine],
    row_scores: impl FnMut(usize, &HpirLine) -> anyhow::Result<(f64, f64)>,
) -> anyhow::Result<Agreement> {
    Ok(judgments_by(items, row_scores)?.agreement())
}

fn catalog_row(data: &Embedded, id: &str) -> anyhow::Result<usize> {
    data.index
        .get(id)
        .copied()
        .ok_or_else(|| anyhow::anyhow!("HPIR image {id} is not in the catalog"))
}

/// HPIR judgments of a model: `query_embeds[i]` embeds `items[i].query`
/// (possibly rephrased); `images` are its catalog embeddings; a row scores
/// its mean similarity.
pub fn judgments(
    items: &[HpirLine],
    query_embeds: &Embeddings,
    data: &Embedded,
    images: &Embeddings,
) -> anyhow::Result<Judgments> {
    judgments_by(items, |i, item| {
        let mean = |row: &[String]| -> anyhow::Result<f64> {
            let mut sum = 0.0;
            for id in row {
                sum += f64::from(dot(query_embeds.row(i), images.row(catalog_row(data, id)?)));
            }
            Ok(sum / row.len() as f64)
        };
        Ok((mean(&item.row_a)?, mean(&item.row_b)?))
    })
}

/// Recall@10 of held-out captions against held-out images.
pub fn held_out_recall_at_10(data: &Embedded, images: &Embeddings) -> f64 {
    let dim = images.dim;
    let rows = |e: &Embeddings| Embeddings {
        dim,
        data: e.data[data.train * dim..].to_vec(),
    };
    kalon_model::eval::recall_at(&rows(&data.caption_embeds), &rows(images), &[10])[0]
}

/// HPIR agreement of an aesthetic scorer alone (rows by mean score): how
/// good the teacher of D_po's re-ranking is, on the same held-out items.
pub fn scorer_agreement(
    items: &[HpirLine],
    data: &Embedded,
    scorer: &dyn AestheticScorer,
) -> anyhow::Result<Agreement> {
    // both rows in one call: a ranking judge's scores compare within a call
    agreement_by(items, |_, item| {
        let ids: Vec<&String> = item.row_a.iter().chain(&item.row_b).collect();
        let images = ids
            .iter()
            .map(|id| Ok(data.image(catalog_row(data, id)?)))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let candidates: Vec<Candidate> = ids
            .iter()
            .zip(&images)
            .map(|(id, image)| Candidate { id, image })
            .collect();
        let scores = scorer.score(&item.query, &candidates)?;
        let n = item.row_a.len();
        let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len().max(1) as f64;
        Ok((mean(&scores[..n]), mean(&scores[n..])))
    })
}

/// The catalog's embeddings by `encoder` (through ONNX Runtime).
pub fn embed_catalog(
    encoder: &kalon_encoder::Encoder,
    data: &Embedded,
) -> anyhow::Result<Embeddings> {
    let mut pixels = Vec::new();
    for i in 0..data.len() {
        kalon_encoder::preprocess::push_image(&data.image(i), &encoder.manifest.image, &mut pixels);
    }
    Ok(encoder.image.embed_pixels(&pixels)?)
}

/// HPIR judgments of `encoder` with its catalog embeddings `images`, the
/// items' queries rephrased by `rephraser` with `variant`.
pub fn judge_encoder(
    encoder: &kalon_encoder::Encoder,
    images: &Embeddings,
    data: &Embedded,
    items: &[HpirLine],
    rephraser: &dyn Rephraser,
    variant: PromptVariant,
) -> anyhow::Result<Judgments> {
    let texts = items
        .iter()
        .map(|i| rephraser.rephrase(&i.query, variant))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let queries = encoder.text.embed_texts(&texts)?;
    judgments(items, &queries, data, images)
}

/// One model's held-out figures.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ModelFigures {
    pub hpir_accuracy: f64,
    pub hpir_aesthetic: f64,
    pub recall_at_10: f64,
}

/// An aligned model against its parent on the same held-out data: each
/// model's figures, the paired change, the teacher alone, and the parent
/// with each rephrasing variant (the paper's ablation).
#[derive(Debug, Clone, Serialize)]
pub struct AlignmentReport {
    pub pretrained: ModelFigures,
    pub aligned: ModelFigures,
    pub change: AgreementChange,
    /// The aesthetic teacher alone, rows by mean score.
    pub scorer: Agreement,
    pub rephrasing_ablation: std::collections::BTreeMap<&'static str, Agreement>,
}

/// Evaluates `aligned` against `pretrained` on the held-out `items` and
/// captions of `data`; `rephraser` rephrases for the ablation.
pub fn alignment_report(
    pretrained: &kalon_encoder::Encoder,
    aligned: &kalon_encoder::Encoder,
    data: &Embedded,
    items: &[HpirLine],
    teacher: &dyn AestheticScorer,
    rephraser: &dyn Rephraser,
) -> anyhow::Result<AlignmentReport> {
    let pretrained_images = embed_catalog(pretrained, data)?;
    let aligned_images = embed_catalog(aligned, data)?;
    let mut figures = Vec::new();
    let mut judged = Vec::new();
    for (encoder, images) in [(pretrained, &pretrained_images), (aligned, &aligned_images)] {
        let judgments = judge_encoder(
            encoder,
            images,
            data,
            items,
            rephraser,
            PromptVariant::Original,
        )?;
        let agreement = judgments.agreement();
        figures.push(ModelFigures {
            hpir_accuracy: agreement.hpir_accuracy,
            hpir_aesthetic: agreement.hpir_aesthetic,
            recall_at_10: held_out_recall_at_10(data, images),
        });
        judged.push(judgments);
    }
    let mut rephrasing_ablation = std::collections::BTreeMap::new();
    for variant in PromptVariant::ALL {
        let agreement = judge_encoder(
            pretrained,
            &pretrained_images,
            data,
            items,
            rephraser,
            variant,
        )?
        .agreement();
        rephrasing_ablation.insert(variant.name(), agreement);
    }
    Ok(AlignmentReport {
        pretrained: figures[0],
        aligned: figures[1],
        change: judged[1].change_from(&judged[0]),
        scorer: scorer_agreement(items, data, teacher)?,
        rephrasing_ablation,
    })
}
