//! Preference pairs from feedback, as the brief defines them: clicks
//! (skip-above and skip-next, weighted by inverse position propensity),
//! explicit ratings (higher over lower for the same query) and LMM
//! judgments (the winning row's images over the losing row's). Pure
//! functions over the facts; reading them from Postgres is the preference
//! builder's job.

use std::collections::{BTreeMap, BTreeSet};

use crate::pairs::{PairSource, PreferencePair};

/// One result list someone saw, and what they clicked.
#[derive(Debug, Clone)]
pub struct ClickedList<'a> {
    pub request_id: &'a str,
    pub query: &'a str,
    /// Image ids in rank order (rank 1 first).
    pub results: &'a [String],
    /// 1-based ranks clicked.
    pub clicked: &'a [u32],
}

/// How examination falls with rank: `P(examine rank r) = r^-eta`; the
/// weight of a pair is the inverse propensity of its clicked result, capped.
#[derive(Debug, Clone, Copy)]
pub struct Propensity {
    pub eta: f64,
    pub max_weight: f64,
}

impl Default for Propensity {
    fn default() -> Self {
        Propensity {
            eta: 0.8,
            max_weight: 10.0,
        }
    }
}

impl Propensity {
    /// The inverse propensity `r^eta` of a click at `rank`, capped at
    /// `max_weight`.
    pub fn weight(&self, rank: u32) -> f64 {
        f64::from(rank).powf(self.eta).min(self.max_weight)
    }
}

/// How much a click at a rank counts: the inverse of the probability that
/// the rank was examined, capped. [`Propensity`] is the fixed prior; the
/// preference builder passes the curve it estimated from the traffic.
pub trait ClickWeight {
    fn weight(&self, rank: u32) -> f64;
}

impl ClickWeight for Propensity {
    fn weight(&self, rank: u32) -> f64 {
        Propensity::weight(self, rank)
    }
}

/// Skip-above: a clicked result beats every unclicked one ranked above it.
/// Skip-next: a clicked result beats the unclicked one right below it.
/// Each pair's provenance is `{request_id, rule, winner_rank, loser_rank}`:
/// what identifies it, so rebuilding a list gives the same pairs.
pub fn click_pairs(list: &ClickedList<'_>, propensity: &dyn ClickWeight) -> Vec<PreferencePair> {
    let clicked: BTreeSet<u32> = list.clicked.iter().copied().collect();
    let mut pairs = Vec::new();
    let mut push = |winner: u32, loser: u32, rule: &str| {
        let (w, l) = (
            &list.results[winner as usize - 1],
            &list.results[loser as usize - 1],
        );
        if w != l {
            pairs.push(PreferencePair {
                query: list.query.to_owned(),
                winner: w.clone(),
                loser: l.clone(),
                source: PairSource::Click,
                weight: propensity.weight(winner),
                provenance: serde_json::json!({
                    "request_id": list.request_id, "rule": rule,
                    "winner_rank": winner, "loser_rank": loser,
                }),
            });
        }
    };
    for &rank in clicked
        .iter()
        .filter(|r| (1..=list.results.len() as u32).contains(r))
    {
        for above in (1..rank).filter(|r| !clicked.contains(r)) {
            push(rank, above, "skip_above");
        }
        let next = rank + 1;
        if next as usize <= list.results.len() && !clicked.contains(&next) {
            push(rank, next, "skip_next");
        }
    }
    pairs
}

/// One star rating of an image for a query.
#[derive(Debug, Clone)]
pub struct StarRating<'a> {
    pub event_id: &'a str,
    pub query: &'a str,
    pub image_id: &'a str,
    pub stars: u8,
}

/// Which rating pairs are kept: mean star gaps below `min_gap` are noise;
/// per query at most `per_query` pairs, the widest gaps first (every rated
/// image of a popular query could otherwise pair with every other).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RatingRules {
    pub min_gap: f64,
    pub per_query: usize,
}

impl Default for RatingRules {
    fn default() -> Self {
        RatingRules {
            min_gap: 1.0,
            per_query: 1000,
        }
    }
}

impl RatingRules {
    /// Every pair with a positive gap (the rule as the brief states it).
    pub fn all() -> Self {
        RatingRules {
            min_gap: 0.0,
            per_query: usize::MAX,
        }
    }
}

/// Event ids kept in a rating pair's provenance, per side (with the counts).
const EVENTS_KEPT: usize = 5;

/// Higher over lower for the same query; weight = mean star gap / 4. An
/// image rated several times for a query counts with its mean. Pairs come
/// widest gap first; equal gaps in (winner, loser) id order; the work is
/// bounded by the pairs kept, not by the square of the images rated.
pub fn rating_pairs(ratings: &[StarRating<'_>], rules: RatingRules) -> Vec<PreferencePair> {
    // per query, per image: sum of stars, count, event ids
    type Tally<'r> = BTreeMap<&'r str, (f64, usize, Vec<&'r str>)>;
    let mut by_query: BTreeMap<&str, Tally> = BTreeMap::new();
    for r in ratings {
        let entry = by_query
            .entry(r.query)
            .or_default()
            .entry(r.image_id)
            .or_insert((0.0, 0, Vec::new()));
        entry.0 += f64::from(r.stars);
        entry.1 += 1;
        entry.2.push(r.event_id);
    }
    let mut pairs = Vec::new();
    for (query, images) in by_query {
        // images by mean (means are exact: sums of small integers over counts)
        // (members in id order: `images` is ordered by id)
        type Member<'r> = (&'r str, usize, &'r Vec<&'r str>);
        let mut buckets: BTreeMap<u64, Vec<Member>> = BTreeMap::new();
        for (id, (sum, n, events)) in &images {
            let mean = sum / *n as f64;
            buckets
                .entry(mean.to_bits())
                .or_default()
                .push((*id, *n, events));
        }
        // positive means: their bits order as the numbers do
        let means: Vec<(f64, &Vec<Member>)> = buckets
            .iter()
            .map(|(bits, members)| (f64::from_bits(*bits), members))
            .collect();
        // bucket pairs by gap, widest first
        let mut gaps: Vec<(f64, usize, usize)> = Vec::new();
        for (w, (high, _)) in means.iter().enumerate() {
            for (l, (low, _)) in means.iter().enumerate() {
                let gap = high - low;
                if gap > 0.0 && gap >= rules.min_gap - 1e-9 {
                    gaps.push((gap, w, l));
                }
            }
        }
        gaps.sort_by(|a, b| {
            b.0.total_cmp(&a.0)
                .then_with(|| (a.1, a.2).cmp(&(b.1, b.2)))
        });
        let mut kept = 0usize;
        'gaps: for (gap, w, l) in gaps {
            for (winner, wn, wevents) in means[w].1 {
                for (loser, ln, levents) in means[l].1 {
                    if kept >= rules.per_query {
                        break 'gaps;
                    }
                    kept += 1;
                    pairs.push(PreferencePair {
                        query: query.to_owned(),
                        winner: (*winner).to_owned(),
                        loser: (*loser).to_owned(),
                        source: PairSource::Rating,
                        weight: gap / 4.0,
                        provenance: serde_json::json!({
                            "winner_ratings": wn,
                            "loser_ratings": ln,
                            "winner_events": wevents.iter().take(EVENTS_KEPT).collect::<Vec<_>>(),
                            "loser_events": levents.iter().take(EVENTS_KEPT).collect::<Vec<_>>(),
                        }),
                    });
                }
            }
        }
    }
    pairs
}

/// An order-consistent LMM verdict on two rows (aesthetic aspect).
#[derive(Debug, Clone)]
pub struct RowVerdict<'a> {
    pub judgment_id: &'a str,
    pub query: &'a str,
    pub row_a: &'a [String],
    pub row_b: &'a [String],
    pub verdict: kalon_llm::Verdict,
}

/// Win: every image of row A over every image of row B that is not also in
/// row A (loss: the other way; similar: nothing). One judgment weighs 1 in
/// total, shared over its pairs.
pub fn judgment_pairs(verdict: &RowVerdict<'_>) -> Vec<PreferencePair> {
    let (winners, losers) = match verdict.verdict {
        kalon_llm::Verdict::Win => (verdict.row_a, verdict.row_b),
        kalon_llm::Verdict::Loss => (verdict.row_b, verdict.row_a),
        kalon_llm::Verdict::Similar => return Vec::new(),
    };
    let cells: Vec<(&String, &String)> = winners
        .iter()
        .flat_map(|w| losers.iter().map(move |l| (w, l)))
        .filter(|(w, l)| !losers.contains(w) && !winners.contains(l))
        .collect();
    let weight = 1.0 / cells.len().max(1) as f64;
    cells
        .into_iter()
        .map(|(w, l)| PreferencePair {
            query: verdict.query.to_owned(),
            winner: w.clone(),
            loser: l.clone(),
            source: PairSource::Judgment,
            weight,
            provenance: serde_json::json!({"judgment_id": verdict.judgment_id}),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<String> {
        (1..=n).map(|i| format!("img-{i}")).collect()
    }

    fn names(pairs: &[PreferencePair]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|p| (p.winner.clone(), p.loser.clone()))
            .collect()
    }

    #[test]
    fn clicks_give_skip_above_and_skip_next_pairs_weighted_by_propensity() {
        let results = ids(5);
        let list = ClickedList {
            request_id: "r1",
            query: "red cat",
            results: &results,
            clicked: &[3, 4],
        };
        let pairs = click_pairs(&list, &Propensity::default());
        let got = names(&pairs);
        let want: Vec<(String, String)> = [(3, 1), (3, 2), (4, 1), (4, 2), (4, 5)]
            .iter()
            .map(|(w, l)| (format!("img-{w}"), format!("img-{l}")))
            .collect();
        assert_eq!(
            got, want,
            "3 skips 1 and 2; 4 skips 1, 2 and its next, 5 (3's next, 4, was clicked)"
        );
        assert!((pairs[0].weight - 3f64.powf(0.8)).abs() < 1e-12);
        assert!(pairs
            .iter()
            .all(|p| p.validate().is_ok() && p.source == PairSource::Click));
        // a click at rank 1 with nothing clicked below: only skip-next
        let top = ClickedList {
            clicked: &[1],
            ..list.clone()
        };
        assert_eq!(
            names(&click_pairs(&top, &Propensity::default())),
            [("img-1".to_owned(), "img-2".to_owned())]
        );
        // the cap holds deep in the list, and a rank past the list is ignored
        let long = ids(30);
        let deep = ClickedList {
            results: &long,
            clicked: &[30, 31],
            ..list
        };
        let deep_pairs = click_pairs(&deep, &Propensity::default());
        assert_eq!(deep_pairs.len(), 29);
        assert!(deep_pairs.iter().all(|p| p.weight == 10.0));
    }

    #[test]
    fn ratings_prefer_higher_stars_for_the_same_query_only() {
        let ratings = [
            StarRating {
                event_id: "e1",
                query: "q",
                image_id: "a",
                stars: 5,
            },
            StarRating {
                event_id: "e2",
                query: "q",
                image_id: "b",
                stars: 2,
            },
            StarRating {
                event_id: "e3",
                query: "q",
                image_id: "b",
                stars: 4,
            },
            StarRating {
                event_id: "e4",
                query: "q",
                image_id: "c",
                stars: 3,
            },
            StarRating {
                event_id: "e5",
                query: "other",
                image_id: "d",
                stars: 1,
            },
        ];
        let pairs = rating_pairs(&ratings, RatingRules::all());
        // b's mean is 3, tied with c: no pair between them
        assert_eq!(
            names(&pairs),
            [
                ("a".to_owned(), "b".to_owned()),
                ("a".to_owned(), "c".to_owned())
            ]
        );
        assert_eq!(pairs[0].weight, 0.5);
        assert_eq!(
            pairs[0].provenance["loser_events"],
            serde_json::json!(["e2", "e3"])
        );
    }

    #[test]
    fn judgments_give_the_winning_rows_images_over_the_losing_rows() {
        let (a, b) = (ids(2), vec!["img-2".to_owned(), "img-9".to_owned()]);
        let mut verdict = RowVerdict {
            judgment_id: "j1",
            query: "q",
            row_a: &a,
            row_b: &b,
            verdict: kalon_llm::Verdict::Win,
        };
        let pairs = judgment_pairs(&verdict);
        // img-2 is in both rows: it is neither a winner over B nor a loser
        assert_eq!(names(&pairs), [("img-1".to_owned(), "img-9".to_owned())]);
        assert_eq!(pairs[0].weight, 1.0);
        verdict.verdict = kalon_llm::Verdict::Loss;
        assert_eq!(
            names(&judgment_pairs(&verdict)),
            [("img-9".to_owned(), "img-1".to_owned())]
        );
        verdict.verdict = kalon_llm::Verdict::Similar;
        assert!(judgment_pairs(&verdict).is_empty());
    }
}
