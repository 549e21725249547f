//! The console in a real headless browser (Debian's chromium through
//! chromedriver) against running parts: search serving a promoted version
//! and a canary's candidate from Postgres, simulated people searching it,
//! their feedback through Kafka and ingest, the canary controller with its
//! admin API, the simulated LLM as the judge. The overview shows what is
//! served, the comparison shows two rows of real images, a canary action
//! without the operator's token is refused and with it is recorded and
//! shown; the console's API survives schemathesis. Screenshots go to
//! `$CARGO_TARGET_TMPDIR/console-screenshots/` (not in git).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use kalon_canary::store::{self as canary_store, Status};
use kalon_canary::{CanaryConfig, Controller};
use kalon_console::{Console, ConsoleConfig};
use kalon_events::{GateOutcome, ModelRegistered, TopicPayload};
use kalon_kafka::Outgoing;
use kalon_registry::{lifecycle, store};
use kalon_sim_users::{Population, UsersConfig};
use kalon_tests::search::{self as fixture};
use kalon_tests::webdriver::Browser;
use kalon_tests::TestEnv;
use kalonctl::quality::{version_of_quality, Quality};
use serde_json::json;

const WORLD_SEED: u64 = 21;
const IMAGES: usize = 300;
const TOKEN: &str = "console-op-s3cret";
const WAIT: Duration = Duration::from_secs(60);

fn screenshots() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("console-screenshots")
}

async fn announce(env: &TestEnv, version: &str) {
    let event = ModelRegistered {
        event_id: uuid::Uuid::now_v7(),
        occurred_at: chrono::Utc::now(),
        model_version: version.into(),
        parent_version: Some("ref-a".into()),
        training_run_id: None,
        artifact_uri: "file:///nowhere/artifact".into(),
        artifact_sha256: "0".repeat(64),
        dimension: 64,
        gate: GateOutcome::Passed,
    };
    env.send(vec![Outgoing {
        topic: env.kafka.topic(ModelRegistered::TOPIC),
        key: Some(version.as_bytes().to_vec()),
        payload: event.to_json(),
        headers: None,
    }])
    .await;
}

/// A canary that stays on its first step (the test acts on it), holding
/// with fresh evidence every second: nothing decides on its own (a
/// loaded CI machine once tripped the latency guardrail within seconds).
fn controller_config(env: &TestEnv, search_url: &str) -> CanaryConfig {
    let mut config = CanaryConfig::new(
        &env.database_url,
        &env.kafka.brokers,
        &env.kafka.topic_prefix,
    );
    config.consumer.group_id = format!("{}kalon-canary", env.kafka.topic_prefix);
    config.consumer.health_addr = "127.0.0.1:0".parse().unwrap();
    config.admin_addr = "127.0.0.1:0".parse().unwrap();
    config.admin_token = Some(kalon_service::Secret::new(TOKEN.to_owned()));
    config.ladder = vec![0.3, 0.6];
    config.min_step_s = 3600;
    config.alpha = 1e-12;
    config.p99_ratio = 1e6;
    config.p99_slack_ms = 1e9;
    config.settle_s = 1;
    config.tick_ms = 300;
    config.hold_every_s = 1;
    config.min_sessions = 20;
    config.min_decisive = 10;
    config.search_url = vec![search_url.to_owned()];
    config
}

async fn wait_for(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let started = Instant::now();
    while !done().await {
        assert!(started.elapsed() < WAIT, "{what}: not within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_shows_the_loop_compares_two_versions_and_acts_on_a_canary_with_the_token() {
    let env = TestEnv::new().await;
    let world = fixture::search_world(IMAGES);
    fixture::index(&env, &world, "ref-a", world.parent.path(), false).await;
    lifecycle::promote(&env.pool, "ref-a", "test", "the first stable", json!({}))
        .await
        .unwrap();
    store::set_deployment(&env.pool, "ref-a", "main", 1.0)
        .await
        .unwrap();
    version_of_quality(
        &env.pool,
        world.parent.path(),
        "ref-a",
        "good",
        WORLD_SEED,
        Quality::Oracle { mix: 0.9 },
    )
    .await;
    let search = fixture::serve(fixture::config(&env, &world)).await;
    let search_url = search.url("");
    let ingest = kalon_ingest::Ingest::build(env.ingest_config())
        .await
        .unwrap();
    let ingesting = kalon_tests::Background::spawn(|stopped| ingest.run(stopped));
    let controller = Controller::build(controller_config(&env, &search_url), None)
        .await
        .unwrap();
    let admin = format!("http://{}", controller.admin_addr());
    let controlling = kalon_tests::Background::spawn(|stopped| controller.run(stopped));
    // the judge the comparison page asks
    let mut sim = kalon_sim_llm::SimConfig::new(WORLD_SEED, IMAGES);
    sim.world_dir = Some(world.world.path().to_owned());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let llm_server = kalon_sim_llm::SimServer::start(sim, listener)
        .await
        .unwrap();
    let mut llm = kalon_llm::LlmConfig::new(llm_server.base_url(), "kalon-sim-1");
    llm.rate_per_s = 1e6;
    llm.burst = 1_000_000;

    // data: a canary of `good` in flight, people searching both versions
    announce(&env, "good").await;
    let mut people = UsersConfig::new(&search_url, WORLD_SEED, IMAGES);
    people.users = 200;
    people.sessions = 1_000_000;
    people.duration = Some(Duration::from_secs(240));
    people.concurrency = 4;
    people.behaviour.rating_rate = 0.2;
    let people = tokio::spawn(async move {
        Population::new(people).unwrap().run(|_| {}).await;
    });
    wait_for("the canary of good runs and has held with evidence", async || {
        let running = canary_store::by_candidate(&env.pool, "good")
            .await
            .unwrap()
            .is_some_and(|c| c.status == Status::Running);
        let (holds,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM canary_decisions WHERE action = 'hold' AND evidence <> '[]'::jsonb",
        )
        .fetch_one(&env.pool)
        .await
        .unwrap();
        running && holds >= 2
    })
    .await;

    let mut config = ConsoleConfig::new(&env.database_url);
    config.search_url = search_url.clone();
    config.canary_url = admin.clone();
    config.admin_token = Some(kalon_service::Secret::new(TOKEN.to_owned()));
    config.refresh_ms = 1000;
    let console = Console::build(config, Some(llm)).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let serving = kalon_tests::Background::spawn(|stopped| console.serve(listener, stopped));

    // the API refuses a canary action without the operator's token, and
    // with a wrong one, before anything reaches the canary
    let http = reqwest::Client::new();
    let refused = http
        .post(format!("{url}/api/canary/pause"))
        .header("content-type", "application/json")
        .body(json!({ "reason": "no token" }).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    assert!(refused.headers().contains_key("www-authenticate"));
    let wrong = http
        .post(format!("{url}/api/canary/pause"))
        .header("authorization", "Bearer not-it")
        .header("content-type", "application/json")
        .body(json!({ "reason": "wrong token" }).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 403);
    let judge_refused = http
        .post(format!("{url}/api/judge"))
        .header("content-type", "application/json")
        .body(json!({ "query": "a harbour", "a": "ref-a", "b": "good" }).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(judge_refused.status(), 401, "the judge costs tokens");

    let browser = Browser::start().await;
    let shots = screenshots();

    // overview: the stages' figures and what search serves
    browser.goto(&format!("{url}/#overview")).await;
    browser
        .wait_until(
            "document.querySelector('#serving tr[data-version=\"ref-a\"]') && document.querySelector('#serving tr[data-version=\"good\"]')",
            WAIT,
            "the overview lists both served versions",
        )
        .await;
    browser
        .wait_until(
            "parseFloat(document.querySelector('#stage-events .figure').textContent) > 0",
            WAIT,
            "the overview shows impressions per second",
        )
        .await;
    let canary_stage = browser.text("#stage-canary").await;
    assert!(
        canary_stage.contains("good") && canary_stage.contains("30%"),
        "the canary stage shows the candidate at its first step: {canary_stage}"
    );
    let serving_text = browser.text("#serving").await;
    assert!(
        serving_text.contains("main") && serving_text.contains("70%"),
        "the stable serves 70% as `main`: {serving_text}"
    );
    browser.screenshot(&shots.join("overview.png")).await;

    // compare: the stable and the candidate's top-8 side by side, real images
    browser.goto(&format!("{url}/#compare")).await;
    browser
        .wait_until(
            "document.querySelector('#compare-a').value === 'ref-a' && document.querySelector('#compare-b').value === 'good'",
            WAIT,
            "the comparison defaults to the stable and the candidate",
        )
        .await;
    browser
        .type_into("#compare-query", "a quiet harbour at dusk")
        .await;
    browser.click("#compare-go").await;
    browser
        .wait_until(
            "['#row-a', '#row-b'].every((row) => { const imgs = document.querySelectorAll(row + ' .hit img'); \
             return imgs.length === 8 && Array.from(imgs).every((i) => i.complete && i.naturalWidth > 0); })",
            WAIT,
            "two rows of eight loaded images",
        )
        .await;
    assert_eq!(browser.text("#row-a-title").await, "ref-a");
    assert_eq!(browser.text("#row-b-title").await, "good");
    let ids = browser
        .script(
            "return ['#row-a', '#row-b'].map((row) => Array.from(document.querySelectorAll(row + ' .hit')).map((h) => h.dataset.image))",
        )
        .await;
    assert_ne!(ids[0], ids[1], "the two versions rank differently: {ids}");
    // the judge, with the operator's token
    browser.type_into("#token", TOKEN).await;
    browser.click("#judge-go").await;
    browser
        .wait_until(
            "document.querySelectorAll('#judge-result [data-aspect]').length === 2",
            WAIT,
            "the judge's verdict on both aspects",
        )
        .await;
    browser.screenshot(&shots.join("compare.png")).await;

    // canary: the evidence charted; an action without the token refused,
    // with it recorded and shown
    let history = kalon_canary::ops::history(&env.pool, 1, false)
        .await
        .unwrap();
    assert_eq!(
        history[0].canary.status,
        Status::Running,
        "the canary must still run for the test to act on it:\n{}",
        kalon_canary::ops::render(&history[0])
    );
    browser.type_into("#token", "").await;
    browser.goto(&format!("{url}/#canary")).await;
    browser
        .wait_until(
            "document.querySelector('#canary-title').textContent.startsWith('good against ref-a') \
             && document.querySelectorAll('#chart-primary circle').length >= 2 \
             && document.querySelectorAll('#chart-interleaving circle').length >= 1",
            WAIT,
            "the canary with its charts",
        )
        .await;
    browser.type_into("#token", "").await;
    browser
        .type_into("#action-reason", "checking the candidate's rows by eye")
        .await;
    browser.click("button[data-action=\"pause\"]").await;
    browser
        .wait_until(
            "document.querySelector('#action-result').className === 'refused'",
            WAIT,
            "the pause without a token is refused",
        )
        .await;
    let refusal = browser.text("#action-result").await;
    assert!(refusal.contains("token"), "{refusal}");
    let overrides = || async {
        sqlx::query_as::<_, (String, bool, String, String)>(
            "SELECT action, automatic, actor, reason FROM canary_decisions WHERE NOT automatic",
        )
        .fetch_all(&env.pool)
        .await
        .unwrap()
    };
    assert!(
        overrides().await.is_empty(),
        "nothing recorded without the token"
    );
    browser.type_into("#token", TOKEN).await;
    browser.click("button[data-action=\"pause\"]").await;
    browser
        .wait_until(
            "document.querySelector('#action-result').className === 'ok' \
             && document.querySelector('#decisions tr[data-action=\"pause\"]')",
            WAIT,
            "the pause is recorded and in the history",
        )
        .await;
    let recorded = overrides().await;
    assert!(
        matches!(recorded.as_slice(), [(action, false, actor, reason)]
            if action == "pause" && actor == "console" && reason.contains("checking the candidate's rows by eye")),
        "one pause by the console with the reason typed: {recorded:?}"
    );
    wait_for("the controller pauses the canary", async || {
        canary_store::by_candidate(&env.pool, "good")
            .await
            .unwrap()
            .is_some_and(|c| c.status == Status::Paused)
    })
    .await;
    browser
        .wait_until(
            "document.querySelector('#canary-status').textContent.includes('paused')",
            WAIT,
            "the page shows the canary paused",
        )
        .await;
    browser.screenshot(&shots.join("canary.png")).await;

    // models: the registry and a version's lineage
    browser.goto(&format!("{url}/#models")).await;
    browser
        .wait_until(
            "document.querySelector('#models tr[data-version=\"good\"]')",
            WAIT,
            "the registry lists the candidate",
        )
        .await;
    browser.click("#models tr[data-version=\"good\"]").await;
    browser
        .wait_until(
            "Array.from(document.querySelectorAll('#lineage .generation[data-version=\"good\"] li')) \
             .some((li) => li.textContent.includes('indexed -> canary by kalon-canary'))",
            WAIT,
            "good's lineage with the canary's transition",
        )
        .await;
    browser.screenshot(&shots.join("models.png")).await;
    browser.close().await;
    eprintln!("screenshots in {}", shots.display());

    // the console's API: no server error under schemathesis
    kalon_tests::schemathesis(&format!("{url}/openapi.json"), 11).await;

    people.abort();
    serving.stop().await.unwrap();
    controlling.stop().await.unwrap();
    ingesting.stop().await.unwrap();
    search.shutdown().await;
    env.cleanup().await;
}
