//! The canary controller against real parts: search serving the versions
//! from Postgres, simulated people searching it over HTTP, their feedback
//! through Kafka and ingest into Postgres, and the controller deciding from
//! those tables. A better candidate is promoted and a worse one rolled back
//! with no person involved; a controller killed with SIGKILL at each step
//! resumes without repeating or losing a decision; the admin API needs the
//! operator's token.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use kalon_canary::store::{self as canary_store, Status};
use kalon_canary::{CanaryConfig, Controller};
use kalon_events::{CanaryDecision, GateOutcome, ModelRegistered, TopicPayload};
use kalon_kafka::Outgoing;
use kalon_registry::lifecycle::{self, State};
use kalon_registry::store;
use kalon_sim_users::{Population, UsersConfig};
use kalon_tests::search::{self as fixture, SearchWorld};
use kalon_tests::TestEnv;
use kalonctl::quality::{version_of_quality, Quality};
use serde_json::json;

const WORLD_SEED: u64 = 21;
const IMAGES: usize = 300;

/// `ref-a` indexed, promoted and serving everything as `main`; `good`
/// (oracle-informed embeddings) and `bad` (random ones) registered and
/// indexed, not deployed.
async fn world() -> (TestEnv, SearchWorld) {
    let env = TestEnv::new().await;
    let world = fixture::search_world(IMAGES);
    fixture::index(&env, &world, "ref-a", world.parent.path(), false).await;
    lifecycle::promote(&env.pool, "ref-a", "test", "the first stable", json!({}))
        .await
        .unwrap();
    store::set_deployment(&env.pool, "ref-a", "main", 1.0)
        .await
        .unwrap();
    let dir = world.parent.path();
    version_of_quality(
        &env.pool,
        dir,
        "ref-a",
        "good",
        WORLD_SEED,
        Quality::Oracle { mix: 0.9 },
    )
    .await;
    version_of_quality(
        &env.pool,
        dir,
        "ref-a",
        "bad",
        WORLD_SEED,
        Quality::Random { seed: 3 },
    )
    .await;
    (env, world)
}

fn registered(version: &str) -> Outgoing {
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
    Outgoing {
        topic: String::new(),
        key: Some(version.as_bytes().to_vec()),
        payload: event.to_json(),
        headers: None,
    }
}

async fn announce(env: &TestEnv, version: &str) {
    let mut message = registered(version);
    message.topic = env.kafka.topic(ModelRegistered::TOPIC);
    env.send(vec![message]).await;
}

/// Fast settings: a two-step ladder, short minimum steps, small minimum
/// samples (the effects here are large), interleaving on half the
/// candidate's traffic.
fn controller_config(env: &TestEnv, search_url: &str) -> CanaryConfig {
    let mut config = CanaryConfig::new(
        &env.database_url,
        &env.kafka.brokers,
        &env.kafka.topic_prefix,
    );
    config.consumer.group_id = format!("{}kalon-canary", env.kafka.topic_prefix);
    config.consumer.health_addr = "127.0.0.1:0".parse().unwrap();
    config.admin_addr = "127.0.0.1:0".parse().unwrap();
    config.ladder = vec![0.2, 0.5];
    config.min_step_s = 2;
    config.settle_s = 1;
    config.tick_ms = 300;
    config.hold_every_s = 2;
    config.min_sessions = 60;
    config.min_decisive = 20;
    config.search_url = vec![search_url.to_owned()];
    config
}

/// Sessions of simulated people for up to `duration`, in the background.
fn people(search_url: &str, seed: u64, duration: Duration) -> tokio::task::JoinHandle<()> {
    let mut config = UsersConfig::new(search_url, WORLD_SEED, IMAGES);
    config.seed = seed;
    config.users = 400;
    config.sessions = 1_000_000;
    config.duration = Some(duration);
    config.concurrency = 6;
    config.behaviour.rating_rate = 0.2;
    tokio::spawn(async move {
        Population::new(config).unwrap().run(|_| {}).await;
    })
}

async fn wait_for_status(env: &TestEnv, candidate: &str, timeout: Duration) -> Status {
    let start = Instant::now();
    loop {
        if let Some(c) = canary_store::by_candidate(&env.pool, candidate)
            .await
            .unwrap()
        {
            if c.status.finished() {
                return c.status;
            }
        }
        if start.elapsed() > timeout {
            let history = kalon_canary::ops::history(&env.pool, 5, false)
                .await
                .unwrap();
            let text: Vec<String> = history.iter().map(kalon_canary::ops::render).collect();
            panic!(
                "{candidate}'s canary did not finish in {timeout:?}:\n{}",
                text.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn client() -> reqwest::Client {
    kalon_telemetry::install_crypto_provider();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// The versions a search replica serves with a weight above zero.
async fn served(http: &reqwest::Client, url: &str) -> Vec<(String, f64)> {
    let bytes = http
        .get(format!("{url}/readyz"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    body["variants"]
        .as_array()
        .map(|v| {
            v.iter()
                .filter(|v| v["weight"].as_f64().unwrap_or(0.0) > 0.0)
                .map(|v| {
                    (
                        v["model_version"].as_str().unwrap().to_owned(),
                        v["weight"].as_f64().unwrap(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_better_candidate_is_promoted_and_a_worse_one_rolled_back_with_no_person() {
    let (env, world) = world().await;
    let search = fixture::serve(fixture::config(&env, &world)).await;
    let url = search.url("");
    let ingest = kalon_ingest::Ingest::build(env.ingest_config())
        .await
        .unwrap();
    let ingesting = kalon_tests::Background::spawn(|stopped| ingest.run(stopped));
    let controller = Controller::build(controller_config(&env, &url), None)
        .await
        .unwrap();
    let controlling = kalon_tests::Background::spawn(|stopped| controller.run(stopped));
    let http = client();

    // a better candidate: promoted, serving everything as `main`
    announce(&env, "good").await;
    let users = people(&url, 1, Duration::from_secs(300));
    assert_eq!(
        wait_for_status(&env, "good", Duration::from_secs(300)).await,
        Status::Promoted
    );
    users.abort();
    let good = store::version(&env.pool, "good").await.unwrap().unwrap();
    assert_eq!(good.state, State::Promoted);
    assert_eq!(
        store::version(&env.pool, "ref-a")
            .await
            .unwrap()
            .unwrap()
            .state,
        State::Retired,
        "the old stable retired by the promotion"
    );
    let canary = canary_store::by_candidate(&env.pool, "good")
        .await
        .unwrap()
        .unwrap();
    let moves = canary_store::decisions(&env.pool, canary.id, true)
        .await
        .unwrap();
    let actions: Vec<&str> = moves.iter().map(|d| d.action.as_str()).collect();
    assert_eq!(actions, ["start", "advance", "promote"], "{moves:#?}");
    let promote = moves.last().unwrap();
    assert!(promote.automatic);
    assert!(
        promote
            .evidence
            .iter()
            .any(|e| e.decision == "significantly_better"),
        "promoted on a significant gain: {promote:#?}"
    );
    for metric in ["ctr", "interleaving", "error_rate", "p99_latency_ms"] {
        assert!(
            promote.evidence.iter().any(|e| e.metric == metric),
            "{metric} in the evidence"
        );
    }
    let start = Instant::now();
    while served(&http, &url).await != vec![("good".to_owned(), 1.0)] {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "search serves {:?}",
            served(&http, &url).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // a worse candidate: rolled back, and search stops serving it fast
    announce(&env, "bad").await;
    let users = people(&url, 2, Duration::from_secs(300));
    assert_eq!(
        wait_for_status(&env, "bad", Duration::from_secs(300)).await,
        Status::RolledBack
    );
    let rolled_at = Instant::now();
    let canary = canary_store::by_candidate(&env.pool, "bad")
        .await
        .unwrap()
        .unwrap();
    let last = canary_store::last_decision(&env.pool, canary.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(last.action.as_str(), "rollback");
    assert!(
        last.reason.contains("significant loss") || last.reason.contains("guardrail"),
        "{}",
        last.reason
    );
    loop {
        let serving = served(&http, &url).await;
        if serving.iter().all(|(v, _)| v != "bad") {
            break;
        }
        let since = (chrono::Utc::now() - last.at).to_std().unwrap_or_default();
        assert!(
            since < Duration::from_secs(10),
            "bad still served {since:?} after the rollback: {serving:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let since_decision = (chrono::Utc::now() - last.at).to_std().unwrap_or_default();
    println!(
        "rollback reached search {since_decision:?} after the decision (seen {:?} after)",
        rolled_at.elapsed()
    );
    users.abort();
    assert_eq!(
        store::version(&env.pool, "bad")
            .await
            .unwrap()
            .unwrap()
            .state,
        State::RolledBack
    );
    let history = kalon_canary::ops::history(&env.pool, 2, false)
        .await
        .unwrap();
    let text: Vec<String> = history.iter().map(kalon_canary::ops::render).collect();
    println!("{}", text.join("\n"));
    // what `kalonctl canary history` prints: each move and the figures behind the last
    assert!(
        text[0].contains("rolled back") && text[0].contains("significantly_worse"),
        "{}",
        text[0]
    );
    assert!(
        text[1].contains("promote ") && text[1].contains("interleaving"),
        "{}",
        text[1]
    );

    // every decision was published once per event id
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM canary_decisions")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    let start = Instant::now();
    loop {
        let unpublished: i64 =
            sqlx::query_scalar("SELECT count(*) FROM canary_decisions WHERE published_at IS NULL")
                .fetch_one(&env.pool)
                .await
                .unwrap();
        if unpublished == 0 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (kafka, topic) = (env.kafka.clone(), env.kafka.topic(CanaryDecision::TOPIC));
    let messages = tokio::task::spawn_blocking(move || {
        kalon_tests::read_topic(&kafka, &topic, rows as usize, Duration::from_secs(30))
    })
    .await
    .unwrap();
    let ids: HashSet<uuid::Uuid> = messages
        .iter()
        .map(|m| CanaryDecision::decode(&m.payload).unwrap().event_id)
        .collect();
    assert_eq!(ids.len() as i64, rows);

    controlling.stop().await.unwrap();
    ingesting.stop().await.unwrap();
    search.shutdown().await;
    env.cleanup().await;
}

/// Two versions registered without encoders (the controller never loads
/// one; search is not running): `stable` promoted and serving, `cand`
/// indexed.
async fn bare_versions(env: &TestEnv) {
    for version in ["stable", "cand"] {
        store::register_version(&env.pool, version, "/nonexistent", None, 64)
            .await
            .unwrap();
        sqlx::query("UPDATE model_versions SET images_indexed = 1 WHERE version = $1")
            .bind(version)
            .execute(&env.pool)
            .await
            .unwrap();
    }
    lifecycle::promote(&env.pool, "stable", "test", "the first stable", json!({}))
        .await
        .unwrap();
    store::set_deployment(&env.pool, "stable", "main", 1.0)
        .await
        .unwrap();
}

/// `n` interleaved impressions of `cand` happening now, each with a click
/// on the candidate's first result: decisive wins for the candidate.
async fn candidate_wins(env: &TestEnv, n: usize) {
    for _ in 0..n {
        let request = uuid::Uuid::now_v7().to_string();
        let results = json!([
            { "image_id": "i1", "rank": 1, "score": 0.9, "team": "stable" },
            { "image_id": "i2", "rank": 2, "score": 0.8, "team": "candidate" },
            { "image_id": "i3", "rank": 3, "score": 0.7, "team": "candidate" },
            { "image_id": "i4", "rank": 4, "score": 0.6, "team": "stable" }
        ]);
        sqlx::query(
            "INSERT INTO impressions (event_id, occurred_at, request_id, session_id, query,
                 model_version, variant, results)
             VALUES ($1, now(), $2, $2, 'red flowers', 'cand', 'canary', $3::json)",
        )
        .bind(uuid::Uuid::now_v7())
        .bind(&request)
        .bind(results)
        .execute(&env.pool)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO clicks (event_id, occurred_at, request_id, image_id, rank)
             VALUES ($1, now(), $2, 'i2', 2)",
        )
        .bind(uuid::Uuid::now_v7())
        .bind(&request)
        .execute(&env.pool)
        .await
        .unwrap();
    }
}

async fn moves(env: &TestEnv) -> Vec<String> {
    sqlx::query_scalar("SELECT action FROM canary_decisions WHERE action <> 'hold' ORDER BY id")
        .fetch_all(&env.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_killed_at_each_step_resumes_without_repeating_or_losing_a_decision() {
    let env = TestEnv::new().await;
    bare_versions(&env).await;
    announce(&env, "cand").await;
    let binary = kalon_tests::workspace_binary("kalon-canary");
    let spawn = || {
        std::process::Command::new(&binary)
            .env("DATABASE_URL", &env.database_url)
            .env("KALON_KAFKA_BROKERS", &env.kafka.brokers)
            .env("KALON_TOPIC_PREFIX", &env.kafka.topic_prefix)
            .env(
                "KALON_CANARY_GROUP",
                format!("{}kalon-canary", env.kafka.topic_prefix),
            )
            .env("KALON_CANARY_HEALTH_ADDR", "127.0.0.1:0")
            .env("KALON_CANARY_ADMIN_ADDR", "127.0.0.1:0")
            .env("KALON_CANARY_LADDER", "0.1,0.2,0.3,0.4")
            .env("KALON_CANARY_EVIDENCE", "interleaving")
            .env("KALON_CANARY_MIN_STEP_S", "1")
            .env("KALON_CANARY_SETTLE_S", "0")
            .env("KALON_CANARY_TICK_MS", "100")
            .env("KALON_CANARY_MIN_DECISIVE", "20")
            .env("RUST_LOG", "warn")
            .spawn()
            .unwrap()
    };
    let expected = ["start", "advance", "advance", "advance", "promote"];
    let mut kills = 0;
    let start = Instant::now();
    while moves(&env).await.len() < expected.len() {
        let before = moves(&env).await.len();
        let mut child = spawn();
        // evidence keeps arriving; kill the moment a new step is decided
        loop {
            candidate_wins(&env, 10).await;
            if moves(&env).await.len() > before {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(240),
                "stuck at {:?}",
                moves(&env).await
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;
    }
    assert!(kills >= 4, "killed {kills} times");
    // one more life to apply and publish what the last kill interrupted
    let mut child = spawn();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let unpublished: i64 =
            sqlx::query_scalar("SELECT count(*) FROM canary_decisions WHERE published_at IS NULL")
                .fetch_one(&env.pool)
                .await
                .unwrap();
        let serving = store::deployments(&env.pool).await.unwrap();
        if unpublished == 0 && serving.len() == 1 && serving[0].model_version == "cand" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not settled: {serving:?}, {unpublished} unpublished"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();

    assert_eq!(
        moves(&env).await,
        expected,
        "each step decided once, in order"
    );
    let steps: Vec<i32> = sqlx::query_scalar(
        "SELECT step_to FROM canary_decisions WHERE action <> 'hold' ORDER BY id",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(steps, [0, 1, 2, 3, 3]);
    let serving = store::deployments(&env.pool).await.unwrap();
    assert_eq!(
        (
            serving[0].variant.as_str(),
            serving[0].weight,
            serving[0].interleave
        ),
        ("main", 1.0, 0.0)
    );
    // each lifecycle move once
    let moved: Vec<(String, String)> = sqlx::query_as(
        "SELECT coalesce(from_state, ''), to_state FROM model_transitions
         WHERE model_version = 'cand' ORDER BY id",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    let moved: Vec<(&str, &str)> = moved
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    assert_eq!(
        moved,
        [
            ("", "indexed"),
            ("indexed", "canary"),
            ("canary", "promoted")
        ]
    );
    assert_eq!(
        store::version(&env.pool, "stable")
            .await
            .unwrap()
            .unwrap()
            .state,
        State::Retired
    );
    // no decision lost on the way to the topic (re-published ones carry
    // the same event id)
    let rows: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT event_id FROM canary_decisions")
        .fetch_all(&env.pool)
        .await
        .unwrap();
    let (kafka, topic) = (env.kafka.clone(), env.kafka.topic(CanaryDecision::TOPIC));
    let n = rows.len();
    let messages = tokio::task::spawn_blocking(move || {
        kalon_tests::read_topic(&kafka, &topic, n, Duration::from_secs(30))
    })
    .await
    .unwrap();
    let published: HashSet<uuid::Uuid> = messages
        .iter()
        .map(|m| CanaryDecision::decode(&m.payload).unwrap().event_id)
        .collect();
    assert_eq!(published, rows.into_iter().collect::<HashSet<_>>());
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_needs_the_operators_token_and_records_who_overrode_and_why() {
    let env = TestEnv::new().await;
    bare_versions(&env).await;
    announce(&env, "cand").await;
    let mut config = controller_config(&env, "http://127.0.0.1:9");
    config.search_url.clear();
    config.evidence = vec![kalon_canary::config::Evidence::Ab];
    config.admin_token = Some(kalon_service::Secret::new("op-s3cret".to_owned()));
    let controller = Controller::build(config, None).await.unwrap();
    let admin = format!("http://{}", controller.admin_addr());
    let controlling = kalon_tests::Background::spawn(|stopped| controller.run(stopped));
    let start = Instant::now();
    while canary_store::in_flight(&env.pool).await.unwrap().is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the canary never started"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let http = client();
    let pause = |token: Option<&str>| {
        let mut request = http
            .post(format!("{admin}/v1/canary/pause"))
            .header("content-type", "application/json")
            .body(json!({ "reason": "looking at the latency", "actor": "ana" }).to_string());
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send()
    };
    let response = pause(None).await.unwrap();
    assert_eq!(response.status(), 401);
    assert!(response.headers().contains_key("www-authenticate"));
    let body = response.text().await.unwrap();
    assert!(body.contains("Bearer"), "{body}");
    let response = pause(Some("guess")).await.unwrap();
    assert_eq!(response.status(), 403);
    let body = response.text().await.unwrap();
    assert!(
        !body.contains("op-s3cret"),
        "the token never echoes: {body}"
    );
    assert_eq!(
        canary_store::in_flight(&env.pool)
            .await
            .unwrap()
            .unwrap()
            .status,
        Status::Running,
        "refused calls changed nothing"
    );
    let response = pause(Some("op-s3cret")).await.unwrap();
    assert_eq!(response.status(), 200);
    let canary = canary_store::in_flight(&env.pool).await.unwrap().unwrap();
    assert_eq!(canary.status, Status::Paused);
    let last = canary_store::last_decision(&env.pool, canary.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (last.action.as_str(), last.actor.as_str(), last.automatic),
        ("pause", "ana", false)
    );
    assert!(last.reason.contains("looking at the latency"));
    // a second pause is a conflict, not a second decision
    assert_eq!(pause(Some("op-s3cret")).await.unwrap().status(), 409);

    // roll back by hand: the candidate's traffic goes to zero
    let response = http
        .post(format!("{admin}/v1/canary/rollback"))
        .bearer_auth("op-s3cret")
        .header("content-type", "application/json")
        .body(json!({ "reason": "bad smell", "candidate": "cand" }).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let start = Instant::now();
    loop {
        let serving = store::deployments(&env.pool).await.unwrap();
        let state = store::version(&env.pool, "cand")
            .await
            .unwrap()
            .unwrap()
            .state;
        let only_stable = serving
            .iter()
            .map(|d| (d.model_version.as_str(), d.weight))
            .eq([("stable", 1.0)]);
        if only_stable && state == State::RolledBack {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{serving:?} {state}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let bytes = http
        .get(format!("{admin}/v1/canary/history?holds=true"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let history: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    let actions: Vec<&str> = history["canaries"][0]["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["action"].as_str().unwrap())
        .filter(|a| *a != "hold")
        .collect();
    assert_eq!(actions, ["start", "pause", "rollback"]);

    // schemathesis against the OpenAPI description: no server error
    kalon_tests::schemathesis(&format!("{admin}/openapi.json"), 3).await;
    controlling.stop().await.unwrap();
    env.cleanup().await;
}

/// Impressions of `version` for `queries`, happening now (the LMM canary
/// samples its queries from the canary's impressions).
async fn searched(env: &TestEnv, version: &str, queries: &[String]) {
    for query in queries {
        let request = uuid::Uuid::now_v7().to_string();
        sqlx::query(
            "INSERT INTO impressions (event_id, occurred_at, request_id, session_id, query,
                 model_version, variant, results)
             VALUES ($1, now(), $2, $2, $3, $4, 'canary', '[]'::json)",
        )
        .bind(uuid::Uuid::now_v7())
        .bind(&request)
        .bind(query)
        .bind(version)
        .execute(&env.pool)
        .await
        .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lmm_judged_canary_alone_rolls_back_a_worse_candidate() {
    let (env, world) = world().await;
    // `good` is the stable version this time, `bad` the candidate
    lifecycle::promote(&env.pool, "good", "test", "the better model", json!({}))
        .await
        .unwrap();
    store::set_deployment(&env.pool, "good", "main", 1.0)
        .await
        .unwrap();
    let search = fixture::serve(fixture::config(&env, &world)).await;
    let mut sim = kalon_sim_llm::SimConfig::new(WORLD_SEED, IMAGES);
    sim.world_dir = Some(world.world.path().to_owned());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let llm_server = kalon_sim_llm::SimServer::start(sim, listener)
        .await
        .unwrap();
    let mut llm = kalon_llm::LlmConfig::new(llm_server.base_url(), "kalon-sim-1");
    llm.rate_per_s = 1e6;
    llm.burst = 1_000_000;
    let mut config = controller_config(&env, &search.url(""));
    config.evidence = vec![kalon_canary::config::Evidence::Lmm];
    config.dataset = Some(world.world.path().to_owned());
    config.min_decisive = 10;
    config.lmm_per_look = 8;
    let controller = Controller::build(config, Some(llm)).await.unwrap();
    let controlling = kalon_tests::Background::spawn(|stopped| controller.run(stopped));
    announce(&env, "bad").await;
    let queries = kalon_dataset::train_queries(world.world.path()).unwrap();
    let start = Instant::now();
    while canary_store::in_flight(&env.pool).await.unwrap().is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the canary never started"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    searched(&env, "bad", &queries[..60]).await;
    assert_eq!(
        wait_for_status(&env, "bad", Duration::from_secs(180)).await,
        Status::RolledBack
    );
    let canary = canary_store::by_candidate(&env.pool, "bad")
        .await
        .unwrap()
        .unwrap();
    let last = canary_store::last_decision(&env.pool, canary.id)
        .await
        .unwrap()
        .unwrap();
    println!(
        "{}",
        kalon_canary::ops::render(&kalon_canary::ops::status(&env.pool).await.unwrap().unwrap())
    );
    let lmm: Vec<&kalon_events::MetricEvidence> = last
        .evidence
        .iter()
        .filter(|e| e.kind == kalon_events::EvidenceKind::Lmm)
        .collect();
    assert_eq!(
        lmm.len(),
        2,
        "aesthetic and relevance: {:#?}",
        last.evidence
    );
    assert!(
        lmm.iter().any(|e| e.decision == "significantly_worse"),
        "{lmm:#?}"
    );
    assert!(
        last.evidence
            .iter()
            .all(|e| e.kind == kalon_events::EvidenceKind::Lmm
                || e.kind == kalon_events::EvidenceKind::Guardrail),
        "LMM evidence alone (and the guardrails)"
    );
    let (judged, tokens): (i64, i64) = sqlx::query_as(
        "SELECT count(*), coalesce(sum(tokens), 0)::bigint FROM canary_judgments WHERE canary_id = $1",
    )
    .bind(canary.id)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert!(
        judged >= 20 && tokens > 0,
        "{judged} verdicts, {tokens} tokens"
    );
    controlling.stop().await.unwrap();
    search.shutdown().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trainers_adapter_version_is_indexed_from_its_parent_then_canaried() {
    use kalon_registry::artifact::ArtifactStore;
    use kalon_registry::lifecycle::NewVersion;

    let (env, world) = world().await;
    // what the trainer does: the adapter export stored by content,
    // registered as trained from the promoted parent, gated
    let tmp = tempfile::tempdir().unwrap();
    let artifacts =
        ArtifactStore::from_url(&format!("file://{}", tmp.path().join("store").display())).unwrap();
    let stored = artifacts.put_dir(world.aligned.path()).await.unwrap();
    let version = lifecycle::register_trained(
        &env.pool,
        NewVersion {
            parent: Some("ref-a".into()),
            training_run_id: None,
            artifact: stored.clone(),
            dimension: stored.embedding_dim,
            actor: "kalon-trainer".into(),
            reason: "a test run".into(),
        },
    )
    .await
    .unwrap();
    lifecycle::gate(
        &env.pool,
        &version,
        true,
        json!({}),
        "kalon-trainer gate",
        "passed",
    )
    .await
    .unwrap();
    assert_eq!(
        store::version(&env.pool, &version)
            .await
            .unwrap()
            .unwrap()
            .images_indexed,
        0
    );
    let mut config = controller_config(&env, "http://127.0.0.1:9");
    config.search_url.clear();
    config.evidence = vec![kalon_canary::config::Evidence::Ab];
    config.dataset = Some(world.world.path().to_owned());
    config.model_cache = Some(tmp.path().join("cache"));
    let controller = Controller::build(config, None).await.unwrap();
    let controlling = kalon_tests::Background::spawn(|stopped| controller.run(stopped));
    announce(&env, &version).await;
    let start = Instant::now();
    let canary = loop {
        if let Some(c) = canary_store::in_flight(&env.pool).await.unwrap() {
            break c;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the canary never started"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(canary.candidate, version);
    assert_eq!(canary.stable.as_deref(), Some("ref-a"));
    let row = store::version(&env.pool, &version).await.unwrap().unwrap();
    assert_eq!(row.images_indexed as usize, IMAGES);
    let notes = sqlx::query_scalar::<_, Option<serde_json::Value>>(
        "SELECT index_notes FROM model_versions WHERE version = $1",
    )
    .bind(&version)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert!(
        notes
            .as_ref()
            .is_some_and(|n| n.to_string().contains("adapter-reuse")),
        "indexed from the parent's embeddings: {notes:?}"
    );
    // serving the first step
    let start = Instant::now();
    loop {
        let serving: Vec<(String, String, f64)> = store::deployments(&env.pool)
            .await
            .unwrap()
            .into_iter()
            .map(|d| (d.model_version, d.variant, d.weight))
            .collect();
        let want = vec![
            (version.clone(), "canary".to_owned(), 0.2),
            ("ref-a".to_owned(), "main".to_owned(), 0.8),
        ];
        let mut sorted = serving.clone();
        sorted.sort_by(|a, b| a.1.cmp(&b.1));
        if sorted == want
            && store::version(&env.pool, &version)
                .await
                .unwrap()
                .unwrap()
                .state
                == State::Canary
        {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{serving:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    controlling.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_candidate_supersedes_the_running_one_when_configured() {
    let env = TestEnv::new().await;
    bare_versions(&env).await;
    store::register_version(&env.pool, "cand2", "/nonexistent", None, 64)
        .await
        .unwrap();
    sqlx::query("UPDATE model_versions SET images_indexed = 1 WHERE version = 'cand2'")
        .execute(&env.pool)
        .await
        .unwrap();
    let mut config = controller_config(&env, "http://127.0.0.1:9");
    config.search_url.clear();
    config.evidence = vec![kalon_canary::config::Evidence::Interleaving];
    config.on_newer = kalon_canary::config::OnNewer::Supersede;
    let controller = Controller::build(config, None).await.unwrap();
    let controlling = kalon_tests::Background::spawn(|stopped| controller.run(stopped));
    announce(&env, "cand").await;
    let running = |candidate: &'static str| {
        let pool = env.pool.clone();
        async move {
            canary_store::in_flight(&pool)
                .await
                .unwrap()
                .is_some_and(|c| c.candidate == candidate)
        }
    };
    let start = Instant::now();
    while !running("cand").await {
        assert!(start.elapsed() < Duration::from_secs(30));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    announce(&env, "cand2").await;
    while !running("cand2").await {
        assert!(start.elapsed() < Duration::from_secs(60));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let first = canary_store::by_candidate(&env.pool, "cand")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.status, Status::Superseded);
    let last = canary_store::last_decision(&env.pool, first.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(last.action.as_str(), "supersede");
    assert!(last.reason.contains("cand2"), "{}", last.reason);
    // the superseded candidate serves nothing and is marked rolled back
    let start = Instant::now();
    loop {
        let serving: Vec<String> = store::deployments(&env.pool)
            .await
            .unwrap()
            .into_iter()
            .map(|d| d.model_version)
            .collect();
        let state = store::version(&env.pool, "cand")
            .await
            .unwrap()
            .unwrap()
            .state;
        if !serving.contains(&"cand".to_owned())
            && serving.contains(&"cand2".to_owned())
            && state == State::RolledBack
        {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{serving:?} {state}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    controlling.stop().await.unwrap();
    env.cleanup().await;
}
