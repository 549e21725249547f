//! Position bias estimated from simulated traffic whose true examination
//! curve is known: the world's people (`kalon_world::Users::browse`)
//! examine rank r with probability `1 / r^0.8`. Each result list gets
//! search's own exploration swap (`kalon_events::explore`, rate 1), the
//! clicks are tallied per (query, image, shown rank), and
//! `kalon_align::propensity::estimate` must recover the curve at ranks
//! 1-10 within the stated tolerance, while the naive curve (click-through
//! rate by rank, no interventions) must not. In process, no database or
//! broker; deterministic seeds.

use kalon_align::propensity::{self, EstimatorConfig, Tally};
use kalon_events::explore::{self, Exploration};
use kalon_world::text::Split;
use kalon_world::{Catalog, ImageMeta, Oracle, Query, QuerySet, Users};

/// Largest relative error allowed at any rank 2-10.
const TOLERANCE: f64 = 0.10;
const SEED: u64 = 23;
const QUERIES: usize = 300;
const SESSIONS_PER_QUERY: usize = 800;
const DEPTH: usize = 10;

/// The top `DEPTH` images for `query` by a decent but imperfect ranker
/// (relevance plus the oracle's beauty, with noise), so attractiveness
/// falls with rank as it does behind a real model.
fn ranked<'c>(
    catalog: &'c Catalog,
    query: &Query,
    oracle: &Oracle,
    rng: &mut impl rand::Rng,
) -> Vec<(&'c ImageMeta, f64)> {
    let mut scored: Vec<(&ImageMeta, f64)> = catalog
        .images
        .iter()
        .filter(|m| query.relevance(m) > 0.0)
        .map(|m| {
            let score = query.relevance(m)
                + 0.5 * oracle.aesthetic(query, m)
                + 0.1 * kalon_world::normal(rng);
            (m, score)
        })
        .collect();
    scored.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.id.cmp(&b.0.id)));
    scored.truncate(DEPTH);
    scored
}

#[test]
fn the_estimated_examination_curve_is_the_simulated_peoples_within_ten_percent() {
    let started = std::time::Instant::now();
    let catalog = Catalog::generate(SEED, 3_000);
    let queries: Vec<Query> = QuerySet::generate(SEED, 160)
        .split(Split::Train)
        .take(QUERIES)
        .cloned()
        .collect();
    let oracle = Oracle::default();
    let users = Users::default();
    let exploration = Exploration::new(1.0, DEPTH as u32).unwrap();
    let mut ranker_rng = kalon_world::stream(SEED, "ranker");
    let mut people = kalon_world::stream(SEED, "people");
    let mut tally = Tally::default();
    let mut swaps = [0u64; DEPTH - 1];
    for (q, query) in queries.iter().enumerate() {
        let list = ranked(&catalog, query, &oracle, &mut ranker_rng);
        assert_eq!(list.len(), DEPTH, "{} has enough matches", query.text);
        for s in 0..SESSIONS_PER_QUERY {
            let request_id = format!("req-{q}-{s}");
            let swap = exploration.swap_for(&request_id, list.len());
            let k = swap.expect("rate 1 explores every request");
            swaps[k as usize - 1] += 1;
            let shown = explore::shown_items(
                list.iter()
                    .map(|(m, score)| (m.id.clone(), *score))
                    .collect(),
                swap,
            );
            let mut metas: Vec<&ImageMeta> = list.iter().map(|(m, _)| *m).collect();
            explore::apply_swap(&mut metas, swap);
            let session = users.browse(query, &metas, &oracle, &mut people);
            for (item, meta) in shown.iter().zip(&metas) {
                assert_eq!(item.image_id, meta.id);
                tally.record(
                    &query.text,
                    &item.image_id,
                    item.rank,
                    session.clicks.contains(&item.rank),
                );
            }
        }
    }
    let observations = tally.observations();
    let estimate = propensity::estimate(&observations, &EstimatorConfig::default());
    let naive = propensity::naive_curve(&observations, DEPTH as u32);
    let truth = |rank: u32| 1.0 / f64::from(rank).powf(users.position_bias);

    println!(
        "{} queries x {} sessions, swaps per k: {swaps:?}, {:.1} s",
        queries.len(),
        SESSIONS_PER_QUERY,
        started.elapsed().as_secs_f64()
    );
    println!("{estimate}");
    println!("rank  truth  estimate  95% interval   rel.err  naive  rel.err");
    let mut worst = 0.0f64;
    let mut worst_naive = 0.0f64;
    for rank in 1..=DEPTH as u32 {
        let r = estimate.rank(rank).unwrap();
        let theta = r.theta.expect("every rank 1-10 is estimated");
        let error = (theta - truth(rank)).abs() / truth(rank);
        let naive = naive[rank as usize - 1].unwrap();
        let naive_error = (naive - truth(rank)).abs() / truth(rank);
        worst = worst.max(error);
        worst_naive = worst_naive.max(naive_error);
        println!(
            "{rank:>4}  {:.3}  {theta:.3}     {:.3}-{:.3}  {:>6.1}%  {naive:.3}  {:>6.1}%",
            truth(rank),
            r.low.unwrap(),
            r.high.unwrap(),
            100.0 * error,
            100.0 * naive_error
        );
    }
    assert!(
        worst <= TOLERANCE,
        "the estimate is {:.1}% off the truth at worst, more than {:.0}%",
        100.0 * worst,
        100.0 * TOLERANCE
    );
    assert!(
        worst_naive > TOLERANCE,
        "the naive curve is within {:.0}% too ({:.1}%): this traffic cannot tell the two apart",
        100.0 * TOLERANCE,
        100.0 * worst_naive
    );
    // the interventions the estimate rests on: every link, from every
    // query; and the traffic is enough for the tolerance to mean something
    // (each 95% interval inside theta +- the tolerance)
    for r in &estimate.ranks[1..] {
        assert!(r.interventions >= QUERIES as u64, "{r:?}");
        let theta = r.theta.unwrap();
        assert!(
            r.high.unwrap() - theta < TOLERANCE * theta
                && theta - r.low.unwrap() < TOLERANCE * theta,
            "interval too wide for the tolerance: {r:?}"
        );
    }
}
