//! Team-draft interleaving: one result page built from two rankings, whose
//! clicks say which ranking the person preferred.
//!
//! Radlinski, Kurup, Joachims, "How does clickthrough data reflect retrieval
//! quality?", CIKM 2008, algorithm "Team-Draft Interleaving". Like captains
//! picking teams: in each round a fair coin decides which ranking picks
//! first, then each picks its highest-ranked result not yet on the page, and
//! the result remembers the team that picked it. A result both rankings put
//! at the same rank (a tie) goes to whichever team picks it first, that is
//! to the round's coin: over many queries neither ranking is favoured by
//! shared results, and the other team picks its next result instead. A
//! click credits the team of the clicked result; the query prefers the team
//! with more credited clicks (Chapelle, Joachims, Radlinski, Yue, "Large
//! scale validation and analysis of interleaved search evaluation", TOIS
//! 2012). Because the teams alternate fairly and the coin hides which team
//! sits higher, a person who clicks at random credits both equally: the
//! per-query preference has mean 0 unless one ranking is better.
//!
//! Kalon's convention: team A is the stable version's ranking and team B the
//! candidate's, so a preference of 1 means the candidate won.
//!
//! When one ranking runs out of results it has not yet placed, the page is
//! filled from the other, credited to it (the original stops there; a search
//! page should not be short because one version returned fewer results, and
//! fewer results is a fair reason to lose). The fairness of team sizes holds
//! in every prefix before that point.

use std::collections::HashSet;
use std::hash::Hash;

use rand::Rng;
use serde::{Deserialize, Serialize};

/// The ranking a shown result was drafted from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Team {
    /// The first ranking (Kalon: the stable version).
    #[serde(rename = "stable")]
    A,
    /// The second ranking (Kalon: the candidate).
    #[serde(rename = "candidate")]
    B,
}

/// Next result of `list` from `*next` on that is not yet on the page;
/// `*next` moves past every result it skips (they stay taken).
fn untaken<'a, Id: Eq + Hash>(
    list: &'a [Id],
    next: &mut usize,
    taken: &HashSet<&Id>,
) -> Option<&'a Id> {
    while let Some(id) = list.get(*next) {
        if !taken.contains(id) {
            return Some(id);
        }
        *next += 1;
    }
    None
}

/// Interleaves rankings `a` and `b` (best first) into at most `k` results,
/// each with the team that drafted it. No result appears twice (nor does a
/// result listed twice in one ranking); the page is shorter than `k` only
/// when both rankings together have fewer distinct results.
pub fn team_draft<Id, R>(a: &[Id], b: &[Id], k: usize, rng: &mut R) -> Vec<(Id, Team)>
where
    Id: Clone + Eq + Hash,
    R: Rng + ?Sized,
{
    let mut page = Vec::with_capacity(k.min(a.len() + b.len()));
    let mut taken: HashSet<&Id> = HashSet::with_capacity(page.capacity());
    let (mut next_a, mut next_b) = (0, 0);
    let (mut team_a, mut team_b) = (0usize, 0usize);
    while page.len() < k {
        let has_a = untaken(a, &mut next_a, &taken).is_some();
        let has_b = untaken(b, &mut next_b, &taken).is_some();
        // the team with fewer picks goes; equal picks start a round, and a
        // coin decides who picks first in it
        let team = match (has_a, has_b) {
            (false, false) => break,
            (true, false) => Team::A,
            (false, true) => Team::B,
            (true, true) if team_a != team_b => {
                if team_a < team_b {
                    Team::A
                } else {
                    Team::B
                }
            }
            (true, true) => {
                if rng.random_bool(0.5) {
                    Team::A
                } else {
                    Team::B
                }
            }
        };
        let (list, next, count) = match team {
            Team::A => (a, &mut next_a, &mut team_a),
            Team::B => (b, &mut next_b, &mut team_b),
        };
        let id = untaken(list, next, &taken).expect("checked above");
        taken.insert(id);
        *next += 1;
        *count += 1;
        page.push((id.clone(), team));
    }
    page
}

/// One interleaved query's clicks, credited to teams.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    pub a_clicks: u32,
    pub b_clicks: u32,
    /// 1: B (the candidate) got more clicks, -1: A did, 0: a tie (no click
    /// included).
    pub preference: i8,
}

/// Credits the clicks on `shown` (positions in the page, 0 for the top) to
/// the teams. A position clicked more than once counts once; a position past
/// the page is ignored.
pub fn credit<Id>(shown: &[(Id, Team)], clicked_ranks: &[usize]) -> Outcome {
    let mut counted = HashSet::with_capacity(clicked_ranks.len());
    let mut outcome = Outcome::default();
    for &rank in clicked_ranks {
        let Some((_, team)) = shown.get(rank) else {
            continue;
        };
        if !counted.insert(rank) {
            continue;
        }
        match team {
            Team::A => outcome.a_clicks += 1,
            Team::B => outcome.b_clicks += 1,
        }
    }
    outcome.preference = match outcome.b_clicks.cmp(&outcome.a_clicks) {
        std::cmp::Ordering::Greater => 1,
        std::cmp::Ordering::Less => -1,
        std::cmp::Ordering::Equal => 0,
    };
    outcome
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::seq::SliceRandom;
    use rand::SeedableRng;

    use super::*;

    /// A random ranking of `len` ids drawn from `0..universe`, duplicates
    /// allowed (a ranking with a repeated id must not repeat it on the page).
    fn random_list(rng: &mut StdRng, len: usize, universe: u32) -> Vec<u32> {
        (0..len).map(|_| rng.random_range(0..universe)).collect()
    }

    /// Replays a page and checks every construction property: no duplicate,
    /// every result from its team's ranking and that ranking's best result
    /// not yet shown, team sizes within one of each other while both
    /// rankings still had results to offer, and a full page when possible.
    fn check_page(a: &[u32], b: &[u32], k: usize, page: &[(u32, Team)]) {
        let mut shown = HashSet::new();
        let (mut n_a, mut n_b) = (0i64, 0i64);
        let mut both_available = true;
        for (id, team) in page {
            let best = |list: &[u32]| list.iter().find(|x| !shown.contains(*x)).copied();
            let (best_a, best_b) = (best(a), best(b));
            both_available &= best_a.is_some() && best_b.is_some();
            let own = match team {
                Team::A => best_a,
                Team::B => best_b,
            };
            assert_eq!(
                own,
                Some(*id),
                "{team:?} picked {id}, not its best in {a:?} / {b:?}"
            );
            assert!(shown.insert(*id), "{id} shown twice");
            match team {
                Team::A => n_a += 1,
                Team::B => n_b += 1,
            }
            if both_available {
                assert!((n_a - n_b).abs() <= 1, "unfair prefix in {page:?}");
            }
        }
        let distinct: HashSet<_> = a.iter().chain(b).collect();
        assert_eq!(page.len(), k.min(distinct.len()));
    }

    #[test]
    fn pages_keep_the_construction_properties() {
        let mut rng = StdRng::seed_from_u64(1);
        for case in 0..2_000 {
            let (len_a, len_b) = (rng.random_range(0..15), rng.random_range(0..15));
            // a small universe makes overlaps, repeats and ties common
            let universe = rng.random_range(1..30);
            let a = random_list(&mut rng, len_a, universe);
            let b = random_list(&mut rng, len_b, universe);
            let k = rng.random_range(0..20);
            let page = team_draft(&a, &b, k, &mut StdRng::seed_from_u64(case));
            check_page(&a, &b, k, &page);
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_page() {
        let a: Vec<u32> = (0..20).collect();
        let mut b = a.clone();
        b.shuffle(&mut StdRng::seed_from_u64(2));
        let page = |seed| team_draft(&a, &b, 10, &mut StdRng::seed_from_u64(seed));
        assert_eq!(page(7), page(7));
        assert!((0..20).any(|seed| page(seed) != page(7)));
    }

    #[test]
    fn a_shared_result_goes_to_the_coin_and_each_team_picks_fairly() {
        // both rankings open with 1 (a tie at rank 0): it always leads the
        // page, credited to the round's coin, and the other team then takes
        // its own next result
        let (a, b) = ([1, 2, 3], [1, 4, 5]);
        let mut first_a = 0;
        let mut rng = StdRng::seed_from_u64(3);
        for _ in 0..1_000 {
            let page = team_draft(&a, &b, 4, &mut rng);
            assert_eq!(page[0].0, 1);
            match page[0].1 {
                Team::A => {
                    first_a += 1;
                    assert_eq!(page[1], (4, Team::B));
                }
                Team::B => assert_eq!(page[1], (2, Team::A)),
            }
        }
        assert!(
            (450..=550).contains(&first_a),
            "A took the shared result {first_a} times"
        );

        // identical rankings: the page is that ranking, the teams alternate
        let same = [9, 8, 7, 6];
        let page = team_draft(&same, &same, 4, &mut rng);
        assert_eq!(page.iter().map(|p| p.0).collect::<Vec<_>>(), same);
        let n_a = page.iter().filter(|p| p.1 == Team::A).count();
        assert_eq!(n_a, 2);
    }

    #[test]
    fn uneven_and_empty_rankings() {
        let mut rng = StdRng::seed_from_u64(4);
        let page = team_draft(&[1], &[2, 3, 4, 5], 5, &mut rng);
        assert_eq!(page.len(), 5);
        assert_eq!(page.iter().filter(|p| p.1 == Team::A).count(), 1);
        assert_eq!(page.iter().filter(|p| p.1 == Team::B).count(), 4);
        assert!(team_draft::<u32, _>(&[], &[], 5, &mut rng).is_empty());
        assert!(team_draft(&[1, 2], &[3], 0, &mut rng).is_empty());
        let only_b = team_draft(&[], &[3, 4], 5, &mut rng);
        assert_eq!(only_b, vec![(3, Team::B), (4, Team::B)]);
    }

    #[test]
    fn clicks_are_credited_to_the_team_that_drafted_them() {
        let shown = [(10, Team::A), (20, Team::B), (30, Team::B), (40, Team::A)];
        let outcome = |clicks: &[usize]| credit(&shown, clicks);
        assert_eq!(
            outcome(&[1, 2]),
            Outcome {
                a_clicks: 0,
                b_clicks: 2,
                preference: 1
            }
        );
        assert_eq!(outcome(&[0]).preference, -1);
        assert_eq!(outcome(&[0, 1]).preference, 0);
        assert_eq!(outcome(&[]), Outcome::default());
        // the same position twice counts once, a position past the page not at all
        assert_eq!(
            outcome(&[0, 0, 0, 2, 9]),
            Outcome {
                a_clicks: 1,
                b_clicks: 1,
                preference: 0
            }
        );
    }
}
