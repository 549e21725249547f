//! The search service against a real Postgres, a real tansu broker and ONNX
//! Runtime: corpus embedding (with adapter reuse), the API in process and
//! over a socket, canary routing, exploration swaps recorded in the
//! impressions, team-draft interleaving of a canary with the promoted
//! version, pinned searches, per-version serving figures, hot swap under
//! load, impressions and feedback on their topics, Kafka outages, and a
//! schemathesis fuzz run against the service's own OpenAPI document.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use kalon_events::explore::Exploration;
use kalon_events::interleave::Team;
use kalon_registry::lifecycle::{self, State};
use kalon_registry::store;
use kalon_search::{router, AppState, Search, SearchResponse};
use kalon_tests::search::{self as fixture, SearchWorld};
use kalon_tests::TestEnv;
use tower::ServiceExt;

/// A test env with `ref-a` indexed (image tower) and deployed as `control`.
async fn setup(images: usize) -> (TestEnv, SearchWorld) {
    let env = TestEnv::new().await;
    let world = fixture::search_world(images);
    let indexed = fixture::index(&env, &world, "ref-a", world.parent.path(), false).await;
    assert_eq!(indexed.method, "tower");
    store::set_deployment(&env.pool, "ref-a", "control", 1.0)
        .await
        .unwrap();
    (env, world)
}

async fn call(app: &axum::Router, request: Request<Body>) -> (StatusCode, serde_json::Value) {
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let body = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    (status, body)
}

fn post(path: &str, body: impl Into<Body>) -> Request<Body> {
    Request::post(path)
        .header("content-type", "application/json")
        .body(body.into())
        .unwrap()
}

fn search_body(query: &str, session: &str) -> String {
    serde_json::json!({ "query": query, "k": 5, "session_id": session }).to_string()
}

/// A `POST /v1/search` for the top 5 of `query` in `session`, ready to send.
fn search_request(
    http: &reqwest::Client,
    running: &fixture::Running,
    query: &str,
    session: &str,
) -> reqwest::RequestBuilder {
    http.post(running.url("/v1/search"))
        .header("content-type", "application/json")
        .body(search_body(query, session))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adapter_version_reuses_the_parents_embeddings_and_matches_its_own_tower() {
    let (env, world) = setup(300).await;
    let reused = fixture::index(&env, &world, "ref-b", world.aligned.path(), false).await;
    assert_eq!(reused.method, "adapter-reuse");
    assert_eq!(reused.parent.as_deref(), Some("ref-a"));
    assert_eq!(reused.images, 300);
    let full = fixture::index(&env, &world, "ref-b-full", world.aligned.path(), true).await;
    assert_eq!(full.method, "tower");

    let a = store::load_embeddings(&env.pool, "ref-a", 64)
        .await
        .unwrap();
    let b = store::load_embeddings(&env.pool, "ref-b", 64)
        .await
        .unwrap();
    let b_full = store::load_embeddings(&env.pool, "ref-b-full", 64)
        .await
        .unwrap();
    assert_eq!(a.ids.len(), 300);
    assert_eq!(b.ids, b_full.ids);
    // the reused embeddings are what the aligned tower computes itself...
    let diff = kalon_tests::max_abs_diff(&b.data, &b_full.data);
    assert!(
        diff <= 1e-4,
        "adapter reuse differs from the tower by {diff}"
    );
    // ...and not the parent's
    assert!(kalon_tests::max_abs_diff(&a.data, &b.data) > 1e-2);
    let version = store::version(&env.pool, "ref-b").await.unwrap().unwrap();
    assert_eq!(version.parent.as_deref(), Some("ref-a"));
    assert_eq!(version.images_indexed, 300);

    // bad input: a bad version name, a missing encoder, an unindexed deploy
    let job = |version, dir| kalon_registry::indexer::IndexJob {
        version,
        encoder_dir: dir,
        images: std::path::Path::new("/nonexistent"),
        parent: None,
        force_tower: false,
        batch: 8,
        options: Box::leak(Box::default()),
    };
    let error = kalon_registry::indexer::index_version(
        &env.pool,
        job("no spaces allowed", world.parent.path()),
        |_, _| {},
    )
    .await
    .unwrap_err();
    assert!(
        error.to_string().contains("must be 1-64 characters"),
        "{error}"
    );
    let error = kalon_registry::indexer::index_version(
        &env.pool,
        job("v2", std::path::Path::new("/nonexistent/encoder")),
        |_, _| {},
    )
    .await
    .unwrap_err();
    assert!(
        error.to_string().contains("no encoder directory"),
        "{error}"
    );
    let error = store::set_deployment(&env.pool, "never-indexed", "x", 1.0)
        .await
        .unwrap_err();
    assert!(error.to_string().contains("not registered"), "{error}");
    let error = store::set_deployment(&env.pool, "ref-a", "control", f64::NAN)
        .await
        .unwrap_err();
    assert!(error.to_string().contains("weight"), "{error}");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_in_process_answers_and_refuses_bad_requests_with_a_message() {
    let (env, world) = setup(300).await;
    let search = Search::build(fixture::config(&env, &world)).await.unwrap();
    let app = router(search.state.clone());

    let (status, body) = call(&app, post("/v1/search", search_body("a red cat", "s1"))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let answer: SearchResponse = serde_json::from_value(body).unwrap();
    assert_eq!(answer.model_version, "ref-a");
    assert_eq!(answer.variant, "control");
    assert_eq!(answer.results.len(), 5);
    assert!(answer
        .results
        .windows(2)
        .all(|w| w[0].score >= w[1].score && w[1].rank == w[0].rank + 1));
    let first = &answer.results[0];
    assert_eq!(first.url, format!("/v1/images/{}", first.image_id));

    // the image file behind the URL
    let response = app
        .clone()
        .oneshot(Request::get(&first.url).body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "image/png");
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let file = std::fs::read(world.images().join(format!("{}.png", first.image_id))).unwrap();
    assert_eq!(bytes.as_ref(), file.as_slice());

    // malformed requests: 4xx with a message saying what is wrong
    let long = "x".repeat(600);
    let cases: Vec<(Request<Body>, StatusCode, &str)> = vec![
        (
            post("/v1/search", r#"{"query": "  "}"#),
            StatusCode::BAD_REQUEST,
            "must not be empty",
        ),
        (
            post("/v1/search", format!(r#"{{"query": "{long}"}}"#)),
            StatusCode::BAD_REQUEST,
            "more than the 512",
        ),
        (
            post("/v1/search", r#"{"query": "cat", "k": 0}"#),
            StatusCode::BAD_REQUEST,
            "k must be between 1 and 100",
        ),
        (
            post("/v1/search", r#"{"query": "cat", "k": 101}"#),
            StatusCode::BAD_REQUEST,
            "k must be between",
        ),
        (
            post("/v1/search", r#"{"query": "cat", "k": -1}"#),
            StatusCode::UNPROCESSABLE_ENTITY,
            "k",
        ),
        (
            post("/v1/search", r#"{"query": "cat", "colour": 1}"#),
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown field",
        ),
        (
            post("/v1/search", r#"{"k": 3}"#),
            StatusCode::UNPROCESSABLE_ENTITY,
            "missing field `query`",
        ),
        (
            post("/v1/search", "{not json"),
            StatusCode::BAD_REQUEST,
            "JSON",
        ),
        (
            post("/v1/search", r#"{"query": "!!! ???"}"#),
            StatusCode::UNPROCESSABLE_ENTITY,
            "no words",
        ),
        (
            post(
                "/v1/search",
                format!(r#"{{"query": "cat", "session_id": "{}"}}"#, "s".repeat(200)),
            ),
            StatusCode::BAD_REQUEST,
            "session_id must be 1 to 128",
        ),
        (
            Request::post("/v1/search")
                .body(Body::from(r#"{"query":"cat"}"#))
                .unwrap(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Content-Type",
        ),
        (
            post("/v1/search", vec![b' '; 20_000]),
            StatusCode::PAYLOAD_TOO_LARGE,
            "length limit",
        ),
        (
            Request::get("/v1/images/..%2Fsecret")
                .body(Body::empty())
                .unwrap(),
            StatusCode::BAD_REQUEST,
            "image id must be",
        ),
        (
            Request::get("/v1/images/img-9999999")
                .body(Body::empty())
                .unwrap(),
            StatusCode::NOT_FOUND,
            "no image img-9999999",
        ),
        (
            Request::get("/v2/nothing").body(Body::empty()).unwrap(),
            StatusCode::NOT_FOUND,
            "no such endpoint",
        ),
        (
            post(
                "/v1/feedback/rating",
                r#"{"query": "cat", "image_id": "img-1", "stars": 9, "aspect": "aesthetic"}"#,
            ),
            StatusCode::BAD_REQUEST,
            "stars",
        ),
        (
            post(
                "/v1/feedback/click",
                r#"{"request_id": "", "image_id": "img-1", "rank": 1}"#,
            ),
            StatusCode::BAD_REQUEST,
            "request_id must be",
        ),
    ];
    for (request, want, message) in cases {
        let what = format!("{} {}", request.method(), request.uri());
        let (status, body) = call(&app, request).await;
        assert_eq!(status, want, "{what}: {body}");
        let text = body["error"].as_str().unwrap_or_default();
        assert!(text.contains(message), "{what}: {text:?} lacks {message:?}");
    }
    let (status, _) = call(
        &app,
        Request::get("/v1/search").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);

    // OpenAPI, liveness, readiness
    let (status, doc) = call(
        &app,
        Request::get("/openapi.json").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(doc["openapi"], "3.0.3");
    assert!(doc["paths"]["/v1/search"]["post"].is_object());
    let (status, _) = call(&app, Request::get("/healthz").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    let (status, ready) = call(&app, Request::get("/readyz").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(ready["variants"][0]["model_version"], "ref-a");

    // nothing deployed: not ready, and search says why
    store::remove_deployment(&env.pool, "ref-a").await.unwrap();
    search.reloader.reload().await.unwrap();
    let (status, _) = call(&app, Request::get("/readyz").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let (status, body) = call(&app, post("/v1/search", search_body("cat", "s1"))).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body["error"]
        .as_str()
        .unwrap()
        .contains("no model version is deployed"));
    env.cleanup().await;
}

fn client() -> reqwest::Client {
    kalon_telemetry::install_crypto_provider();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_a_socket_searches_log_impressions_and_feedback_reaches_its_topics() {
    let (env, world) = setup(300).await;
    let running = fixture::serve(fixture::config(&env, &world)).await;
    let http = client();
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut answers = Vec::new();
    for i in 0..20 {
        let response = search_request(
            &http,
            &running,
            "a blue dog by the sea",
            &format!("session-{i}"),
        )
        .header("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01"))
        .send()
        .await
        .unwrap();
        assert_eq!(response.status(), 200);
        let answer: SearchResponse =
            serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
        answers.push(answer);
    }
    let topic = env.kafka.topic("search.impression.v1");
    let kafka = env.kafka.clone();
    let received = tokio::task::spawn_blocking(move || {
        kalon_tests::read_topic(&kafka, &topic, 20, Duration::from_secs(30))
    })
    .await
    .unwrap();
    assert_eq!(received.len(), 20);
    for message in &received {
        let event =
            kalon_events::Event::decode(kalon_events::EventKind::Impression, &message.payload)
                .expect("a valid impression");
        let kalon_events::Event::Impression(impression) = event else {
            unreachable!()
        };
        let answer = answers
            .iter()
            .find(|a| a.request_id == impression.request_id)
            .expect("an impression per answered request");
        assert_eq!(impression.model_version, "ref-a");
        assert_eq!(impression.variant, "control");
        assert_eq!(impression.query, "a blue dog by the sea");
        let ids: Vec<&str> = impression
            .results
            .iter()
            .map(|r| r.image_id.as_str())
            .collect();
        let answered: Vec<&str> = answer.results.iter().map(|r| r.image_id.as_str()).collect();
        assert_eq!(ids, answered);
        // exploration is off by default: the model's order, no model_rank
        assert!(impression.results.iter().all(|r| r.model_rank.is_none()));
        // the caller's trace continues into the event (W3C traceparent)
        let traceparent = message.headers.get("traceparent").expect("trace header");
        assert!(traceparent.contains(trace_id), "{traceparent}");
    }

    // feedback over HTTP lands on its topics, acknowledged
    let request_id = &answers[0].request_id;
    let click = http
        .post(running.url("/v1/feedback/click"))
        .header("content-type", "application/json")
        .body(serde_json::json!({"request_id": request_id, "image_id": answers[0].results[0].image_id, "rank": 1, "dwell_ms": 1200}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(click.status(), 202);
    let accepted: serde_json::Value =
        serde_json::from_slice(&click.bytes().await.unwrap()).unwrap();
    let rating = http
        .post(running.url("/v1/feedback/rating"))
        .header("content-type", "application/json")
        .body(serde_json::json!({"request_id": request_id, "query": "a blue dog by the sea", "image_id": answers[0].results[1].image_id, "stars": 4, "aspect": "aesthetic"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(rating.status(), 202);
    let kafka = env.kafka.clone();
    let (clicks, ratings) = tokio::task::spawn_blocking(move || {
        (
            kalon_tests::read_topic(
                &kafka,
                &kafka.topic("search.click.v1"),
                1,
                Duration::from_secs(20),
            ),
            kalon_tests::read_topic(
                &kafka,
                &kafka.topic("search.rating.v1"),
                1,
                Duration::from_secs(20),
            ),
        )
    })
    .await
    .unwrap();
    let click: serde_json::Value = serde_json::from_slice(&clicks[0].payload).unwrap();
    assert_eq!(click["event_id"], accepted["event_id"]);
    assert_eq!(click["request_id"], request_id.as_str());
    let rating: serde_json::Value = serde_json::from_slice(&ratings[0].payload).unwrap();
    assert_eq!(rating["stars"], 4);
    let (_, delivered, dropped) = running.state.events.stats.snapshot();
    assert_eq!((delivered, dropped), (20, 0));
    running.shutdown().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explored_answers_swap_one_adjacent_pair_and_their_impressions_record_it() {
    let (env, world) = setup(120).await;
    let mut config = fixture::config(&env, &world);
    config.explore_rate = 1.0;
    config.explore_depth = 4;
    let search = Search::build(config).await.unwrap();
    assert_eq!(search.state.explore, Exploration::new(1.0, 4).unwrap());
    let exploring = router(search.state.clone());
    // the same service with exploration off (rate 0), for the model's order
    let plain = router(AppState {
        explore: Exploration::new(0.0, 4).unwrap(),
        ..search.state.clone()
    });
    let rounds = 12;
    let mut answers = std::collections::HashMap::new();
    for i in 0..rounds {
        let query = ["a red cat", "a blue dog by the sea", "green hills"][i % 3];
        let mut pair = Vec::new();
        for (app, explored) in [(&plain, false), (&exploring, true)] {
            let (status, body) = call(
                app,
                post("/v1/search", search_body(query, &format!("s-{i}"))),
            )
            .await;
            assert_eq!(status, StatusCode::OK, "{body}");
            let answer: SearchResponse = serde_json::from_value(body).unwrap();
            assert_eq!(answer.results.len(), 5);
            pair.push(answer.clone());
            answers.insert(answer.request_id.clone(), (explored, answer));
        }
        // the person sees the model's list with one neighbour pair swapped,
        // within the depth, each result keeping its score
        let (model, shown) = (&pair[0].results, &pair[1].results);
        let moved: Vec<usize> = (0..5)
            .filter(|&i| model[i].image_id != shown[i].image_id)
            .collect();
        assert_eq!(moved.len(), 2, "{model:?} vs {shown:?}");
        let k = moved[0];
        assert!(moved[1] == k + 1 && k + 2 <= 4, "swap at {moved:?}");
        assert_eq!(shown[k].image_id, model[k + 1].image_id);
        assert_eq!(shown[k].score, model[k + 1].score);
        assert!(shown
            .iter()
            .enumerate()
            .all(|(i, r)| r.rank == i as u32 + 1));
    }

    let topic = env.kafka.topic("search.impression.v1");
    let kafka = env.kafka.clone();
    let received = tokio::task::spawn_blocking(move || {
        kalon_tests::read_topic(&kafka, &topic, 2 * rounds, Duration::from_secs(30))
    })
    .await
    .unwrap();
    assert_eq!(received.len(), 2 * rounds);
    let mut explored_seen = 0;
    for message in &received {
        let impression = match kalon_events::Event::decode(
            kalon_events::EventKind::Impression,
            &message.payload,
        ) {
            Ok(kalon_events::Event::Impression(impression)) => impression,
            other => panic!("not a valid impression: {other:?}"),
        };
        let (explored, answer) = &answers[&impression.request_id];
        let ids: Vec<&str> = impression
            .results
            .iter()
            .map(|r| r.image_id.as_str())
            .collect();
        let answered: Vec<&str> = answer.results.iter().map(|r| r.image_id.as_str()).collect();
        assert_eq!(ids, answered, "the impression is what the person saw");
        let recorded: Vec<(u32, u32)> = impression
            .results
            .iter()
            .filter_map(|r| r.model_rank.map(|m| (r.rank, m)))
            .collect();
        if *explored {
            explored_seen += 1;
            // exactly one adjacent swap: (k, k+1) shown where the model
            // ranked them (k+1, k)
            let [(a, model_a), (b, model_b)] = recorded[..] else {
                panic!("{recorded:?} is not one swap");
            };
            assert_eq!((b, model_a, model_b), (a + 1, a + 1, a), "{recorded:?}");
            assert!(b <= 4, "deeper than the depth: {recorded:?}");
        } else {
            assert!(recorded.is_empty(), "{recorded:?} at rate 0");
        }
    }
    assert_eq!(explored_seen, rounds);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_canary_split_follows_the_weights_within_2_percent_and_is_sticky() {
    let (env, world) = setup(300).await;
    fixture::index(&env, &world, "ref-b", world.aligned.path(), false).await;
    store::set_deployment(&env.pool, "ref-a", "control", 0.8)
        .await
        .unwrap();
    store::set_deployment(&env.pool, "ref-b", "canary", 0.2)
        .await
        .unwrap();
    let search = Search::build(fixture::config(&env, &world)).await.unwrap();
    let app = router(search.state.clone());
    let sessions = 10_000;
    let mut canary = 0;
    let mut first = Vec::with_capacity(sessions);
    for i in 0..sessions {
        let (status, body) = call(
            &app,
            post(
                "/v1/search",
                search_body("red flowers", &format!("user-{i}")),
            ),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let (variant, version) = (
            body["variant"].as_str().unwrap().to_owned(),
            body["model_version"].as_str().unwrap().to_owned(),
        );
        match variant.as_str() {
            "canary" => {
                assert_eq!(version, "ref-b");
                canary += 1;
            }
            "control" => assert_eq!(version, "ref-a"),
            other => panic!("unknown variant {other}"),
        }
        first.push(variant);
    }
    let share = canary as f64 / sessions as f64;
    assert!((share - 0.2).abs() <= 0.02, "canary share {share}");
    // sticky: the same sessions again get the same variant
    for (i, variant) in first.iter().enumerate().step_by(10) {
        let (_, body) = call(
            &app,
            post(
                "/v1/search",
                search_body("green hills", &format!("user-{i}")),
            ),
        )
        .await;
        assert_eq!(body["variant"].as_str().unwrap(), variant);
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_event_hot_swaps_the_version_under_load_without_a_failed_request() {
    let (env, world) = setup(300).await;
    fixture::index(&env, &world, "ref-b", world.aligned.path(), false).await;
    store::set_deployment(&env.pool, "ref-a", "main", 1.0)
        .await
        .unwrap();
    let running = fixture::serve(fixture::config(&env, &world)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..4 {
        let (http, url, stop) = (client(), running.url("/v1/search"), stop.clone());
        clients.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut failed = 0;
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let body = search_body("a yellow house", &format!("c{c}-{i}"));
                match http
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                {
                    Ok(r) if r.status() == 200 => {
                        let answer: SearchResponse =
                            serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
                        seen.push(answer.model_version);
                    }
                    _ => failed += 1,
                }
            }
            (seen, failed)
        }));
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    // the swap: "main" moves to ref-b, announced on model.deployment.v1
    kalon_registry::deploy::deploy(&env.pool, &env.kafka, "ref-b", "main", 1.0)
        .await
        .unwrap();
    let start = Instant::now();
    loop {
        let routing = running.state.live.current();
        if routing.variants.len() == 1 && routing.variants[0].served.version == "ref-b" {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the event never swapped the routing"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for client in clients {
        let (seen, failed) = client.await.unwrap();
        assert_eq!(failed, 0, "failed requests during the swap");
        assert!(seen.first().is_some_and(|v| v == "ref-a"), "{seen:?}");
        // after the swap, only the new version answers
        let tail = &seen[seen.len().saturating_sub(3)..];
        assert!(tail.iter().all(|v| v == "ref-b"), "{tail:?}");
        total += seen.len();
    }
    assert!(total >= 40, "only {total} requests under load");
    running.shutdown().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_kafka_down_search_still_answers_and_counts_the_dropped_impressions() {
    let (mut env, world) = setup(300).await;
    let running = fixture::serve(fixture::config(&env, &world)).await;
    let http = client();
    // one impression delivered while the broker is up
    let ok = search_request(&http, &running, "cat", "s0")
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let start = Instant::now();
    while running.state.events.stats.snapshot().1 < 1 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "first impression not delivered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    env.broker.as_mut().expect("a private broker").kill();
    let start = Instant::now();
    for i in 0..20 {
        let r = search_request(&http, &running, "dog", &format!("s{i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    // answering did not wait for the broker (timeout is 3 s per event)
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    let start = Instant::now();
    while running.state.events.stats.snapshot().2 < 20 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "drops not counted: {:?}",
            running.state.events.stats.snapshot()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(running.state.events.stats.snapshot().1, 1);
    // each drop is counted against its version in /v1/stats too
    let dropped = running.state.events.stats.snapshot().2;
    let stats = running.state.serving.snapshot([]);
    assert_eq!(stats.versions.len(), 1);
    assert_eq!(stats.versions[0].model_version, "ref-a");
    assert_eq!(stats.versions[0].impressions_dropped, dropped);
    // feedback, which needs the broker's acknowledgement, says so
    let r = http
        .post(running.url("/v1/feedback/click"))
        .header("content-type", "application/json")
        .body(r#"{"request_id": "r1", "image_id": "img-0000001", "rank": 1}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    running.shutdown().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_fuzzing_the_openapi_document_finds_no_server_error() {
    let (env, world) = setup(200).await;
    let running = fixture::serve(fixture::config(&env, &world)).await;
    kalon_tests::schemathesis(&running.url("/openapi.json"), 7).await;
    running.shutdown().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kalonctl_index_and_deploy_put_a_version_into_a_running_search() {
    let env = TestEnv::new().await;
    let world = fixture::search_world(200);
    let running = fixture::serve(fixture::config(&env, &world)).await;
    assert!(
        !running.state.live.current().is_ready(),
        "nothing deployed yet"
    );
    let bin = tokio::task::spawn_blocking(|| kalon_tests::workspace_binary("kalonctl"))
        .await
        .unwrap();
    let kalonctl = |args: Vec<String>| {
        let mut command = tokio::process::Command::new(&bin);
        command
            .args([
                "--database-url",
                &env.database_url,
                "--brokers",
                &env.kafka.brokers,
            ])
            .args(["--topic-prefix", &env.kafka.topic_prefix])
            .args(args)
            .env_remove("RUST_BACKTRACE");
        async move {
            let out = command.output().await.unwrap();
            (
                out.status.success(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        }
    };
    let parent = world.parent.path().display().to_string();
    let images = world.world.path().display().to_string();
    let args = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let (ok, stdout, stderr) = kalonctl(args(&[
        "index",
        "--model-version",
        "cli-a",
        "--model",
        &parent,
        "--images",
        &images,
    ]))
    .await;
    assert!(ok, "{stderr}");
    let outcome: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(outcome["images"], 200);
    assert_eq!(outcome["method"], "tower");

    // a mistake is a clear error
    let (ok, _, stderr) = kalonctl(args(&["deploy", "--model-version", "never-indexed"])).await;
    assert!(!ok);
    assert!(
        stderr.contains("never-indexed is not registered"),
        "{stderr}"
    );

    // deploy: the running service picks it up from the event
    let (ok, _, stderr) = kalonctl(args(&[
        "deploy",
        "--model-version",
        "cli-a",
        "--variant",
        "main",
    ]))
    .await;
    assert!(ok, "{stderr}");
    let start = Instant::now();
    while !running.state.live.current().is_ready() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the deployment event never arrived"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        running.state.live.current().variants[0].served.version,
        "cli-a"
    );

    // and --remove takes it out again
    let (ok, _, stderr) = kalonctl(args(&["deploy", "--model-version", "cli-a", "--remove"])).await;
    assert!(ok, "{stderr}");
    let start = Instant::now();
    while running.state.live.current().is_ready() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the removal never arrived"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    running.shutdown().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_broker_at_start_search_serves_from_postgres_and_counts_what_it_drops() {
    let (env, world) = setup(200).await;
    let mut config = fixture::config(&env, &world);
    // nothing listens here
    config.kafka.brokers = format!("127.0.0.1:{}", kalon_tests::free_port());
    config.kafka_timeout_ms = 1000;
    let running = fixture::serve(config).await;
    assert!(
        running.state.live.current().is_ready(),
        "deployments read from Postgres"
    );
    let http = client();
    for i in 0..5 {
        let r = search_request(&http, &running, "a red cat", &format!("s{i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let start = Instant::now();
    while running.state.events.stats.snapshot().2 < 5 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "drops not counted: {:?}",
            running.state.events.stats.snapshot()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    running.shutdown().await;
    env.cleanup().await;
}

/// Moves `version` to `to` as the canary controller or a person would.
async fn move_to(env: &TestEnv, version: &str, to: State) {
    lifecycle::transition(
        &env.pool,
        version,
        to,
        "test",
        "search test",
        serde_json::json!({}),
    )
    .await
    .unwrap();
}

/// `POST /v1/search` for the top `k` of `query`, pinned to `version`.
fn pinned_body(query: &str, k: u32, version: &str) -> String {
    serde_json::json!({ "query": query, "k": k, "model_version": version }).to_string()
}

/// The image ids of a version's own ranking of `query` (a pinned search).
async fn ranking(app: &axum::Router, query: &str, k: u32, version: &str) -> Vec<(String, f32)> {
    let (status, body) = call(app, post("/v1/search", pinned_body(query, k, version))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let answer: SearchResponse = serde_json::from_value(body).unwrap();
    assert_eq!(answer.model_version, version);
    answer
        .results
        .into_iter()
        .map(|hit| (hit.image_id, hit.score))
        .collect()
}

/// Reads `count` impressions from the test's topic, by request id.
async fn impressions(
    env: &TestEnv,
    count: usize,
) -> std::collections::HashMap<String, kalon_events::Impression> {
    let topic = env.kafka.topic("search.impression.v1");
    let kafka = env.kafka.clone();
    let received = tokio::task::spawn_blocking(move || {
        kalon_tests::read_topic(&kafka, &topic, count, Duration::from_secs(30))
    })
    .await
    .unwrap();
    assert_eq!(received.len(), count);
    received
        .iter()
        .map(|message| {
            match kalon_events::Event::decode(kalon_events::EventKind::Impression, &message.payload)
            {
                Ok(kalon_events::Event::Impression(impression)) => {
                    (impression.request_id.clone(), impression)
                }
                other => panic!("not a valid impression: {other:?}"),
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canarys_interleaved_pages_draft_from_both_rankings_and_record_the_teams() {
    let (env, world) = setup(300).await;
    fixture::index(&env, &world, "ref-b", world.aligned.path(), false).await;
    move_to(&env, "ref-a", State::Promoted).await;
    move_to(&env, "ref-b", State::Canary).await;
    // the stable version takes no traffic of its own: every request reaches
    // the candidate, and each is interleaved with the promoted ranking
    store::set_deployment(&env.pool, "ref-a", "control", 0.0)
        .await
        .unwrap();
    store::set_deployment(&env.pool, "ref-b", "canary", 1.0)
        .await
        .unwrap();
    assert!(store::set_interleave(&env.pool, "ref-b", 1.0)
        .await
        .unwrap());
    let mut config = fixture::config(&env, &world);
    // exploration on for every request: an interleaved page is never swapped
    config.explore_rate = 1.0;
    let search = Search::build(config).await.unwrap();
    let app = router(search.state.clone());

    let queries = [
        "a red cat",
        "a blue dog by the sea",
        "green hills",
        "a yellow house",
        "red flowers",
    ];
    let k = 6;
    let rounds = 20;
    let mut answers = std::collections::HashMap::new();
    let (mut stable_picks, mut candidate_picks) = (0, 0);
    for i in 0..rounds {
        let query = queries[i % queries.len()];
        let body = serde_json::json!({ "query": query, "k": k, "session_id": format!("s-{i}") });
        let (status, body) = call(&app, post("/v1/search", body.to_string())).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let answer: SearchResponse = serde_json::from_value(body).unwrap();
        assert_eq!(
            (answer.model_version.as_str(), answer.variant.as_str()),
            ("ref-b", "canary")
        );
        assert_eq!(answer.results.len(), k as usize);
        let stable = ranking(&app, query, k, "ref-a").await;
        let candidate = ranking(&app, query, k, "ref-b").await;
        // replay the draft: each hit is its team's best result not yet on
        // the page, with the score that version gave it
        let mut shown = std::collections::HashSet::new();
        for (i, hit) in answer.results.iter().enumerate() {
            assert_eq!(hit.rank, i as u32 + 1);
            let own = match hit.team.expect("a team on every interleaved hit") {
                Team::A => {
                    stable_picks += 1;
                    &stable
                }
                Team::B => {
                    candidate_picks += 1;
                    &candidate
                }
            };
            let best = own.iter().find(|(id, _)| !shown.contains(id)).unwrap();
            assert_eq!(best.0, hit.image_id, "{:?} did not pick its best", hit.team);
            assert_eq!(best.1, hit.score);
            assert!(shown.insert(hit.image_id.clone()), "{} twice", hit.image_id);
        }
        answers.insert(answer.request_id.clone(), answer);
    }
    assert!(
        stable_picks > 0 && candidate_picks > 0,
        "{stable_picks} / {candidate_picks}"
    );

    // interleaving off: the candidate's own (explored) page, no teams
    store::set_interleave(&env.pool, "ref-b", 0.0)
        .await
        .unwrap();
    search.reloader.reload().await.unwrap();
    assert_eq!(
        search
            .state
            .live
            .current()
            .variant_of("ref-b")
            .unwrap()
            .interleave,
        0.0
    );
    let mut plain = std::collections::HashSet::new();
    for i in 0..5 {
        let (status, body) = call(
            &app,
            post("/v1/search", search_body("a red cat", &format!("p-{i}"))),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let answer: SearchResponse = serde_json::from_value(body).unwrap();
        assert!(answer.results.iter().all(|hit| hit.team.is_none()));
        plain.insert(answer.request_id);
    }

    // the impressions record what the person saw, teams included; the
    // pinned searches logged none
    let logged = impressions(&env, rounds + plain.len()).await;
    for (request_id, impression) in &logged {
        assert_eq!(
            (
                impression.model_version.as_str(),
                impression.variant.as_str()
            ),
            ("ref-b", "canary")
        );
        if plain.contains(request_id) {
            assert!(impression.results.iter().all(|r| r.team.is_none()));
            assert!(
                impression.results.iter().any(|r| r.model_rank.is_some()),
                "explored"
            );
            continue;
        }
        let answer = &answers[request_id];
        let recorded: Vec<(&str, Option<Team>)> = impression
            .results
            .iter()
            .map(|r| (r.image_id.as_str(), r.team))
            .collect();
        let answered: Vec<(&str, Option<Team>)> = answer
            .results
            .iter()
            .map(|r| (r.image_id.as_str(), r.team))
            .collect();
        assert_eq!(recorded, answered);
        assert!(
            impression.results.iter().all(|r| r.model_rank.is_none()),
            "not explored"
        );
    }
    let stats = search.state.serving.snapshot([]);
    let candidate = stats
        .versions
        .iter()
        .find(|v| v.model_version == "ref-b")
        .unwrap();
    assert_eq!(candidate.interleaved, rounds as u64);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_search_serves_that_version_and_logs_no_impression() {
    let (env, world) = setup(200).await;
    fixture::index(&env, &world, "ref-b", world.aligned.path(), false).await;
    // ref-b is loaded but takes no traffic
    store::set_deployment(&env.pool, "ref-b", "shadow", 0.0)
        .await
        .unwrap();
    let search = Search::build(fixture::config(&env, &world)).await.unwrap();
    let app = router(search.state.clone());
    let query = "a blue dog by the sea";

    // routed: ref-a, one impression queued
    let (status, body) = call(&app, post("/v1/search", search_body(query, "s1"))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let routed: SearchResponse = serde_json::from_value(body).unwrap();
    assert_eq!(routed.model_version, "ref-a");
    assert_eq!(search.state.events.stats.snapshot().0, 1);

    // pinned: the named version's own ranking, whatever the session
    let body =
        serde_json::json!({ "query": query, "k": 5, "session_id": "s1", "model_version": "ref-b" });
    let (status, body) = call(&app, post("/v1/search", body.to_string())).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let pinned: SearchResponse = serde_json::from_value(body).unwrap();
    assert_eq!(
        (pinned.model_version.as_str(), pinned.variant.as_str()),
        ("ref-b", "shadow")
    );
    let served = search.state.live.current().served("ref-b").unwrap().clone();
    let embedding = served.text.embed_texts(&[query]).unwrap();
    let want: Vec<String> = served
        .index
        .search(embedding.row(0), 5)
        .unwrap()
        .iter()
        .map(|hit| served.ids[hit.row].clone())
        .collect();
    let got: Vec<String> = pinned.results.iter().map(|r| r.image_id.clone()).collect();
    assert_eq!(got, want);
    assert_ne!(
        got,
        routed
            .results
            .iter()
            .map(|r| r.image_id.clone())
            .collect::<Vec<_>>()
    );
    // pinned to the routed version: the routed page
    let again = ranking(&app, query, 5, "ref-a").await;
    let routed_ids: Vec<(String, f32)> = routed
        .results
        .iter()
        .map(|r| (r.image_id.clone(), r.score))
        .collect();
    assert_eq!(again, routed_ids);

    // an unknown or malformed version
    let (status, body) = call(&app, post("/v1/search", pinned_body("cat", 5, "ref-zzz"))).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let message = body["error"].as_str().unwrap();
    assert!(
        message.contains("ref-zzz") && message.contains("ref-a, ref-b"),
        "{message}"
    );
    let (status, body) = call(&app, post("/v1/search", pinned_body("cat", 5, ""))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("model_version must be"),
        "{body}"
    );

    // no pinned search reached the producer
    let (queued, _, dropped) = search.state.events.stats.snapshot();
    assert_eq!((queued, dropped), (1, 0));
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_count_each_versions_requests_errors_and_latencies() {
    let (env, world) = setup(200).await;
    fixture::index(&env, &world, "ref-b", world.aligned.path(), false).await;
    store::set_deployment(&env.pool, "ref-b", "canary", 1.0)
        .await
        .unwrap();
    let running = fixture::serve(fixture::config(&env, &world)).await;
    let http = client();
    let mut answered = std::collections::HashMap::<String, u64>::new();
    for i in 0..30 {
        let r = search_request(&http, &running, "green hills", &format!("s{i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let answer: SearchResponse = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
        *answered.entry(answer.model_version).or_default() += 1;
    }
    assert_eq!(answered.len(), 2, "{answered:?}");
    // pinned searches count against their version; a query without a
    // readable word is a request but neither an error nor a latency
    for (query, status) in [("a red cat", 200), ("!!! ???", 422), ("!!! ???", 422)] {
        let r = http
            .post(running.url("/v1/search"))
            .header("content-type", "application/json")
            .body(pinned_body(query, 5, "ref-b"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status);
    }
    // refused before routing: counted nowhere
    let r = search_request(&http, &running, " ", "s0")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    let r = http.get(running.url("/v1/stats")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let json: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    let stats: kalon_search::stats::ServingStats = serde_json::from_value(json.clone()).unwrap();
    assert!(stats.started_at <= chrono::Utc::now());
    let names: Vec<&str> = stats
        .versions
        .iter()
        .map(|v| v.model_version.as_str())
        .collect();
    assert_eq!(names, ["ref-a", "ref-b"]);
    for v in &stats.versions {
        let routed = answered[&v.model_version];
        let (successful, refused) = if v.model_version == "ref-b" {
            (routed + 1, 2)
        } else {
            (routed, 0)
        };
        assert_eq!(v.requests, successful + refused, "{v:?}");
        assert_eq!(
            (v.errors, v.interleaved, v.impressions_dropped),
            (0, 0, 0),
            "{v:?}"
        );
        assert_eq!(v.latency_counts.len(), 21);
        assert_eq!(v.latency_counts.iter().sum::<u64>(), successful, "{v:?}");
    }
    // the documented shape: bounds in ms, the last one open
    let first = &json["versions"][0];
    assert_eq!(first["latency_ms_buckets"][0], 1);
    assert_eq!(first["latency_ms_buckets"][19], 5000);
    assert!(first["latency_ms_buckets"][20].is_null());
    assert!(json["started_at"].as_str().unwrap().contains('T'));
    running.shutdown().await;
    env.cleanup().await;
}

/// A CLIP exported from open_clip (tests/fixtures/clip-encoder: its real
/// architecture, tiny, random weights) indexes the catalog and answers
/// searches: CLIP's BPE tokenizer reads the query, and the answer's scores
/// are the cosine of Kalon's own embeddings of the query and each image.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clip_export_indexes_the_catalog_and_answers_searches() {
    let env = TestEnv::new().await;
    let world = fixture::search_world(60);
    let clip = kalon_tests::clip_encoder();
    let indexed = fixture::index(&env, &world, "clip-1", clip.path(), false).await;
    assert_eq!(indexed.method, "tower");
    store::set_deployment(&env.pool, "clip-1", "control", 1.0)
        .await
        .unwrap();
    let search = Search::build(fixture::config(&env, &world)).await.unwrap();
    let app = router(search.state.clone());
    let query = "A quiet harbour at dusk!";
    let (status, body) = call(&app, post("/v1/search", search_body(query, "s1"))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let answer: SearchResponse = serde_json::from_value(body).unwrap();
    assert_eq!(answer.model_version, "clip-1");
    assert_eq!(answer.results.len(), 5);
    let encoder =
        kalon_encoder::Encoder::load(clip.path(), &kalon_encoder::EncoderOptions::default())
            .unwrap();
    let text = encoder.text.embed_texts(&[query]).unwrap();
    for hit in &answer.results {
        let file = std::fs::read(world.images().join(format!("{}.png", hit.image_id))).unwrap();
        let image = encoder.image.embed_files(&[file]).unwrap();
        let cosine: f32 = text
            .row(0)
            .iter()
            .zip(image.row(0))
            .map(|(a, b)| a * b)
            .sum();
        assert!(
            (cosine - hit.score).abs() < 1e-3,
            "{}: search scored {}, Kalon's embeddings give {cosine}",
            hit.image_id,
            hit.score
        );
    }
    env.cleanup().await;
}
