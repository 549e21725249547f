//! A search request's trace: a `search` span with `embed`, `ann_search` and
//! `produce` children, exported over OTLP; its context rides in the
//! impression's headers, and ingest's `ingest.event` span continues it. A
//! caller's `traceparent` makes the search span its child. Telemetry is
//! process-global, so this binary holds this one test.

use std::time::Duration;

use kalon_ingest::Ingest;
use kalon_registry::store;
use kalon_tests::otlp::{collector, hex};
use kalon_tests::search as fixture;
use kalon_tests::TestEnv;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_search_trace_reaches_ingest_through_the_impressions_headers() {
    let (endpoint, received) = collector().await;
    let telemetry = kalon_telemetry::init_with("kalon-search", Some(&endpoint)).unwrap();
    let env = TestEnv::new().await;
    let world = fixture::search_world(200);
    fixture::index(&env, &world, "ref-a", world.parent.path(), false).await;
    store::set_deployment(&env.pool, "ref-a", "control", 1.0)
        .await
        .unwrap();
    let running = fixture::serve(fixture::config(&env, &world)).await;
    kalon_telemetry::install_crypto_provider();
    let http = reqwest::Client::new();
    let caller_trace = "0af7651916cd43dd8448eb211c80319c";
    let caller_span = "b7ad6b7169203331";
    for traceparent in [None, Some(format!("00-{caller_trace}-{caller_span}-01"))] {
        let mut request = http
            .post(running.url("/v1/search"))
            .header("content-type", "application/json")
            .body(r#"{"query": "a red cat on a sofa", "k": 3, "session_id": "s1"}"#);
        if let Some(traceparent) = traceparent {
            request = request.header("traceparent", traceparent);
        }
        assert_eq!(request.send().await.unwrap().status(), 200);
    }
    let ingest = Ingest::build(env.ingest_config()).await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let ingesting = tokio::spawn(ingest.run(async {
        let _ = stopped.await;
    }));
    env.wait_for_rows(2, Duration::from_secs(60)).await;
    stop.send(()).unwrap();
    ingesting.await.unwrap().unwrap();
    running.shutdown().await;
    tokio::task::spawn_blocking(move || drop(telemetry))
        .await
        .unwrap();

    let (spans, metrics) = {
        let received = received.lock().unwrap();
        (received.spans(), received.metric_names())
    };
    let searches: Vec<_> = spans.iter().filter(|s| s.name == "search").collect();
    assert_eq!(searches.len(), 2, "one search span per request");
    for search in &searches {
        let trace = hex(&search.trace_id);
        for child in ["embed", "ann_search", "produce"] {
            let found = spans.iter().find(|s| {
                s.name == child
                    && s.trace_id == search.trace_id
                    && s.parent_span_id == search.span_id
            });
            assert!(found.is_some(), "no {child} span under search {trace}");
        }
        let ingested = spans
            .iter()
            .find(|s| s.name == "ingest.event" && s.trace_id == search.trace_id)
            .unwrap_or_else(|| panic!("ingest did not continue trace {trace}"));
        assert_eq!(ingested.parent_span_id, search.span_id);
    }
    // the caller's trace is continued, not replaced
    let continued = searches
        .iter()
        .find(|s| hex(&s.trace_id) == caller_trace)
        .expect("the caller's trace id");
    assert_eq!(hex(&continued.parent_span_id), caller_span);
    for name in [
        "kalon.search.request.duration",
        "kalon.search.requests",
        "kalon.search.impressions.delivered",
    ] {
        assert!(metrics.contains(name), "{name} not exported: {metrics:?}");
    }
    env.cleanup().await;
}
