//! Captions (pretraining text) and query sets.

use rand::seq::SliceRandom;
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::catalog::{Catalog, Colour, ImageMeta, Scene, Style, Subject};

fn preposition(scene: Scene) -> &'static str {
    match scene {
        Scene::Beach | Scene::Snow => "on the",
        Scene::Studio => "in a",
        _ => "in the",
    }
}

/// A web-like caption for `meta`: it describes content, sometimes drops the
/// colour or the scene, and mentions aesthetics only noisily (a style word
/// that is right 60% of the time, praise only weakly tied to quality).
pub fn caption(meta: &ImageMeta, rng: &mut impl Rng) -> String {
    let mut words = vec!["a photo of a".to_owned()];
    if rng.random_bool(0.85) {
        words.push(meta.colour.word().to_owned());
    }
    words.push(meta.subject.word().to_owned());
    if rng.random_bool(0.8) {
        words.push(format!("{} {}", preposition(meta.scene), meta.scene.word()));
    }
    if rng.random_bool(0.3) {
        let style = if rng.random_bool(0.6) {
            meta.style
        } else {
            Style::ALL[rng.random_range(0..Style::ALL.len())]
        };
        if style != Style::Plain {
            words.push(format!("{} style", style.word()));
        }
    }
    if rng.random_bool(0.1 + 0.2 * meta.low_level_quality()) {
        words.insert(
            0,
            ["beautiful", "stunning", "amazing"][rng.random_range(0..3)].to_owned(),
        );
    }
    words.join(" ")
}

/// Captions of every image, in catalog order.
pub fn captions(catalog: &Catalog) -> Vec<String> {
    let mut rng = crate::stream(catalog.seed, "captions");
    catalog
        .images
        .iter()
        .map(|m| caption(m, &mut rng))
        .collect()
}

/// Which set a query belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Eval,
}

/// A search query and the intent behind it (hidden from Kalon's models).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Query {
    pub text: String,
    pub subject: Subject,
    pub colour: Option<Colour>,
    pub scene: Option<Scene>,
    /// An implicit aesthetic intent: the style the person hopes to see.
    pub style_intent: Option<Style>,
    pub split: Split,
}

impl Query {
    /// Semantic relevance of an image in [0, 1]: the subject must match;
    /// each named colour or scene that matches adds to it.
    pub fn relevance(&self, meta: &ImageMeta) -> f64 {
        if meta.subject != self.subject {
            return 0.0;
        }
        let mut named = 1.0;
        let mut matched = 1.0;
        if let Some(colour) = self.colour {
            named += 1.0;
            matched += f64::from(meta.colour == colour);
        }
        if let Some(scene) = self.scene {
            named += 1.0;
            matched += f64::from(meta.scene == scene);
        }
        matched / named
    }
}

/// The world's queries: training and held-out evaluation, disjoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuerySet {
    pub queries: Vec<Query>,
}

impl QuerySet {
    /// At least `eval_count` evaluation queries, the rest for training.
    pub fn generate(seed: u64, eval_count: usize) -> QuerySet {
        let mut all = Vec::new();
        for &subject in Subject::ALL {
            for colour in std::iter::once(None).chain(Colour::ALL.iter().copied().map(Some)) {
                for scene in std::iter::once(None).chain(Scene::ALL.iter().copied().map(Some)) {
                    for style in [
                        None,
                        Some(Style::Minimal),
                        Some(Style::Vintage),
                        Some(Style::Neon),
                        Some(Style::Pastel),
                        Some(Style::Moody),
                    ] {
                        let mut text = String::new();
                        if let Some(style) = style {
                            text.push_str(style.word());
                            text.push(' ');
                        }
                        if let Some(colour) = colour {
                            text.push_str(colour.word());
                            text.push(' ');
                        }
                        text.push_str(subject.word());
                        if let Some(scene) = scene {
                            text.push(' ');
                            text.push_str(preposition(scene));
                            text.push(' ');
                            text.push_str(scene.word());
                        }
                        all.push(Query {
                            text,
                            subject,
                            colour,
                            scene,
                            style_intent: style,
                            split: Split::Train,
                        });
                    }
                }
            }
        }
        let mut rng = crate::stream(seed, "queries");
        all.shuffle(&mut rng);
        for query in all.iter_mut().take(eval_count) {
            query.split = Split::Eval;
        }
        QuerySet { queries: all }
    }

    pub fn split(&self, split: Split) -> impl Iterator<Item = &Query> {
        self.queries.iter().filter(move |q| q.split == split)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eval_and_train_queries_are_disjoint_and_deterministic() {
        let set = QuerySet::generate(2, 160);
        assert_eq!(set, QuerySet::generate(2, 160));
        let eval: std::collections::HashSet<&str> =
            set.split(Split::Eval).map(|q| q.text.as_str()).collect();
        let train: std::collections::HashSet<&str> =
            set.split(Split::Train).map(|q| q.text.as_str()).collect();
        assert_eq!(eval.len(), 160);
        assert!(train.len() > 1_000);
        assert!(eval.is_disjoint(&train));
        assert!(
            set.split(Split::Eval)
                .filter(|q| q.style_intent.is_some())
                .count()
                > 50,
            "some queries carry a style intent"
        );
    }

    #[test]
    fn captions_name_the_subject_and_only_sometimes_the_style() {
        let catalog = Catalog::generate(4, 1_000);
        let captions = captions(&catalog);
        assert_eq!(captions, super::captions(&catalog));
        for (meta, caption) in catalog.images.iter().zip(&captions) {
            assert!(caption.contains(meta.subject.word()), "{caption}");
        }
        let styled = captions.iter().filter(|c| c.contains(" style")).count();
        assert!(
            (100..450).contains(&styled),
            "{styled} of 1000 captions mention a style"
        );
    }
}
