//! Team-draft interleaving judged by the preference test: a simulated person
//! who prefers the candidate's pages is detected, equal rankings are not.

use kalon_events::interleave::{credit, team_draft};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::stats::sequential::{decide_preference, Decision, PreferenceConfig, PreferenceCounts};

/// One simulated query: 40 candidate images with relevance in [0, 1];
/// each ranking sorts them by relevance plus its own noise (B with
/// `noise_b`, A with 1) and keeps 10; a person examines the interleaved
/// page top down with attention 0.85^rank and clicks an examined image
/// with probability its relevance.
fn simulated_query(rng: &mut StdRng, noise_b: f64) -> i8 {
    let relevance: Vec<f64> = (0..40).map(|_| rng.random::<f64>().powi(2)).collect();
    let mut ranking = |noise: f64| {
        let mut scored: Vec<(f64, usize)> = relevance
            .iter()
            .enumerate()
            .map(|(i, r)| (r + noise * (rng.random::<f64>() - 0.5), i))
            .collect();
        scored.sort_by(|x, y| y.0.total_cmp(&x.0));
        scored
            .into_iter()
            .take(10)
            .map(|(_, i)| i)
            .collect::<Vec<_>>()
    };
    let (a, b) = (ranking(1.0), ranking(noise_b));
    let page = team_draft(&a, &b, 10, rng);
    let clicks: Vec<usize> = (0..page.len())
        .filter(|&rank| {
            rng.random_bool(0.85f64.powi(rank as i32)) && rng.random_bool(relevance[page[rank].0])
        })
        .collect();
    credit(&page, &clicks).preference
}

/// Peeks at the preference verdict every 50 queries, up to `queries`.
fn first_decision(rng: &mut StdRng, noise_b: f64, queries: usize) -> Decision {
    let mut counts = PreferenceCounts::default();
    let mut decision = Decision::Inconclusive;
    for _ in 0..queries / 50 {
        for _ in 0..50 {
            counts.push(simulated_query(rng, noise_b));
        }
        decision = decide_preference(&counts, 0.05, 0.05, &PreferenceConfig::default())
            .unwrap()
            .decision;
        if matches!(
            decision,
            Decision::SignificantlyBetter | Decision::SignificantlyWorse
        ) {
            break;
        }
    }
    decision
}

#[test]
fn a_person_who_prefers_b_is_detected_and_equal_rankings_are_not() {
    let mut rng = StdRng::seed_from_u64(5);
    // B ranks with half A's noise: better pages, detected within 2,000
    // queries in at least 90% of 100 runs, never the wrong way
    let runs: Vec<Decision> = (0..100)
        .map(|_| first_decision(&mut rng, 0.5, 2_000))
        .collect();
    let better = runs
        .iter()
        .filter(|d| **d == Decision::SignificantlyBetter)
        .count();
    assert!(better >= 90, "B detected in {better} of 100 runs");
    assert!(!runs.contains(&Decision::SignificantlyWorse));
    // equally noisy rankings: 200 runs of 1,000 queries, peeking every 50
    let aa: Vec<Decision> = (0..200)
        .map(|_| first_decision(&mut rng, 1.0, 1_000))
        .collect();
    let wrong = aa
        .iter()
        .filter(|d| {
            matches!(
                d,
                Decision::SignificantlyBetter | Decision::SignificantlyWorse
            )
        })
        .count();
    println!("interleaving: B detected {better}/100, A/A false decisions {wrong}/200");
    assert!(wrong <= 10, "A/A false decisions {wrong} of 200");
}
