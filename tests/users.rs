//! The simulated people (`sim/users`) against a running search service over
//! HTTP: they search with training queries only, click and rate by the
//! oracle, their feedback reaches its topics through search's API or produced
//! to Kafka directly, and the same seed gives the same people.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use kalon_registry::store;
use kalon_sim_users::{FeedbackRoute, Population, SessionOutcome, UsersConfig};
use kalon_tests::search as fixture;
use kalon_tests::TestEnv;
use kalon_world::text::Split;

/// What a session did, without the ids search makes up per request.
fn choices(outcomes: &[SessionOutcome]) -> BTreeMap<u64, (String, String, Vec<String>, String)> {
    outcomes
        .iter()
        .map(|o| {
            (
                o.session,
                (
                    o.user_id.clone(),
                    o.query.clone(),
                    o.shown.clone(),
                    format!("{:?} {:?}", o.clicks, o.ratings),
                ),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_people_search_over_http_and_their_feedback_reaches_the_topics() {
    let env = TestEnv::new().await;
    // the fixture's world: seed 21, 300 images
    let world = fixture::search_world(300);
    fixture::index(&env, &world, "ref-a", world.parent.path(), false).await;
    store::set_deployment(&env.pool, "ref-a", "control", 1.0)
        .await
        .unwrap();
    let running = fixture::serve(fixture::config(&env, &world)).await;

    let mut config = UsersConfig::new(&running.url(""), 21, 300);
    config.seed = 5;
    config.users = 10;
    config.sessions = 60;
    config.concurrency = 4;
    // rate often, so the test sees ratings
    config.behaviour.rating_rate = 0.5;
    let mut seen = Vec::new();
    let report = Population::new(config.clone())
        .unwrap()
        .run(|o| seen.push(o.clone()))
        .await;
    assert_eq!(
        (report.sessions, report.failed, report.unknown_images),
        (60, 0, 0)
    );
    let control = &report.variants["control"];
    assert_eq!(control.searches, 60);
    assert_eq!(control.shown, 60 * 10, "k = 10 results per search");
    assert!(control.clicks > 0 && control.ratings > 0, "{control:?}");
    assert!((control.ctr - control.clicks as f64 / 60.0).abs() < 1e-9);
    assert!(control.mean_beauty > 0.0 && control.mean_beauty < 1.0);
    assert!(control.mean_relevance >= 0.0 && control.mean_relevance <= 1.0);
    assert!(seen
        .iter()
        .all(|o| o.variant == "control" && o.model_version == "ref-a"));

    // training queries only; ten pseudonymous people
    let eval: HashSet<String> = kalon_world::QuerySet::generate(21, 160)
        .queries
        .into_iter()
        .filter(|q| q.split == Split::Eval)
        .map(|q| q.text)
        .collect();
    assert!(seen.iter().all(|o| !eval.contains(&o.query)));
    let people: HashSet<&str> = seen.iter().map(|o| o.user_id.as_str()).collect();
    assert_eq!(people.len(), 10);

    // the same people may post their feedback straight to Kafka
    let mut direct = config.clone();
    direct.seed = 7;
    direct.feedback = FeedbackRoute::Kafka(env.kafka.clone());
    let mut seen_direct = Vec::new();
    let report_direct = Population::new(direct)
        .unwrap()
        .run(|o| seen_direct.push(o.clone()))
        .await;
    assert_eq!((report_direct.sessions, report_direct.failed), (60, 0));
    let control_direct = &report_direct.variants["control"];
    assert!(control_direct.clicks > 0 && control_direct.ratings > 0);

    // every click and rating reached its topic (through the API or
    // produced), once
    let clicks = (control.clicks + control_direct.clicks) as usize;
    let ratings = (control.ratings + control_direct.ratings) as usize;
    let kafka = env.kafka.clone();
    let (click_messages, rating_messages) = tokio::task::spawn_blocking(move || {
        (
            kalon_tests::read_topic(
                &kafka,
                &kafka.topic("search.click.v1"),
                clicks + 1,
                Duration::from_secs(15),
            ),
            kalon_tests::read_topic(
                &kafka,
                &kafka.topic("search.rating.v1"),
                ratings + 1,
                Duration::from_secs(15),
            ),
        )
    })
    .await
    .unwrap();
    assert_eq!(
        (click_messages.len(), rating_messages.len()),
        (clicks, ratings)
    );
    let everyone = || seen.iter().chain(&seen_direct);
    let acknowledged: HashSet<String> = everyone()
        .flat_map(|o| o.feedback_event_ids.iter().cloned())
        .collect();
    let requests: HashSet<&str> = everyone().map(|o| o.request_id.as_str()).collect();
    for message in click_messages.iter().chain(&rating_messages) {
        let event: serde_json::Value = serde_json::from_slice(&message.payload).unwrap();
        assert!(acknowledged.contains(event["event_id"].as_str().unwrap()));
        assert!(requests.contains(event["request_id"].as_str().unwrap()));
    }

    // the same seed gives the same people making the same choices, at
    // another concurrency; another seed gives other sessions
    let mut again = Vec::new();
    let mut same = config.clone();
    same.concurrency = 1;
    Population::new(same)
        .unwrap()
        .run(|o| again.push(o.clone()))
        .await;
    assert_eq!(choices(&again), choices(&seen));
    let mut other = Vec::new();
    let mut reseeded = config;
    reseeded.seed = 6;
    Population::new(reseeded)
        .unwrap()
        .run(|o| other.push(o.clone()))
        .await;
    assert_ne!(choices(&other), choices(&seen));

    // a search service that is not there: every session fails, none hangs
    let mut nowhere = UsersConfig::new("http://127.0.0.1:9", 21, 300);
    nowhere.sessions = 3;
    let report = Population::new(nowhere).unwrap().run(|_| {}).await;
    assert_eq!((report.sessions, report.failed), (3, 3));

    running.shutdown().await;
    env.cleanup().await;
}
