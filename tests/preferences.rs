//! The preference builder against a real Postgres and a real broker: the
//! exact pairs and weights of hand-made lists, arrival orders that must not
//! matter, judgments from the topic, bad input, and a builder killed with
//! SIGKILL mid-stream.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use kalon_events::{
    Aspect, JudgmentOutcome, JudgmentVerdict, LmmJudgment, QueryRephrased, TopicPayload,
};
use kalon_preferences::clicks::{self, Timing};
use kalon_preferences::{ratings, store, PreferencesConfig};
use kalon_tests::TestEnv;
use rand::{Rng, SeedableRng};
use sqlx::PgPool;
use uuid::Uuid;

const LETTERS: [&str; 5] = ["a", "b", "c", "d", "e"];

fn timing() -> Timing {
    Timing {
        quiet: chrono::Duration::minutes(30),
        expire_after: chrono::Duration::hours(24),
        lookback: chrono::Duration::hours(72),
    }
}

fn prior() -> kalon_align::feedback::Propensity {
    kalon_align::feedback::Propensity {
        eta: 0.8,
        max_weight: 10.0,
    }
}

/// An impression that arrived `ago_s` seconds ago.
async fn impression(
    pool: &PgPool,
    request: &str,
    query: &str,
    images: &[&str],
    variant: &str,
    ago_s: i64,
) {
    let results: Vec<serde_json::Value> = images
        .iter()
        .enumerate()
        .map(|(i, id)| serde_json::json!({"image_id": id, "rank": i + 1, "score": 1.0 - i as f64 * 0.1}))
        .collect();
    sqlx::query(
        "INSERT INTO impressions (event_id, occurred_at, request_id, session_id, query,
                                  model_version, variant, results, ingested_at)
         VALUES ($1, now() - make_interval(secs => $2), $3, $3, $4, 'm1', $5, $6::json,
                 now() - make_interval(secs => $2))",
    )
    .bind(Uuid::now_v7())
    .bind(ago_s as f64)
    .bind(request)
    .bind(query)
    .bind(variant)
    .bind(serde_json::Value::from(results).to_string())
    .execute(pool)
    .await
    .unwrap();
}

/// A click that arrived `ago_s` seconds ago; returns its event id.
async fn click(pool: &PgPool, request: &str, image: &str, rank: i32, ago_s: i64) -> Uuid {
    let id = Uuid::now_v7();
    click_as(pool, id, request, image, rank, ago_s).await;
    id
}

async fn click_as(pool: &PgPool, id: Uuid, request: &str, image: &str, rank: i32, ago_s: i64) {
    sqlx::query(
        "INSERT INTO clicks (event_id, occurred_at, request_id, image_id, rank, ingested_at)
         VALUES ($1, now() - make_interval(secs => $2), $3, $4, $5, now() - make_interval(secs => $2))
         ON CONFLICT DO NOTHING",
    )
    .bind(id)
    .bind(ago_s as f64)
    .bind(request)
    .bind(image)
    .bind(rank)
    .execute(pool)
    .await
    .unwrap();
}

async fn rating(pool: &PgPool, query: &str, image: &str, stars: i16, aspect: &str) {
    sqlx::query(
        "INSERT INTO ratings (event_id, occurred_at, query, image_id, stars, aspect, ingested_at)
         VALUES ($1, now() - interval '1 hour', $2, $3, $4, $5, now() - interval '1 hour')",
    )
    .bind(Uuid::now_v7())
    .bind(query)
    .bind(image)
    .bind(stars)
    .bind(aspect)
    .execute(pool)
    .await
    .unwrap();
}

/// A version that knows `images` (ratings of other images are refused).
async fn catalog(pool: &PgPool, images: &[&str]) {
    kalon_registry::store::register_version(pool, "m1", "/models/m1", None, 2)
        .await
        .unwrap();
    let ids: Vec<String> = images.iter().map(|s| s.to_string()).collect();
    let data = vec![0.5f32; ids.len() * 2];
    kalon_registry::store::store_embeddings(pool, "m1", &ids, &data, 2)
        .await
        .unwrap();
}

/// id -> (source, winner, loser, weight rounded to 1e-9)
type Pairs = BTreeMap<String, (String, String, String, String)>;

async fn pairs(pool: &PgPool) -> Pairs {
    let rows: Vec<(String, String, String, String, f64)> =
        sqlx::query_as("SELECT id, source, winner, loser, weight FROM preference_pairs")
            .fetch_all(pool)
            .await
            .unwrap();
    rows.into_iter()
        .map(|(id, s, w, l, weight)| (id, (s, w, l, format!("{weight:.9}"))))
        .collect()
}

/// (source, winner, loser, weight) of every pair, sorted.
fn facts(pairs: &Pairs) -> Vec<(String, String, String, String)> {
    let mut facts: Vec<_> = pairs.values().cloned().collect();
    facts.sort();
    facts
}

fn fact(source: &str, winner: &str, loser: &str, weight: f64) -> (String, String, String, String) {
    (
        source.into(),
        winner.into(),
        loser.into(),
        format!("{weight:.9}"),
    )
}

async fn refused(pool: &PgPool) -> BTreeMap<(String, String), i64> {
    let rows: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT source, outcome, count(*) FROM preference_inputs WHERE outcome <> 'paired' GROUP BY 1, 2",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    rows.into_iter().map(|(s, o, n)| ((s, o), n)).collect()
}

async fn build(pool: &PgPool) -> (clicks::ClickPass, ratings::RatingPass) {
    let clicked = clicks::pass(pool, timing(), 2, &prior()).await.unwrap();
    let rated = ratings::pass(pool, chrono::Duration::hours(72), 2, Default::default())
        .await
        .unwrap();
    (clicked, rated)
}

fn w(rank: u32) -> f64 {
    f64::from(rank).powf(0.8)
}

#[tokio::test]
async fn hand_made_lists_give_the_exact_pairs_weights_and_refusals() {
    let env = TestEnv::new().await;
    let pool = &env.pool;
    catalog(pool, &LETTERS).await;
    let hour = 3600;
    impression(pool, "r1", "red cat", &LETTERS, "stable", 2 * hour).await;
    click(pool, "r1", "c", 3, 2 * hour).await;
    click(pool, "r1", "d", 4, 2 * hour).await;
    // the same click twice (two events): one click
    click(pool, "r1", "c", 3, 2 * hour).await;
    click(pool, "r1", "a", 9, 2 * hour).await; // no rank 9 in a list of 5
    click(pool, "r1", "z", 2, 2 * hour).await; // the list shows b there
    impression(pool, "r2", "red cat", &LETTERS, "canary", 2 * hour).await;
    click(pool, "r2", "a", 1, 2 * hour).await;
    // a click whose impression is still arriving: the list is not quiet
    impression(pool, "r4", "blue dog", &["a", "b", "c"], "stable", 60).await;
    click(pool, "r4", "b", 2, 2 * hour).await;
    // a producer that bypassed search: a blank query makes no pair
    impression(pool, "r6", "  ", &LETTERS, "stable", 2 * hour).await;
    click(pool, "r6", "b", 2, 2 * hour).await;
    // a click whose impression never came, and one that may still come
    click(pool, "r-gone", "a", 1, 25 * hour).await;
    click(pool, "r-later", "a", 1, 2 * hour).await;
    for (image, stars) in [("a", 5), ("b", 2), ("b", 4), ("c", 3), ("zzz", 5)] {
        rating(pool, "red cat", image, stars, "aesthetic").await;
    }
    rating(pool, "red cat", "b", 4, "relevance").await;
    rating(pool, "red cat", "a", 1, "relevance").await;

    let (clicked, rated) = build(pool).await;
    let got = pairs(pool).await;
    let mut want = vec![
        fact("click", "c", "a", w(3)),
        fact("click", "c", "b", w(3)),
        fact("click", "d", "a", w(4)),
        fact("click", "d", "b", w(4)),
        fact("click", "d", "e", w(4)),
        fact("click", "a", "b", 1.0),
        fact("rating", "a", "b", 0.5),
        fact("rating", "a", "c", 0.5),
        fact("rating", "b", "a", 0.75),
    ];
    want.sort();
    assert_eq!(facts(&got), want);
    assert_eq!(clicked.waiting, 2, "r4's click and r-later's: {clicked:?}");
    assert_eq!(clicked.lists, 3, "r1, r2 and r6 (refused)");
    assert_eq!(rated.groups, 2);
    let expected_refusals: BTreeMap<(String, String), i64> = [
        (("click", "blank_query"), 1),
        (("click", "image_not_at_rank"), 1),
        (("click", "impression_never_arrived"), 1),
        (("click", "rank_outside_list"), 1),
        (("rating", "unknown_image"), 1),
    ]
    .into_iter()
    .map(|((s, o), n)| ((s.to_owned(), o.to_owned()), n))
    .collect();
    assert_eq!(refused(pool).await, expected_refusals);
    // where the pairs were served
    let (version, variant): (String, String) = sqlx::query_as(
        "SELECT model_version, variant FROM preference_pairs WHERE source = 'click' AND winner = 'a'",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!((version.as_str(), variant.as_str()), ("m1", "canary"));
    // a second pass changes nothing
    build(pool).await;
    assert_eq!(pairs(pool).await, got);
    // what `kalonctl pairs stats` shows
    let stats = store::stats(pool, 14).await.unwrap();
    assert_eq!(
        stats.by_source,
        [("click".to_owned(), 6), ("rating".to_owned(), 3)]
    );
    assert!(stats
        .by_version
        .contains(&(Some("m1".to_owned()), "click".to_owned(), 6)));
    let shown = kalonctl::pairs::render(&stats);
    for line in [
        "preference pairs: 9",
        "impression_never_arrived",
        "unknown_image",
        "not estimated yet",
    ] {
        assert!(shown.contains(line), "{line:?} missing from:\n{shown}");
    }

    // late arrivals: r4's list goes quiet; r1 gets a click long after it was
    // built; r5's impression came long before its click; a new rating
    sqlx::query(
        "UPDATE impressions SET ingested_at = now() - interval '1 hour' WHERE request_id = 'r4'",
    )
    .execute(pool)
    .await
    .unwrap();
    click(pool, "r1", "e", 5, hour).await;
    impression(pool, "r5", "green hat", &["c", "d"], "stable", 20 * hour).await;
    click(pool, "r5", "d", 2, hour).await;
    rating(pool, "red cat", "c", 5, "aesthetic").await;
    // relevance: a and b now tie (2.5 each), so b > a loses its support
    rating(pool, "red cat", "a", 4, "relevance").await;
    rating(pool, "red cat", "b", 1, "relevance").await;
    build(pool).await;
    let later = pairs(pool).await;
    // every earlier click pair is still there, with its weight
    for (id, pair) in got.iter().filter(|(_, p)| p.0 == "click") {
        assert_eq!(later.get(id), Some(pair), "click pair {id} changed");
    }
    let mut want = vec![
        fact("click", "c", "a", w(3)),
        fact("click", "c", "b", w(3)),
        fact("click", "d", "a", w(4)),
        fact("click", "d", "b", w(4)),
        fact("click", "d", "e", w(4)),
        fact("click", "e", "a", w(5)),
        fact("click", "e", "b", w(5)),
        fact("click", "a", "b", 1.0),
        fact("click", "b", "a", w(2)),
        fact("click", "b", "c", w(2)),
        fact("click", "d", "c", w(2)),
        // aesthetic means now a 5, b 3, c 4
        fact("rating", "a", "b", 0.5),
        fact("rating", "a", "c", 0.25),
        fact("rating", "c", "b", 0.25),
    ];
    want.sort();
    assert_eq!(facts(&later), want);
    let (waiting,) = (clicks::pass(pool, timing(), 2, &prior())
        .await
        .unwrap()
        .waiting,);
    assert_eq!(waiting, 1, "only r-later's click still waits");

    // rebuilt from nothing, the same lists give the same ids and weights
    sqlx::query("TRUNCATE preference_pairs, preference_inputs")
        .execute(pool)
        .await
        .unwrap();
    build(pool).await;
    let rebuilt = pairs(pool).await;
    for (id, pair) in &rebuilt {
        assert_eq!(later.get(id), Some(pair), "pair {id} differs when rebuilt");
    }
    // only d > e is gone: e was clicked after all
    assert_eq!(later.len(), rebuilt.len() + 1);
    assert!(!facts(&rebuilt).contains(&fact("click", "d", "e", w(4))));
    env.cleanup().await;
}

/// The same list, arriving four ways, on four databases.
#[tokio::test]
async fn arrival_order_and_duplicate_clicks_do_not_change_the_pairs() {
    let env = TestEnv::new().await;
    let server = kalon_tests::server_url();
    let hour = 3600;
    let mut results = Vec::new();
    for order in [
        "in order",
        "clicks first",
        "impression long before",
        "duplicates",
    ] {
        let (url, pool) = kalon_tests::fresh_database(&server).await;
        let clicks_at = [(2, "b"), (4, "d")];
        let ids: Vec<Uuid> = clicks_at.iter().map(|_| Uuid::now_v7()).collect();
        match order {
            "in order" => {
                impression(&pool, "r", "q", &LETTERS, "stable", 2 * hour).await;
                for ((rank, image), id) in clicks_at.iter().zip(&ids) {
                    click_as(&pool, *id, "r", image, *rank, 2 * hour).await;
                }
            }
            "clicks first" => {
                for ((rank, image), id) in clicks_at.iter().zip(&ids) {
                    click_as(&pool, *id, "r", image, *rank, 2 * hour).await;
                }
                let pass = clicks::pass(&pool, timing(), 10, &prior()).await.unwrap();
                assert_eq!((pass.waiting, pass.new_pairs), (2, 0), "{order}");
                impression(&pool, "r", "q", &LETTERS, "stable", 60).await;
                let pass = clicks::pass(&pool, timing(), 10, &prior()).await.unwrap();
                assert_eq!(
                    (pass.waiting, pass.new_pairs),
                    (2, 0),
                    "{order}: not quiet yet"
                );
                sqlx::query("UPDATE impressions SET ingested_at = now() - interval '1 hour'")
                    .execute(&pool)
                    .await
                    .unwrap();
            }
            "impression long before" => {
                impression(&pool, "r", "q", &LETTERS, "stable", 23 * hour).await;
                for ((rank, image), id) in clicks_at.iter().zip(&ids) {
                    click_as(&pool, *id, "r", image, *rank, hour).await;
                }
            }
            _ => {
                impression(&pool, "r", "q", &LETTERS, "stable", 2 * hour).await;
                for ((rank, image), id) in clicks_at.iter().zip(&ids) {
                    click_as(&pool, *id, "r", image, *rank, 2 * hour).await;
                    // redelivered (the same event) and clicked twice (a new one)
                    click_as(&pool, *id, "r", image, *rank, 2 * hour).await;
                    click(&pool, "r", image, *rank, 2 * hour).await;
                }
                clicks::pass(&pool, timing(), 10, &prior()).await.unwrap();
                // the second click of b arrives after the list was built
                click(&pool, "r", "b", 2, hour).await;
            }
        }
        clicks::pass(&pool, timing(), 10, &prior()).await.unwrap();
        clicks::pass(&pool, timing(), 10, &prior()).await.unwrap();
        results.push((order, pairs(&pool).await));
        pool.close().await;
        let _ = kalon_db::drop_database(&url).await;
    }
    let (_, first) = &results[0];
    let mut want = vec![
        fact("click", "b", "a", w(2)),
        fact("click", "b", "c", w(2)),
        fact("click", "d", "a", w(4)),
        fact("click", "d", "c", w(4)),
        fact("click", "d", "e", w(4)),
    ];
    want.sort();
    assert_eq!(facts(first), want);
    for (order, got) in &results[1..] {
        assert_eq!(got, first, "{order}: other pairs or ids than in order");
    }
    env.cleanup().await;
}

fn judgment(query: &str, a: &[&str], b: &[&str], outcome: JudgmentOutcome) -> LmmJudgment {
    let a: Vec<String> = a.iter().map(|s| s.to_string()).collect();
    let b: Vec<String> = b.iter().map(|s| s.to_string()).collect();
    LmmJudgment::now(
        Uuid::now_v7(),
        query,
        Aspect::Aesthetic,
        (&a, &b),
        outcome,
        "sim".into(),
    )
}

fn builder_config(env: &TestEnv) -> PreferencesConfig {
    let mut config = PreferencesConfig::new(
        &env.database_url,
        &env.kafka.brokers,
        &env.kafka.topic_prefix,
        "no-dataset",
    );
    config.dpo = false;
    config.poll_ms = 100;
    config.propensity_every_s = 0;
    config
}

async fn wait_until(pool: &PgPool, sql: &str, at_least: i64, timeout: Duration) -> i64 {
    let start = Instant::now();
    loop {
        let n: i64 = sqlx::query_scalar(sql).fetch_one(pool).await.unwrap();
        if n >= at_least {
            return n;
        }
        assert!(
            start.elapsed() < timeout,
            "{sql}: {n} < {at_least} after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn judgments_from_the_topic_become_pairs_once_and_bad_ones_are_counted() {
    let env = TestEnv::new().await;
    let topic = env.kafka.topic(LmmJudgment::TOPIC);
    let win = judgment(
        "q",
        &["a", "b"],
        &["b", "c", "d"],
        JudgmentOutcome::Compared(JudgmentVerdict::Win),
    );
    let similar = judgment(
        "q",
        &["a"],
        &["c"],
        JudgmentOutcome::Compared(JudgmentVerdict::Similar),
    );
    let scored = judgment("q", &["e"], &["a"], JudgmentOutcome::Scored(2.0, 4.5));
    let mut unknown: serde_json::Value = serde_json::from_slice(
        &judgment(
            "q",
            &["a"],
            &["c"],
            JudgmentOutcome::Compared(JudgmentVerdict::Win),
        )
        .to_json(),
    )
    .unwrap();
    unknown["verdict"] = "maybe".into();
    let unknown_id = unknown["judgment_id"].as_str().unwrap().to_owned();
    let mut nul: serde_json::Value = serde_json::from_slice(&win.to_json()).unwrap();
    nul["query"] = "q\u{0}".into();
    nul["judgment_id"] = Uuid::now_v7().to_string().into();
    let mut overlong = unknown.clone();
    overlong["judgment_id"] = "x".repeat(5000).into();
    let mut missing: serde_json::Value = serde_json::from_slice(&win.to_json()).unwrap();
    missing["verdict"] = serde_json::Value::Null;
    missing["judgment_id"] = Uuid::now_v7().to_string().into();
    let messages: Vec<(String, Vec<u8>)> = vec![
        ("q".into(), win.to_json()),
        ("q".into(), similar.to_json()),
        ("q".into(), scored.to_json()),
        ("q".into(), unknown.to_string().into_bytes()),
        ("q".into(), missing.to_string().into_bytes()),
        ("q".into(), b"not json at all".to_vec()),
        // Postgres text cannot hold NUL; an id of any size is no judgment id
        ("q".into(), nul.to_string().into_bytes()),
        ("q".into(), overlong.to_string().into_bytes()),
        // redelivered
        ("q".into(), win.to_json()),
    ];
    env.send(
        messages
            .into_iter()
            .map(|(key, payload)| kalon_kafka::Outgoing {
                topic: topic.clone(),
                key: Some(key.into_bytes()),
                payload,
                headers: None,
            })
            .collect(),
    )
    .await;
    let config = builder_config(&env);
    let group = config.consumer.group_id.clone();
    let builder = kalon_preferences::Builder::build(config, None)
        .await
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(builder.run(async {
        let _ = stopped.await;
    }));
    wait_until(
        &env.pool,
        "SELECT count(*) FROM preference_inputs WHERE source = 'judgment'",
        6,
        Duration::from_secs(60),
    )
    .await;
    // the group's offsets move past all nine once they are durable
    let probe =
        kalon_kafka::consumer::GroupLag::new(&env.kafka, &group, vec![topic.clone()]).unwrap();
    let start = Instant::now();
    while probe.measure().unwrap().position < 9 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "offsets never committed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = stop.send(());
    task.await.unwrap().unwrap();

    let got = pairs(&env.pool).await;
    // a beats c and d (b is in both rows); the scoring: a (4.5) over e (2.0)
    let mut want = vec![
        fact("judgment", "a", "c", 0.5),
        fact("judgment", "a", "d", 0.5),
        fact("judgment", "a", "e", 1.0),
    ];
    want.sort();
    assert_eq!(facts(&got), want);
    let refusals = refused(&env.pool).await;
    let expected: BTreeMap<(String, String), i64> = [
        (("judgment", "missing_verdict"), 1),
        (("judgment", "unknown_verdict"), 2),
        (("judgment", "unreadable_event"), 2),
    ]
    .into_iter()
    .map(|((s, o), n)| ((s.to_owned(), o.to_owned()), n))
    .collect();
    assert_eq!(refusals, expected);
    let marked: String = sqlx::query_scalar(
        "SELECT outcome FROM preference_inputs WHERE source = 'judgment' AND ref = $1",
    )
    .bind(&unknown_id)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(marked, "unknown_verdict", "refused under its own id");
    env.cleanup().await;
}

/// Impressions and clicks written in two statements, all arrived an hour ago.
#[derive(Default)]
struct Bulk {
    /// event id, request id, query, results (JSON text)
    impressions: Vec<(Uuid, String, String, String)>,
    /// event id, request id, image, rank
    clicks: Vec<(Uuid, String, String, i32)>,
}

impl Bulk {
    async fn insert(&self, pool: &PgPool) {
        let text = |f: fn(&(Uuid, String, String, String)) -> &String| -> Vec<String> {
            self.impressions.iter().map(|i| f(i).clone()).collect()
        };
        sqlx::query(
            "INSERT INTO impressions (event_id, occurred_at, request_id, session_id, query,
                                      model_version, variant, results, ingested_at)
             SELECT e, now() - interval '1 hour', r, r, q, 'm1', 'stable', res::json,
                    now() - interval '1 hour'
             FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[]) AS t(e, r, q, res)",
        )
        .bind(self.impressions.iter().map(|i| i.0).collect::<Vec<_>>())
        .bind(text(|i| &i.1))
        .bind(text(|i| &i.2))
        .bind(text(|i| &i.3))
        .execute(pool)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO clicks (event_id, occurred_at, request_id, image_id, rank, ingested_at)
             SELECT e, now() - interval '1 hour', r, i, k, now() - interval '1 hour'
             FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::int[]) AS t(e, r, i, k)",
        )
        .bind(self.clicks.iter().map(|c| c.0).collect::<Vec<_>>())
        .bind(self.clicks.iter().map(|c| c.1.clone()).collect::<Vec<_>>())
        .bind(self.clicks.iter().map(|c| c.2.clone()).collect::<Vec<_>>())
        .bind(self.clicks.iter().map(|c| c.3).collect::<Vec<_>>())
        .execute(pool)
        .await
        .unwrap();
    }
}

/// `lists` random lists with clicks and ratings, the same for a seed.
async fn traffic(pool: &PgPool, lists: usize, seed: u64) -> (i64, i64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let images: Vec<String> = (0..60).map(|i| format!("img-{i}")).collect();
    let names: Vec<&str> = images.iter().map(|s| s.as_str()).collect();
    catalog(pool, &names).await;
    let mut bulk = Bulk::default();
    let mut ratings = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for l in 0..lists {
        let request = format!("req-{l}");
        let query = format!("query {}", rng.random_range(0..40));
        let mut shown: Vec<&str> = Vec::new();
        while shown.len() < 10 {
            let image = names[rng.random_range(0..names.len())];
            if !shown.contains(&image) {
                shown.push(image);
            }
        }
        let results: Vec<serde_json::Value> = shown
            .iter()
            .enumerate()
            .map(|(i, id)| serde_json::json!({"image_id": id, "rank": i + 1, "score": 0.0}))
            .collect();
        bulk.impressions.push((
            Uuid::from_u128(rng.random()),
            request.clone(),
            query.clone(),
            serde_json::Value::from(results).to_string(),
        ));
        for (i, image) in shown.iter().enumerate() {
            if rng.random_bool(0.5 / (i as f64 + 1.0).powf(0.8)) {
                bulk.clicks.push((
                    Uuid::from_u128(rng.random()),
                    request.clone(),
                    image.to_string(),
                    i as i32 + 1,
                ));
                if rng.random_bool(0.1) {
                    ratings.0.push(Uuid::from_u128(rng.random()));
                    ratings.1.push(query.clone());
                    ratings.2.push(image.to_string());
                    ratings.3.push(rng.random_range(1..=5i16));
                }
            }
        }
    }
    bulk.insert(pool).await;
    sqlx::query(
        "INSERT INTO ratings (event_id, occurred_at, query, image_id, stars, aspect, ingested_at)
         SELECT e, now() - interval '1 hour', q, i, s, 'aesthetic', now() - interval '1 hour'
         FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::smallint[]) AS t(e, q, i, s)",
    )
    .bind(&ratings.0)
    .bind(&ratings.1)
    .bind(&ratings.2)
    .bind(&ratings.3)
    .execute(pool)
    .await
    .unwrap();
    (bulk.clicks.len() as i64, ratings.0.len() as i64)
}

fn judgments(count: usize) -> Vec<LmmJudgment> {
    (0..count)
        .map(|j| {
            let a = [format!("img-{}", j % 60), format!("img-{}", (j + 1) % 60)];
            let b = [format!("img-{}", (j + 7) % 60)];
            let verdict = if j % 3 == 0 {
                JudgmentVerdict::Loss
            } else {
                JudgmentVerdict::Win
            };
            LmmJudgment::now(
                Uuid::from_u128(j as u128 + 1),
                &format!("query {}", j % 40),
                Aspect::Aesthetic,
                (&a, &b),
                JudgmentOutcome::Compared(verdict),
                "sim".into(),
            )
        })
        .collect()
}

#[tokio::test]
async fn a_builder_killed_mid_stream_ends_with_the_pairs_of_an_uninterrupted_run() {
    let env = TestEnv::new().await;
    let (clicks, ratings) = traffic(&env.pool, 6000, 7).await;
    let judged = judgments(300);
    env.send(
        judged
            .iter()
            .map(|j| kalon_kafka::Outgoing {
                topic: env.kafka.topic(LmmJudgment::TOPIC),
                key: Some(j.query.clone().into_bytes()),
                payload: j.to_json(),
                headers: None,
            })
            .collect(),
    )
    .await;
    let total = clicks + ratings + judged.len() as i64;
    let started = Instant::now();

    // the uninterrupted run, in this process, on its own database
    let (reference_url, reference) = kalon_tests::fresh_database(&kalon_tests::server_url()).await;
    traffic(&reference, 6000, 7).await;
    // the service's defaults: quiet 30 min, expiry 24 h, lookback 72 h (the
    // lists arrived an hour ago), and position bias estimated first
    let defaults = PreferencesConfig::new(&reference_url, "unused:9092", "", "no-dataset");
    kalon_preferences::propensity::estimate_and_store(&reference, &defaults)
        .await
        .unwrap()
        .expect("an estimate");
    let curve = kalon_preferences::propensity::Curve::latest(&reference, defaults.prior())
        .await
        .unwrap()
        .unwrap();
    let timing = Timing {
        quiet: defaults.quiet(),
        expire_after: defaults.expire_after(),
        lookback: defaults.lookback(),
    };
    clicks::pass(&reference, timing, 100, &curve).await.unwrap();
    ratings::pass(
        &reference,
        defaults.lookback(),
        100,
        defaults.rating_rules(),
    )
    .await
    .unwrap();
    let mut conn = reference.acquire().await.unwrap();
    for (i, j) in judged.iter().enumerate() {
        let (rows, mark) =
            kalon_preferences::consume::judgment(&j.to_json(), &i.to_string()).unwrap();
        store::insert_pairs(&mut conn, &rows, store::OnConflict::Keep)
            .await
            .unwrap();
        store::mark(&mut conn, "judgment", &[mark]).await.unwrap();
    }
    drop(conn);
    let want = pairs(&reference).await;
    eprintln!("reference built in {:.1}s", started.elapsed().as_secs_f64());
    assert!(
        want.len() > 5000,
        "a run big enough to kill mid-way: {}",
        want.len()
    );

    // the builder as its own process, killed with SIGKILL once it has begun
    let binary = kalon_tests::workspace_binary("kalon-preferences");
    let spawn = || {
        std::process::Command::new(&binary)
            .env("DATABASE_URL", &env.database_url)
            .env("KALON_KAFKA_BROKERS", &env.kafka.brokers)
            .env("KALON_TOPIC_PREFIX", &env.kafka.topic_prefix)
            .env(
                "KALON_PREFERENCES_GROUP",
                format!("{}kalon-preferences", env.kafka.topic_prefix),
            )
            .env("KALON_PREFERENCES_HEALTH_ADDR", "127.0.0.1:0")
            .env("KALON_PREFERENCES_DPO", "false")
            // small transactions, so the kill lands mid-stream; the rest
            // as a user runs it (position bias estimated at start)
            .env("KALON_PREFERENCES_BATCH", "25")
            .env("KALON_PREFERENCES_POLL_MS", "100")
            .env("RUST_LOG", "warn")
            .spawn()
            .expect("start kalon-preferences")
    };
    let mut first = spawn();
    eprintln!("binary ready at {:.1}s", started.elapsed().as_secs_f64());
    let marked = "SELECT count(*) FROM preference_inputs";
    let seen = wait_until(&env.pool, marked, 500, Duration::from_secs(120)).await;
    first.kill().unwrap(); // SIGKILL
    first.wait().unwrap();
    let at_kill: i64 = sqlx::query_scalar(marked)
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert!(
        at_kill < total,
        "killed after it had finished ({seen} of {total}): the test proves nothing"
    );
    eprintln!(
        "killed at {:.1}s with {at_kill} of {total} inputs marked",
        started.elapsed().as_secs_f64()
    );
    let mut second = spawn();
    wait_until(&env.pool, marked, total, Duration::from_secs(180)).await;
    eprintln!("all marked at {:.1}s", started.elapsed().as_secs_f64());
    // a little longer: nothing more may appear
    tokio::time::sleep(Duration::from_secs(2)).await;
    second.kill().unwrap();
    second.wait().unwrap();
    let got = pairs(&env.pool).await;
    assert_eq!(
        got.len(),
        want.len(),
        "pairs after the kill vs an uninterrupted run"
    );
    assert!(got == want, "the pair tables differ (by id and weight)");
    let inputs: i64 = sqlx::query_scalar(marked)
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(inputs, total, "every input marked once");
    reference.close().await;
    let _ = kalon_db::drop_database(&reference_url).await;
    env.cleanup().await;
}

fn rephrased(query: &str, detail: &str) -> QueryRephrased {
    QueryRephrased::now(
        query,
        "sim".into(),
        [("detail".to_owned(), detail.to_owned())]
            .into_iter()
            .collect(),
    )
}

/// A builder in this process until the returned sender fires.
fn start(
    config: PreferencesConfig,
    llm: Option<kalon_llm::LlmConfig>,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let builder = kalon_preferences::Builder::build(config, llm)
            .await
            .expect("builder builds");
        builder
            .run(async {
                let _ = stopped.await;
            })
            .await
            .expect("builder runs");
    });
    (stop, task)
}

#[tokio::test]
async fn live_dpo_equals_the_offline_construction_and_waits_out_a_failing_teacher() {
    use kalon_align::rephrase::{PromptVariant, Rephraser};
    use kalon_tests::search as fixture;

    let env = TestEnv::new().await;
    let world = fixture::search_world(400);
    fixture::index(&env, &world, "base", world.parent.path(), false).await;
    kalon_registry::lifecycle::promote(
        &env.pool,
        "base",
        "test",
        "the first model",
        serde_json::json!({}),
    )
    .await
    .unwrap();
    let mut sim = kalon_sim_llm::SimConfig::new(21, 400);
    sim.world_dir = Some(world.world.path().to_owned());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = kalon_sim_llm::SimServer::start(sim, listener)
        .await
        .unwrap();
    let mut good = kalon_llm::LlmConfig::new(server.base_url(), "kalon-sim-1");
    good.rate_per_s = 1e6;
    good.burst = 1_000_000;
    let query = kalon_dataset::train_queries(world.world.path()).unwrap()[0].clone();
    let detail = kalon_sim_llm::WorldRephraser::default()
        .rephrase(&query, PromptVariant::Detail)
        .unwrap();

    // the offline construction (what `kalonctl eval align` builds)
    let offline = {
        let (dir, data_dir, llm, query) = (
            world.parent.path().to_owned(),
            world.world.path().to_owned(),
            good.clone(),
            query.clone(),
        );
        tokio::task::spawn_blocking(move || {
            let encoder =
                kalon_encoder::Encoder::load(&dir, &kalon_encoder::EncoderOptions::default())
                    .unwrap();
            let data = kalon_align::dataset::Embedded::load(&data_dir, &encoder).unwrap();
            let teacher = kalon_align::LmmScorer::new(
                kalon_llm::Judge::new(kalon_llm::LlmClient::new(llm).unwrap()),
                kalon_align::ImageSource::Files(data_dir.clone()),
            )
            .unwrap();
            let spec = kalon_align::train::AlignConfig::default().spec;
            let (indexed, _) = kalon_align::dpo::build_dpo(
                &data,
                &encoder,
                &[query],
                &kalon_sim_llm::WorldRephraser::default(),
                PromptVariant::Detail,
                &teacher,
                &spec,
            )
            .unwrap();
            indexed
                .iter()
                .map(|p| {
                    (
                        data.pairs.ids[p.winner].clone(),
                        data.pairs.ids[p.loser].clone(),
                    )
                })
                .collect::<std::collections::BTreeSet<_>>()
        })
        .await
        .unwrap()
    };
    assert!(
        offline.len() >= 10,
        "a D_po matrix gives pairs: {}",
        offline.len()
    );

    let cache = tempfile::tempdir().unwrap();
    let mut config = builder_config(&env);
    config.dpo = true;
    config.dataset = world.world.path().to_owned();
    config.teacher = Some(kalon_preferences::Teacher::Lmm);
    config.max_backoff_ms = 300;
    config.model_cache = Some(cache.path().to_owned());
    // first the teacher is down: the query waits, nothing is lost
    let mut down = kalon_llm::LlmConfig::new("http://127.0.0.1:9", "kalon-sim-1");
    down.max_retries = 0;
    down.timeout = Duration::from_secs(2);
    let (stop, task) = start(config.clone(), Some(down));
    let event = rephrased(&query, &detail);
    env.send(vec![kalon_kafka::Outgoing {
        topic: env.kafka.topic(QueryRephrased::TOPIC),
        key: Some(query.clone().into_bytes()),
        payload: event.to_json(),
        headers: None,
    }])
    .await;
    wait_until(
        &env.pool,
        "SELECT count(*) FROM dpo_queue WHERE state = 'pending' AND attempts >= 2 AND last_error IS NOT NULL",
        1,
        Duration::from_secs(120),
    )
    .await;
    let _ = stop.send(());
    task.await.unwrap();
    let dpo_pairs = "SELECT count(*) FROM preference_pairs WHERE source = 'dpo'";
    let none: i64 = sqlx::query_scalar(dpo_pairs)
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(none, 0);

    // the teacher is back: the same query makes its pairs, once
    let (stop, task) = start(config, Some(good));
    wait_until(
        &env.pool,
        "SELECT count(*) FROM dpo_queue WHERE state = 'done'",
        1,
        Duration::from_secs(180),
    )
    .await;
    let _ = stop.send(());
    task.await.unwrap();
    let live: Vec<(String, String, String, Option<String>, serde_json::Value)> = sqlx::query_as(
        "SELECT winner, loser, query, model_version, provenance FROM preference_pairs WHERE source = 'dpo'",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    let live_set: std::collections::BTreeSet<(String, String)> = live
        .iter()
        .map(|(w, l, ..)| (w.clone(), l.clone()))
        .collect();
    assert_eq!(
        live_set, offline,
        "live D_po differs from the offline construction"
    );
    assert_eq!(live.len(), offline.len(), "no pair twice");
    for (_, _, q, version, provenance) in &live {
        assert_eq!(q, &query, "pairs are for the ORIGINAL query");
        assert_eq!(version.as_deref(), Some("base"));
        assert_eq!(provenance["rephrased"], serde_json::json!(detail));
        assert_eq!(provenance["teacher"], serde_json::json!("lmm-judge"));
    }
    let (state, pairs_col): (String, i32) = sqlx::query_as("SELECT state, pairs FROM dpo_queue")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(
        (state.as_str(), pairs_col as usize),
        ("done", offline.len())
    );
    env.cleanup().await;
}

#[tokio::test]
async fn position_bias_estimated_from_the_tables_is_the_simulated_peoples_curve() {
    // 300 training queries x 500 searches, each list with search's
    // exploration swap; the people examine rank r with probability 1/r^0.8
    let traffic = kalon_tests::traffic::Traffic::generate(23, 300, 500, 10);
    let env = TestEnv::new().await;
    let mut bulk = Bulk::default();
    for list in &traffic.lists {
        bulk.impressions.push((
            Uuid::now_v7(),
            list.request_id.clone(),
            list.query.clone(),
            serde_json::to_string(&list.shown).unwrap(),
        ));
        for &rank in &list.clicks {
            bulk.clicks.push((
                Uuid::now_v7(),
                list.request_id.clone(),
                list.shown[rank as usize - 1].image_id.clone(),
                rank as i32,
            ));
        }
    }
    bulk.insert(&env.pool).await;

    let config = builder_config(&env);
    let started = Instant::now();
    let id = kalon_preferences::propensity::estimate_and_store(&env.pool, &config)
        .await
        .unwrap()
        .expect("an estimate");
    let seconds = started.elapsed().as_secs_f64();
    let curve = kalon_preferences::propensity::Curve::latest(&env.pool, prior())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(curve.id(), Some(id));
    let (impressions_seen, estimate): (i64, serde_json::Value) =
        sqlx::query_as("SELECT impressions, estimate FROM propensity_estimates WHERE id = $1")
            .bind(id)
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(impressions_seen as usize, traffic.lists.len());
    let estimate: kalon_align::propensity::Estimate = serde_json::from_value(estimate).unwrap();
    println!(
        "{} lists, {} clicks; estimated from the tables in {seconds:.1}s",
        traffic.lists.len(),
        bulk.clicks.len()
    );
    println!("rank  truth  estimate  95% interval   rel.err");
    let truth = |rank: u32| 1.0 / f64::from(rank).powf(traffic.users.position_bias);
    let mut worst = 0.0f64;
    for rank in 1..=10u32 {
        let r = estimate.rank(rank).unwrap();
        let theta = r.theta.expect("every rank 1-10 is estimated");
        let error = (theta - truth(rank)).abs() / truth(rank);
        worst = worst.max(error);
        println!(
            "{rank:>4}  {:.3}  {theta:.3}     {:.3}-{:.3}  {:>6.1}%",
            truth(rank),
            r.low.unwrap_or(f64::NAN),
            r.high.unwrap_or(f64::NAN),
            100.0 * error
        );
    }
    assert!(
        worst <= 0.10,
        "the estimate from the tables is {:.1}% off the truth at worst, more than 10%",
        100.0 * worst
    );
    // click pairs are weighted with it: 1 / theta(rank), not the prior
    use kalon_align::feedback::ClickWeight;
    for rank in 2..=10u32 {
        let want = (1.0 / estimate.theta(rank).unwrap()).min(10.0);
        assert!((curve.weight(rank) - want).abs() < 1e-12, "rank {rank}");
    }
    let quick = Timing {
        quiet: chrono::Duration::seconds(1),
        expire_after: chrono::Duration::seconds(2),
        lookback: chrono::Duration::hours(3),
    };
    clicks::pass(&env.pool, quick, 5000, &curve).await.unwrap();
    let rows: Vec<(f64, serde_json::Value)> = sqlx::query_as(
        "SELECT weight, provenance FROM preference_pairs WHERE source = 'click' LIMIT 500",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert!(!rows.is_empty());
    for (weight, provenance) in rows {
        let rank = provenance["winner_rank"].as_u64().unwrap() as u32;
        assert!((weight - curve.weight(rank)).abs() < 1e-9, "{provenance}");
    }
    env.cleanup().await;
}
