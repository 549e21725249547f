//! The enricher against a real Postgres, a real Kafka-API broker and the
//! simulated world's LLM endpoint over HTTP.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use kalon_enricher::judgments::{JudgedRow, JudgmentRecorder};
use kalon_enricher::{EnrichReport, Enricher, EnricherConfig};
use kalon_events::generate::Generator;
use kalon_events::Event;
use kalon_kafka::consumer::Membership;
use kalon_llm::{Aspect, ImageRef, Judge, LlmClient, LlmConfig, PromptVariant, Rephraser, Verdict};
use kalon_sim_llm::WorldRephraser;
use kalon_sim_llm::{Fault, FaultControl, SimConfig, SimServer};
use kalon_tests::{read_topic, wait_health, TestEnv};

async fn start_sim(config: SimConfig, addr: &str) -> SimServer {
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    SimServer::start(config, listener).await.unwrap()
}

fn quiet_sim() -> SimConfig {
    let mut config = SimConfig::new(11, 1_000);
    config.rephrase_noise = 0.0;
    config
}

fn llm_config(base_url: &str) -> LlmConfig {
    let mut config = LlmConfig::new(base_url, "kalon-sim-1");
    config.timeout = Duration::from_millis(1_000);
    config.backoff_base = Duration::from_millis(10);
    config.backoff_max = Duration::from_millis(50);
    config.max_retries = 1;
    config.breaker_cooldown = Duration::from_millis(200);
    config
}

fn enricher_config(env: &TestEnv, variants: &[PromptVariant]) -> EnricherConfig {
    let mut config = EnricherConfig::new(
        &env.database_url,
        &env.kafka.brokers,
        &env.kafka.topic_prefix,
    );
    // the default membership: on tansu (the test broker) one replica reads
    // every partition itself
    config.variants = variants.to_vec();
    config.workers = 4;
    config.max_backoff_ms = 300;
    config.poll_ms = 50;
    config
}

/// Impressions whose queries are `queries` (as typed, before normalising).
fn impressions(queries: &[&str]) -> Vec<Event> {
    let mut generator = Generator::new(3);
    queries
        .iter()
        .map(|q| {
            let mut impression = generator.impression(5);
            impression.query = (*q).to_owned();
            Event::Impression(impression)
        })
        .collect()
}

/// Runs an enricher until `done` holds (or panics after `timeout`).
struct Running {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<EnrichReport>>,
}

async fn run(config: EnricherConfig, llm: LlmConfig) -> Running {
    let enricher = Enricher::build(config, llm).await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(enricher.run(async move {
        let _ = stopped.await;
    }));
    Running { stop, task }
}

impl Running {
    async fn stop(self) -> EnrichReport {
        let _ = self.stop.send(());
        self.task.await.unwrap().unwrap()
    }
}

async fn wait_for(env: &TestEnv, sql: &str, want: i64, timeout: Duration) {
    let started = Instant::now();
    loop {
        let (n,): (i64,) = sqlx::query_as(sql).fetch_one(&env.pool).await.unwrap();
        if n == want {
            return;
        }
        assert!(started.elapsed() < timeout, "{sql}: {n}, wanted {want}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_reader_holding_no_partitions_reports_the_impressions_waiting() {
    // sqlite storage: tansu 0.6's memory:// engine answers ListOffsets(latest)
    // with the last record batch's base offset + 1, not the high watermark
    let env = TestEnv::with_private_broker(kalon_stack::Storage::Sqlite("tansu.db".into())).await;
    let sim = start_sim(quiet_sim(), "127.0.0.1:0").await;
    let queries: Vec<String> = (0..40).map(|i| format!("query {i}")).collect();
    let refs: Vec<&str> = queries.iter().map(String::as_str).collect();
    env.produce(&impressions(&refs)).await;
    // a group member that has subscribed but never polled holds nothing
    let mut config = enricher_config(&env, &[PromptVariant::Detail]);
    config.consumer.membership = Membership::Group;
    config.consumer.stall_after_s = 2;
    let enricher = Enricher::build(config, llm_config(&sim.base_url()))
        .await
        .unwrap();
    assert_eq!(enricher.consuming().membership(), Membership::Group);
    let health = wait_health(enricher.consuming().health(), |h| h.stalled).await;
    assert_eq!(enricher.assigned_partitions(), 0);
    assert_eq!(health.lag.map(|l| l.messages), Some(40), "{health:?}");
    assert!(!health.ready());
    assert!(health.reason().contains("stalled"), "{}", health.reason());

    // running, it reads them all: no lag, ready again
    let watch = enricher.consuming().health();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(enricher.run(async move {
        let _ = stopped.await;
    }));
    let health = wait_health(watch, |h| h.lag.map(|l| l.messages) == Some(0)).await;
    assert!(health.ready(), "{}", health.reason());
    let _ = stop.send(());
    task.await.unwrap().unwrap();
    sim.stop().await;
    env.cleanup().await;
}

const DONE: &str = "SELECT count(*) FROM enrich_queries WHERE status = 'done'";

#[tokio::test]
async fn each_query_is_rephrased_once_stored_published_and_cached_within_the_ttl() {
    let env = TestEnv::new().await;
    let sim = start_sim(quiet_sim(), "127.0.0.1:0").await;
    let variants = [
        PromptVariant::Detail,
        PromptVariant::KList,
        PromptVariant::Reorg,
    ];
    let running = run(
        enricher_config(&env, &variants),
        llm_config(&sim.base_url()),
    )
    .await;
    // 12 impressions, 4 queries once normalised
    let typed = [
        "red cat",
        "Red  Cat",
        " red cat ",
        "moody white car",
        "MOODY white car",
        "neon dog",
        "neon   dog",
        "neon dog",
        "vintage tree in the snow",
        "red cat",
        "neon dog",
        "moody white car",
    ];
    env.produce(&impressions(&typed)).await;
    wait_for(&env, DONE, 4, Duration::from_secs(30)).await;

    let stored: Vec<(String, String, String, String, i64, bool, String)> = sqlx::query_as(
        "SELECT query, variant, rephrasing, model, prompt_tokens, strict, raw_response
         FROM query_rephrasings ORDER BY query, variant",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(stored.len(), 12, "4 queries x 3 variants");
    let world = WorldRephraser { seed: 11 };
    for (query, variant, text, model, tokens, strict, raw) in &stored {
        let variant = PromptVariant::ALL
            .into_iter()
            .find(|v| v.name() == variant)
            .unwrap();
        assert_eq!(
            text,
            &world.rephrase(query, variant).unwrap(),
            "{query} {variant:?}"
        );
        assert_eq!(model, "kalon-sim-1");
        assert!(*tokens > 0 && !strict && raw.contains("chat.completion"));
    }
    // asked exactly once per (query, variant)
    let stats = sim.stats();
    assert_eq!(stats.rephrased.len(), 12, "{:?}", stats.rephrased);
    assert!(
        stats.rephrased.values().all(|&n| n == 1),
        "{:?}",
        stats.rephrased
    );

    let published = read_topic(
        &env.kafka,
        &env.kafka.topic(kalon_events::REPHRASED_TOPIC),
        4,
        Duration::from_secs(20),
    );
    assert_eq!(published.len(), 4);
    let mut by_query = BTreeMap::new();
    for message in &published {
        let event: serde_json::Value = serde_json::from_slice(&message.payload).unwrap();
        assert_eq!(
            event["rephrasings"].as_object().unwrap().len(),
            3,
            "{event}"
        );
        by_query.insert(event["query"].as_str().unwrap().to_owned(), event);
    }
    assert_eq!(
        by_query.keys().collect::<Vec<_>>(),
        [
            "moody white car",
            "neon dog",
            "red cat",
            "vintage tree in the snow"
        ]
    );

    // seen again within the TTL: a cache hit, no LLM call
    let (before,): (String,) = sqlx::query_as("SELECT now()::text")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    env.produce(&impressions(&["red cat", "neon dog"])).await;
    wait_for(
        &env,
        // the two queries seen again (a late upsert of the first batch, on
        // a loaded machine, may touch another query's last_seen_at too)
        &format!(
            "SELECT count(*) FROM enrich_queries WHERE last_seen_at > '{before}' AND status = 'done'
             AND query IN ('red cat', 'neon dog')"
        ),
        2,
        Duration::from_secs(20),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        sim.stats().rephrase,
        12,
        "nothing asked again within the TTL"
    );
    let report = running.stop().await;
    assert_eq!(report.impressions, 14);
    assert_eq!(report.enriched, 4);

    // with a TTL of 1 s the same query is due again
    let mut config = enricher_config(&env, &variants);
    config.ttl_s = 1;
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let running = run(config, llm_config(&sim.base_url())).await;
    env.produce(&impressions(&["red cat"])).await;
    let started = Instant::now();
    while sim.stats().rephrase < 15 {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{:?}",
            sim.stats().rephrased
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    running.stop().await;
    assert_eq!(sim.stats().rephrased["red cat|detail"], 2);
    assert_eq!(sim.stats().rephrased["neon dog|detail"], 1);
    sim.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_dead_endpoint_loses_nothing_and_a_restart_asks_nothing_twice() {
    let env = TestEnv::new().await;
    // the endpoint's address, with nothing listening yet
    let addr = format!("127.0.0.1:{}", kalon_tests::free_port());
    let base_url = format!("http://{addr}/v1");
    let variants = [PromptVariant::Detail, PromptVariant::KwDict];
    let running = run(enricher_config(&env, &variants), llm_config(&base_url)).await;
    env.produce(&impressions(&["red cat", "neon dog", "blue boat"]))
        .await;
    wait_for(
        &env,
        "SELECT count(*) FROM enrich_queries WHERE status = 'pending' AND attempts > 0 AND last_error IS NOT NULL",
        3,
        Duration::from_secs(30),
    )
    .await;
    let report = running.stop().await;
    assert!(report.postponed >= 3, "{report:?}");
    assert_eq!(report.enriched, 0);

    // the endpoint comes back, answering the first variant of one query
    // and then failing: that answer is kept
    let sim = start_sim(quiet_sim(), &addr).await;
    sim.control(FaultControl {
        script: vec![],
        rates: Some(kalon_sim_llm::FaultRates {
            server_error: 1.0,
            ..Default::default()
        }),
    });
    let running = run(enricher_config(&env, &variants), llm_config(&base_url)).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    running.stop().await;
    let (done,): (i64,) = sqlx::query_as(DONE).fetch_one(&env.pool).await.unwrap();
    assert_eq!(done, 0, "nothing finishes while the endpoint fails");

    // healthy again; a new enricher process finishes the work
    sim.control(FaultControl {
        script: vec![],
        rates: Some(Default::default()),
    });
    let running = run(enricher_config(&env, &variants), llm_config(&base_url)).await;
    wait_for(&env, DONE, 3, Duration::from_secs(30)).await;
    running.stop().await;
    wait_for(
        &env,
        "SELECT count(*) FROM query_rephrasings",
        6,
        Duration::from_secs(1),
    )
    .await;
    let answered: BTreeMap<String, u64> = sim.stats().rephrased;
    let asked_before_restart = sim.stats().rephrase;

    // and a restart after everything is done asks nothing
    let running = run(enricher_config(&env, &variants), llm_config(&base_url)).await;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    running.stop().await;
    assert_eq!(sim.stats().rephrase, asked_before_restart);
    // every (query, variant) was answered by a successful call exactly once:
    // failed calls (500s) are counted by the endpoint too, so check the store
    let rows: Vec<(String, String)> =
        sqlx::query_as("SELECT query, variant FROM query_rephrasings")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert_eq!(rows.len(), 6);
    for (query, variant) in rows {
        assert!(answered.contains_key(&format!("{query}|{variant}")));
    }
    sim.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn malformed_output_is_recorded_retried_strictly_then_dead_lettered() {
    let env = TestEnv::new().await;
    let sim = start_sim(quiet_sim(), "127.0.0.1:0").await;
    let running = run(
        enricher_config(&env, &[PromptVariant::Detail]),
        llm_config(&sim.base_url()),
    )
    .await;
    // first query: one refusal, then the strict prompt works
    sim.control(FaultControl {
        script: vec![Fault::Malformed],
        rates: None,
    });
    env.produce(&impressions(&["red cat"])).await;
    wait_for(&env, DONE, 1, Duration::from_secs(30)).await;
    let (strict,): (bool,) =
        sqlx::query_as("SELECT strict FROM query_rephrasings WHERE query = 'red cat'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert!(strict);
    // second query: malformed twice -> dead-lettered, recorded
    sim.control(FaultControl {
        script: vec![Fault::Malformed, Fault::Malformed],
        rates: None,
    });
    env.produce(&impressions(&["neon dog"])).await;
    wait_for(&env, DONE, 2, Duration::from_secs(30)).await;
    running.stop().await;
    let malformed: Vec<(String, bool, bool, String)> = sqlx::query_as(
        "SELECT query, strict, dead_lettered, raw_response FROM llm_malformed ORDER BY id",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(malformed.len(), 3, "{malformed:?}");
    assert_eq!(
        malformed
            .iter()
            .map(|m| (m.0.as_str(), m.1, m.2))
            .collect::<Vec<_>>(),
        [
            ("red cat", false, false),
            ("neon dog", false, false),
            ("neon dog", true, true)
        ]
    );
    assert!(malformed.iter().all(|m| m.3.contains("sorry")));
    let (stored,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM query_rephrasings WHERE query = 'neon dog'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(stored, 0);
    let dead = read_topic(
        &env.kafka,
        &env.kafka.topic(kalon_events::ENRICH_DEAD_LETTER_TOPIC),
        1,
        Duration::from_secs(20),
    );
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].headers["kalon-dlq-reason"], "malformed_llm_output");
    let payload: serde_json::Value = serde_json::from_slice(&dead[0].payload).unwrap();
    assert_eq!(payload["query"], "neon dog");
    assert_eq!(payload["raw_responses"].as_array().unwrap().len(), 2);
    sim.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn judgments_are_stored_with_raw_responses_and_published() {
    let env = TestEnv::new().await;
    let mut config = quiet_sim();
    config.position_bias = 0.0;
    let sim = start_sim(config, "127.0.0.1:0").await;
    let judge = Judge::new(LlmClient::new(llm_config(&sim.base_url())).unwrap());
    let recorder = JudgmentRecorder::new(judge, env.pool.clone(), env.kafka.clone()).unwrap();
    // rows of the world's most and least relevant images for a query
    let catalog = kalon_world::Catalog::generate(11, 1_000);
    let query = kalon_world::QuerySet::generate(11, 160)
        .queries
        .into_iter()
        .find(|q| q.colour.is_some() && q.scene.is_none())
        .unwrap();
    let row = |relevant: bool| -> JudgedRow {
        let ids: Vec<String> = catalog
            .images
            .iter()
            .filter(|m| (query.relevance(m) == 1.0) == relevant)
            .take(5)
            .map(|m| m.id.clone())
            .collect();
        JudgedRow {
            images: ids
                .iter()
                .map(|id| ImageRef::Url(format!("http://search/v1/images/{id}")))
                .collect(),
            ids,
        }
    };
    let (good, bad) = (row(true), row(false));
    let compared = recorder
        .compare(&query.text, Aspect::Relevance, &good, &bad)
        .await
        .unwrap();
    assert_eq!(compared.verdict, Some(Verdict::Win));
    let scored = recorder
        .score(&query.text, Aspect::Relevance, &good, &bad)
        .await
        .unwrap();
    let (a, b) = scored.scores.unwrap();
    assert!(a > b, "{a} vs {b}");
    type Stored = (
        String,
        Option<String>,
        Option<f64>,
        serde_json::Value,
        serde_json::Value,
        i64,
    );
    let rows: Vec<Stored> = sqlx::query_as(
        "SELECT kind, verdict, score_a, row_a, raw_responses, prompt_tokens FROM lmm_judgments ORDER BY created_at",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(
        (rows[0].0.as_str(), rows[0].1.as_deref()),
        ("compare", Some("win"))
    );
    assert_eq!((rows[1].0.as_str(), rows[1].2), ("score", Some(a)));
    assert_eq!(rows[0].3, serde_json::json!(good.ids));
    assert_eq!(
        rows[0].4.as_array().unwrap().len(),
        2,
        "both orders' raw answers"
    );
    assert!(rows[0].5 > 0);
    let events = read_topic(
        &env.kafka,
        &env.kafka.topic(kalon_events::JUDGMENT_TOPIC),
        2,
        Duration::from_secs(20),
    );
    assert_eq!(events.len(), 2);
    let first: serde_json::Value = serde_json::from_slice(&events[0].payload).unwrap();
    assert_eq!(first["query"], query.text.as_str());
    sim.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn kill_9_mid_call_loses_nothing_a_successor_takes_the_query_over() {
    let env = TestEnv::new().await;
    let mut config = quiet_sim();
    // slow answers, so the kill lands while calls are in flight
    config.latency = Duration::from_millis(1_500);
    let sim = start_sim(config, "127.0.0.1:0").await;
    let spawn = || {
        std::process::Command::new(kalon_tests::workspace_binary("kalon-enricher"))
            .env("DATABASE_URL", &env.database_url)
            .env("KALON_KAFKA_BROKERS", &env.kafka.brokers)
            .env("KALON_TOPIC_PREFIX", &env.kafka.topic_prefix)
            .env(
                "KALON_ENRICHER_GROUP",
                format!("{}enricher", env.kafka.topic_prefix),
            )
            // the default membership (auto); a health port of its own
            .env_remove("KALON_ENRICHER_ASSIGN_ALL")
            .env_remove("KALON_ENRICHER_MEMBERSHIP")
            .env("KALON_ENRICHER_HEALTH_ADDR", "127.0.0.1:0")
            .env("KALON_ENRICH_VARIANTS", "detail,reorg")
            .env("KALON_ENRICH_LEASE_S", "2")
            .env("KALON_ENRICH_POLL_MS", "50")
            .env("KALON_LLM_BASE_URL", sim.base_url())
            .env("KALON_LLM_TIMEOUT_MS", "5000")
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut first = spawn();
    env.produce(&impressions(&["red cat", "neon dog", "blue boat"]))
        .await;
    let started = Instant::now();
    while sim.stats().rephrase < 3 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no calls went out"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    first.kill().unwrap(); // SIGKILL: leases held, answers in flight lost
    first.wait().unwrap();
    let (done,): (i64,) = sqlx::query_as(DONE).fetch_one(&env.pool).await.unwrap();
    assert!(done < 3, "the kill landed mid-work");
    // calls the first process made whose answers it never stored
    let (stored,): (i64,) = sqlx::query_as("SELECT count(*) FROM query_rephrasings")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    let lost = sim.stats().rephrase - stored as u64;
    assert!(lost > 0, "the kill lost calls in flight");
    let mut second = spawn();
    wait_for(&env, DONE, 3, Duration::from_secs(60)).await;
    second.kill().unwrap();
    second.wait().unwrap();
    let rows: Vec<(String, String)> =
        sqlx::query_as("SELECT query, variant FROM query_rephrasings ORDER BY 1, 2")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert_eq!(
        rows.len(),
        6,
        "every query x variant answered and stored: {rows:?}"
    );
    // only calls lost with the process are asked again, each once: the
    // successor's calls outlast its 2 s lease (two variants of 1.5 s), so
    // this holds only because a worker renews its lease while it works
    let stats = sim.stats();
    assert!(stats.rephrased.values().all(|&n| n <= 2), "{stats:?}");
    assert_eq!(stats.rephrase, 6 + lost, "{stats:?}");
    sim.stop().await;
    env.cleanup().await;
}
