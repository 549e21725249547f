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

/// Largest relative error allowed at any rank 2-10.
const TOLERANCE: f64 = 0.10;
const SEED: u64 = 23;
const QUERIES: usize = 300;
const SESSIONS_PER_QUERY: usize = 800;
const DEPTH: usize = 10;

#[test]
fn the_estimated_examination_curve_is_the_simulated_peoples_within_ten_percent() {
    let started = std::time::Instant::now();
    let traffic = kalon_tests::traffic::Traffic::generate(SEED, QUERIES, SESSIONS_PER_QUERY, DEPTH);
    let mut tally = Tally::default();
    for list in &traffic.lists {
        for item in &list.shown {
            tally.record(
                &list.query,
                &item.image_id,
                item.rank,
                list.clicks.contains(&item.rank),
            );
        }
    }
    let (queries, swaps, users) = (&traffic.queries, traffic.swaps, &traffic.users);
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
