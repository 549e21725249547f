//! The LMM judge: which of two result rows is better on an aspect, asked in
//! both orders (order consistency), and per-row 1-5 scores averaged over
//! both orders. A library call: the enricher stores and publishes
//! judgments; the canary analysis reuses the same calls.

use serde::{Deserialize, Serialize};

use crate::ask::{ask, Answer, AskError};
use crate::client::{Completion, LlmClient};
use crate::prompts::{
    compare_messages, parse_choice, parse_ranking, parse_scores, rank_messages, score_messages,
    Aspect, ImageRef,
};

/// Which row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Row {
    A,
    B,
}

/// Row A against row B, from the two orders: both A -> win, both B ->
/// loss, else similar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Win,
    Loss,
    Similar,
}

impl Verdict {
    pub fn from_picks(a_first: Row, b_first: Row) -> Verdict {
        match (a_first, b_first) {
            (Row::A, Row::A) => Verdict::Win,
            (Row::B, Row::B) => Verdict::Loss,
            _ => Verdict::Similar,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Verdict::Win => "win",
            Verdict::Loss => "loss",
            Verdict::Similar => "similar",
        }
    }
}

/// One order-consistent comparison.
#[derive(Debug, Clone)]
pub struct Comparison {
    pub aspect: Aspect,
    pub verdict: Verdict,
    /// The pick with row A shown first, and with row B shown first.
    pub a_first: Row,
    pub b_first: Row,
    /// Every call made, refused answers included, A-first ones first.
    pub calls: Vec<Completion>,
}

/// Per-row scores, each the mean over both orders.
#[derive(Debug, Clone)]
pub struct RowScores {
    pub aspect: Aspect,
    pub a: f64,
    pub b: f64,
    pub calls: Vec<Completion>,
}

fn calls<T>(answer: &Answer<T>) -> impl Iterator<Item = Completion> + '_ {
    answer
        .refused
        .iter()
        .map(|(c, _)| c.clone())
        .chain(std::iter::once(answer.completion.clone()))
}

#[derive(Clone)]
pub struct Judge {
    client: LlmClient,
}

impl Judge {
    pub fn new(client: LlmClient) -> Self {
        Judge { client }
    }

    pub fn client(&self) -> &LlmClient {
        &self.client
    }

    /// One call: which row is better with `first` shown first.
    pub async fn pick(
        &self,
        query: &str,
        aspect: Aspect,
        first: &[ImageRef],
        second: &[ImageRef],
    ) -> Result<Answer<u8>, AskError> {
        ask(
            &self.client,
            "compare",
            |strict| compare_messages(query, aspect, first, second, strict),
            parse_choice,
        )
        .await
    }

    /// Both orders, concurrently.
    pub async fn compare(
        &self,
        query: &str,
        aspect: Aspect,
        row_a: &[ImageRef],
        row_b: &[ImageRef],
    ) -> Result<Comparison, AskError> {
        let (ab, ba) = futures::join!(
            self.pick(query, aspect, row_a, row_b),
            self.pick(query, aspect, row_b, row_a)
        );
        let (ab, ba) = (ab?, ba?);
        let a_first = if ab.value == 1 { Row::A } else { Row::B };
        let b_first = if ba.value == 1 { Row::B } else { Row::A };
        Ok(Comparison {
            aspect,
            verdict: Verdict::from_picks(a_first, b_first),
            a_first,
            b_first,
            calls: calls(&ab).chain(calls(&ba)).collect(),
        })
    }

    /// 1-5 scores for both rows, each averaged over both orders.
    pub async fn score(
        &self,
        query: &str,
        aspect: Aspect,
        row_a: &[ImageRef],
        row_b: &[ImageRef],
    ) -> Result<RowScores, AskError> {
        let ask_scores = |first: &'_ [ImageRef], second: &'_ [ImageRef]| {
            let first = first.to_vec();
            let second = second.to_vec();
            async move {
                ask(
                    &self.client,
                    "score",
                    |strict| score_messages(query, aspect, &first, &second, strict),
                    parse_scores,
                )
                .await
            }
        };
        let (ab, ba) = futures::join!(ask_scores(row_a, row_b), ask_scores(row_b, row_a));
        let (ab, ba) = (ab?, ba?);
        Ok(RowScores {
            aspect,
            a: (ab.value.0 + ba.value.1) / 2.0,
            b: (ab.value.1 + ba.value.0) / 2.0,
            calls: calls(&ab).chain(calls(&ba)).collect(),
        })
    }
}

impl Judge {
    /// Ranks `images` on `aspect`, asked in the given order and reversed
    /// (order consistency for lists): each image's score is minus its mean
    /// position, so higher is better and a position bias cancels.
    pub async fn rank(
        &self,
        query: &str,
        aspect: Aspect,
        images: &[ImageRef],
    ) -> Result<(Vec<f64>, Vec<Completion>), AskError> {
        let n = images.len();
        let reversed: Vec<ImageRef> = images.iter().rev().cloned().collect();
        let ask_order = |shown: &'_ [ImageRef]| {
            let shown = shown.to_vec();
            async move {
                ask(
                    &self.client,
                    "rank",
                    |strict| rank_messages(query, aspect, &shown, strict),
                    |content| parse_ranking(content, n),
                )
                .await
            }
        };
        let (forward, backward) = futures::join!(ask_order(images), ask_order(&reversed));
        let (forward, backward) = (forward?, backward?);
        let mut scores = vec![0.0; n];
        for (position, &i) in forward.value.iter().enumerate() {
            scores[i] -= position as f64 / 2.0;
        }
        for (position, &i) in backward.value.iter().enumerate() {
            scores[n - 1 - i] -= position as f64 / 2.0;
        }
        Ok((scores, calls(&forward).chain(calls(&backward)).collect()))
    }
}

/// Counts of verdicts over N comparisons, and the brief's three rates.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Tally {
    pub win: u64,
    pub similar: u64,
    pub loss: u64,
}

impl Tally {
    pub fn add(&mut self, verdict: Verdict) {
        match verdict {
            Verdict::Win => self.win += 1,
            Verdict::Similar => self.similar += 1,
            Verdict::Loss => self.loss += 1,
        }
    }

    pub fn total(&self) -> u64 {
        self.win + self.similar + self.loss
    }

    fn rate(&self, x: f64) -> f64 {
        if self.total() == 0 {
            0.0
        } else {
            x / self.total() as f64
        }
    }

    /// W / N
    pub fn win_rate(&self) -> f64 {
        self.rate(self.win as f64)
    }

    /// (W + S) / N
    pub fn win_or_similar_rate(&self) -> f64 {
        self.rate((self.win + self.similar) as f64)
    }

    /// (W + S/2) / N
    pub fn half_similar_rate(&self) -> f64 {
        self.rate(self.win as f64 + self.similar as f64 / 2.0)
    }
}

impl FromIterator<Verdict> for Tally {
    fn from_iter<I: IntoIterator<Item = Verdict>>(iter: I) -> Self {
        let mut tally = Tally::default();
        for verdict in iter {
            tally.add(verdict);
        }
        tally
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_consistency_counts_constructed_cases() {
        use Row::{A, B};
        // picks with A shown first, with B shown first
        let cases = [
            (A, A),
            (A, A),
            (A, A),
            (B, B),
            (A, B),
            (B, A),
            (A, B),
            (A, A),
        ];
        let tally: Tally = cases
            .iter()
            .map(|&(x, y)| Verdict::from_picks(x, y))
            .collect();
        assert_eq!(
            tally,
            Tally {
                win: 4,
                similar: 3,
                loss: 1
            }
        );
        assert_eq!(tally.win_rate(), 4.0 / 8.0);
        assert_eq!(tally.win_or_similar_rate(), 7.0 / 8.0);
        assert_eq!(tally.half_similar_rate(), 5.5 / 8.0);
        assert_eq!(Tally::default().win_rate(), 0.0);
    }
}
