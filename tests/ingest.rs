//! Ingest against a real PostgreSQL and a real Kafka-API broker: round trip
//! field by field, redeliveries, malformed input, kill -9, broker restart,
//! Postgres restart, graceful shutdown.

use std::collections::HashMap;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use kalon_events::generate::Generator;
use kalon_events::{Event, EventKind};
use kalon_ingest::{dead_letter_headers as dlq, Ingest, IngestReport};
use kalon_kafka::consumer::{GroupLag, Lag};
use kalon_kafka::Outgoing;
use kalon_stack::{PgCluster, Storage};
use kalon_tests::{wait_health, TestEnv};
use tokio::sync::oneshot;

/// Ingest running in this process until the returned sender fires.
fn spawn_ingest(
    ingest: Ingest,
) -> (
    oneshot::Sender<()>,
    tokio::task::JoinHandle<anyhow::Result<IngestReport>>,
) {
    let (stop, stopped) = oneshot::channel::<()>();
    let handle = tokio::spawn(ingest.run(async {
        let _ = stopped.await;
    }));
    (stop, handle)
}

fn events(seed: u64, n_each: usize) -> Vec<Event> {
    let mut generator = Generator::new(seed);
    let mut out = Vec::new();
    for _ in 0..n_each {
        for kind in EventKind::ALL {
            out.push(generator.event_of(kind));
        }
    }
    out
}

fn mixed(seed: u64, n: usize) -> Vec<Event> {
    let mut generator = Generator::new(seed);
    (0..n).map(|_| generator.next_event()).collect()
}

/// Every event is in Postgres exactly as produced, and nothing else is.
async fn assert_exactly(env: &TestEnv, events: &[Event]) {
    let expected: [i64; 3] =
        EventKind::ALL.map(|k| events.iter().filter(|e| e.kind() == k).count() as i64);
    assert_eq!(env.counts().await, expected, "rows per table");
    // read every row back as the event it claims to be: the row as JSON,
    // decoded and validated by the same contract as the producer's event
    let mut stored: HashMap<uuid::Uuid, Event> = HashMap::new();
    for kind in EventKind::ALL {
        let rows: Vec<(serde_json::Value,)> = sqlx::query_as(&format!(
            "SELECT to_jsonb(t) - 'ingested_at' FROM {} t",
            kind.table()
        ))
        .fetch_all(&env.pool)
        .await
        .unwrap();
        for (row,) in rows {
            let event = Event::decode(kind, &serde_json::to_vec(&row).unwrap())
                .unwrap_or_else(|e| panic!("row {row} is not a valid {kind:?}: {e}"));
            stored.insert(event.event_id(), event);
        }
    }
    assert_eq!(stored.len(), events.len(), "distinct event ids stored");
    for event in events {
        assert_eq!(
            stored.get(&event.event_id()),
            Some(event),
            "stored row differs from the event"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_field_by_field_and_redeliveries_ignored() {
    let env = TestEnv::new().await;
    let events = events(1, 400);
    env.produce(&events).await;
    // a redelivery of a third of them, as a producer retry would make
    env.produce(&events[..400]).await;

    let (stop, running) = spawn_ingest(Ingest::build(env.ingest_config()).await.unwrap());
    env.wait_for_rows(events.len() as i64, Duration::from_secs(60))
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.send(()).unwrap();
    let report = running.await.unwrap().unwrap();

    assert_exactly(&env, &events).await;
    assert_eq!(report.written, events.len() as u64);
    assert_eq!(report.duplicates, 400, "{report:?}");
    assert_eq!(report.dead_letters, 0);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_events_go_to_the_dead_letter_topic_with_reasons() {
    let env = TestEnv::new().await;
    let mut generator = Generator::new(2);
    let mut messages = Vec::new();
    let mut good = Vec::new();
    let mut expected_reasons: HashMap<&str, usize> = HashMap::new();
    let mut bad_payloads = std::collections::HashSet::new();
    for i in 0..3_000 {
        if i % 3 == 1 {
            let (kind, payload, reason) = generator.malformed();
            *expected_reasons.entry(reason).or_default() += 1;
            bad_payloads.insert(payload.clone());
            messages.push(Outgoing {
                topic: env.kafka.topic(kind.topic()),
                key: None,
                payload,
                headers: None,
            });
        } else {
            let event = generator.next_event();
            messages.push(Outgoing::event(&env.kafka, &event));
            good.push(event);
        }
    }
    assert_eq!(expected_reasons.values().sum::<usize>(), 1_000);
    env.send(messages).await;

    let (stop, running) = spawn_ingest(Ingest::build(env.ingest_config()).await.unwrap());
    env.wait_for_rows(good.len() as i64, Duration::from_secs(60))
        .await;
    let dead = env.dead_letters(1_000, Duration::from_secs(60)).await;
    stop.send(()).unwrap();
    let report = running.await.unwrap().unwrap();

    assert_exactly(&env, &good).await;
    assert_eq!(dead.len(), 1_000);
    assert_eq!(report.dead_letters, 1_000);
    let mut reasons: HashMap<&str, usize> = HashMap::new();
    for letter in &dead {
        let reason = letter
            .headers
            .get(dlq::REASON)
            .expect("reason header")
            .as_str();
        let known = expected_reasons
            .keys()
            .find(|r| **r == reason)
            .copied()
            .unwrap_or("unexpected");
        *reasons.entry(known).or_default() += 1;
        assert!(
            bad_payloads.contains(&letter.payload),
            "dead letter carries the original payload"
        );
        assert!(!letter.headers[dlq::DETAIL].is_empty());
        assert!(letter.headers[dlq::SOURCE_TOPIC].starts_with(&env.kafka.topic_prefix));
        letter.headers[dlq::SOURCE_PARTITION]
            .parse::<i32>()
            .expect("partition header");
        letter.headers[dlq::SOURCE_OFFSET]
            .parse::<i64>()
            .expect("offset header");
    }
    assert_eq!(reasons, expected_reasons);
    env.cleanup().await;
}

/// A `kalon-ingest` process, killed when dropped so a failing test leaves
/// no consumer behind.
struct IngestProcess(Child);

impl IngestProcess {
    fn kill_9(&mut self) {
        self.0.kill().expect("kill -9");
        self.0.wait().expect("reap");
    }

    fn has_exited(&mut self) -> bool {
        self.0.try_wait().expect("try_wait").is_some()
    }

    fn sigterm_and_wait(&mut self) -> ExitStatus {
        let sent = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status()
            .expect("run kill");
        assert!(sent.success());
        self.0.wait().expect("wait")
    }
}

impl Drop for IngestProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// How a test's ingest process takes its partitions.
#[derive(Clone, Copy)]
enum Membership {
    /// No flag: what a user runs (`auto`: every partition itself on tansu).
    Default,
    /// `--membership group`: joins the consumer group and leaves it on a
    /// clean exit.
    Group,
    /// `--assign-all`: takes every partition itself, as a single replica.
    AssignAll,
}

fn start_ingest_process(
    env: &TestEnv,
    binary: &std::path::Path,
    membership: Membership,
) -> IngestProcess {
    let config = env.ingest_config();
    let mut command = Command::new(binary);
    match membership {
        Membership::Default => {}
        Membership::Group => {
            command.args(["--membership", "group"]);
        }
        Membership::AssignAll => {
            command.arg("--assign-all");
        }
    }
    let child = command
        .args([
            "--database-url",
            config.database.url.expose(),
            "--brokers",
            &config.kafka.brokers,
        ])
        .args([
            "--topic-prefix",
            &config.kafka.topic_prefix,
            "--group",
            &config.consumer.group_id,
        ])
        .args(["--batch-max", "500", "--max-backoff-ms", "500"])
        // tests run side by side: each its own health port
        .args(["--health-addr", "127.0.0.1:0"])
        .env("RUST_LOG", "warn")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("KALON_INGEST_MEMBERSHIP")
        .env_remove("KALON_INGEST_ASSIGN_ALL")
        .stdin(Stdio::null())
        .spawn()
        .expect("start kalon-ingest");
    IngestProcess(child)
}

/// Status and JSON body of `GET http://127.0.0.1:port{path}` (no status
/// while nothing listens yet).
async fn get_json(port: u16, path: &str) -> (Option<u16>, serde_json::Value) {
    kalon_telemetry::install_crypto_provider();
    match reqwest::get(format!("http://127.0.0.1:{port}{path}")).await {
        Ok(response) => {
            let status = response.status().as_u16();
            let body = response.text().await.unwrap_or_default();
            (
                Some(status),
                serde_json::from_str(&body).unwrap_or_default(),
            )
        }
        Err(_) => (None, serde_json::Value::Null),
    }
}

/// The group's lag over `topics`, measured against the broker.
async fn lag_of(env: &TestEnv, group: &str, topics: Vec<String>) -> Lag {
    let probe = GroupLag::new(&env.kafka, group, topics).expect("lag probe");
    tokio::task::spawn_blocking(move || probe.measure())
        .await
        .unwrap()
        .expect("measure the lag")
}

/// A producer's stream with crashes: valid events, exact redeliveries of
/// some of them and malformed payloads, with the ingest process killed
/// (SIGKILL) and restarted after each quarter. Every valid event lands once,
/// every malformed one is dead-lettered (once per source position).
async fn crash_campaign(membership: Membership, seed: u64) {
    // sqlite storage: tansu 0.6's memory:// engine answers a fetch that
    // starts inside a record batch with the *next* batch, so a consumer
    // resuming at a committed offset mid-batch would skip the batch's rest
    // (tansu-storage dynostore.rs `fetch`: `offsets.split_off(&offset)`)
    let env = TestEnv::with_private_broker(Storage::Sqlite("tansu.db".into())).await;
    let binary = tokio::task::spawn_blocking(kalon_tests::ingest_binary)
        .await
        .unwrap();
    let events = mixed(seed, 20_000);
    let mut generator = Generator::new(seed + 1_000);
    let mut malformed = 0;
    let mut child = start_ingest_process(&env, &binary, membership);
    for (round, chunk) in events.chunks(5_000).enumerate() {
        let mut messages: Vec<Outgoing> = chunk
            .iter()
            .chain(&chunk[..250]) // redelivered, as a producer's retry would
            .map(|e| Outgoing::event(&env.kafka, e))
            .collect();
        for _ in 0..200 {
            let (kind, payload, _) = generator.malformed();
            messages.push(Outgoing {
                topic: env.kafka.topic(kind.topic()),
                key: None,
                payload,
                headers: None,
            });
            malformed += 1;
        }
        env.send(messages).await;
        // let it get into the stream, then kill it without warning
        tokio::time::sleep(Duration::from_millis(700 + 300 * round as u64)).await;
        child.kill_9();
        child = start_ingest_process(&env, &binary, membership);
    }
    env.wait_for_rows(events.len() as i64, Duration::from_secs(120))
        .await;
    // the last process drains the topics: the group's lag reaches zero
    let group = env.ingest_config().consumer.group_id;
    let started = std::time::Instant::now();
    loop {
        let lag = lag_of(&env, &group, env.kafka.event_topics()).await;
        if lag.messages == 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the restarted ingest stalled: {lag:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    child.kill_9();
    assert_exactly(&env, &events).await;
    // a kill between a dead letter's acknowledgement and the offset commit
    // sends it again: count source positions
    let dead_topic = env.kafka.topic(kalon_events::DEAD_LETTER_TOPIC);
    let total = lag_of(&env, "nobody", vec![dead_topic]).await.messages;
    let dead = env
        .dead_letters(total as usize, Duration::from_secs(30))
        .await;
    let sources: std::collections::HashSet<(String, String, String)> = dead
        .iter()
        .map(|d| {
            (
                d.headers[dlq::SOURCE_TOPIC].clone(),
                d.headers[dlq::SOURCE_PARTITION].clone(),
                d.headers[dlq::SOURCE_OFFSET].clone(),
            )
        })
        .collect();
    assert_eq!(sources.len(), malformed, "dead-lettered source positions");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_loses_and_duplicates_nothing_in_the_default_configuration() {
    crash_campaign(Membership::Default, 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_loses_and_duplicates_nothing_with_assign_all() {
    crash_campaign(Membership::AssignAll, 13).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_holding_no_partitions_reports_the_true_lag_and_fails_readiness() {
    // sqlite storage: tansu 0.6's memory:// engine answers ListOffsets(latest)
    // with the last record batch's base offset + 1, not the high watermark
    let env = TestEnv::with_private_broker(kalon_stack::Storage::Sqlite("tansu.db".into())).await;
    let events = mixed(8, 3_000);
    env.produce(&events).await;
    // a group member that has subscribed but never polled holds nothing:
    // librdkafka's own statistics would call that no lag at all
    let mut config = env.ingest_config();
    config.consumer.membership = kalon_kafka::consumer::Membership::Group;
    config.consumer.stall_after_s = 2;
    let ingest = Ingest::build(config).await.unwrap();
    // what the binary serves on /readyz, served here
    let addr = kalon_telemetry::health::serve(
        "127.0.0.1:0".parse().unwrap(),
        std::sync::Arc::new(ingest.consuming().readiness()),
    )
    .await
    .unwrap();
    let health = wait_health(ingest.consuming().health(), |h| h.stalled).await;
    assert_eq!(ingest.assigned_partitions(), 0);
    let (status, body) = get_json(addr.port(), "/readyz").await;
    assert_eq!(status, Some(503), "{body}");
    assert_eq!(body["lag"], 3_000, "{body}");
    assert_eq!(body["membership"], "group", "{body}");
    assert_eq!(health.lag.map(|l| l.messages), Some(3_000), "{health:?}");
    assert!(!health.ready());
    assert!(health.reason().contains("stalled"), "{}", health.reason());

    // running, it drains the topics: no lag, ready again
    let watch = ingest.consuming().health();
    let (stop, running) = spawn_ingest(ingest);
    env.wait_for_rows(events.len() as i64, Duration::from_secs(60))
        .await;
    let health = wait_health(watch, |h| h.lag.map(|l| l.messages) == Some(0)).await;
    assert!(health.ready(), "{}", health.reason());
    let (status, body) = get_json(addr.port(), "/readyz").await;
    assert_eq!(status, Some(200), "{body}");
    stop.send(()).unwrap();
    running.await.unwrap().unwrap();
    assert_exactly(&env, &events).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_readiness_with_the_groups_lag() {
    let env = TestEnv::with_private_broker(Storage::Sqlite("tansu.db".into())).await;
    let binary = tokio::task::spawn_blocking(kalon_tests::ingest_binary)
        .await
        .unwrap();
    let events = mixed(9, 2_000);
    env.produce(&events).await;
    let port = kalon_tests::free_port();
    let config = env.ingest_config();
    let mut child = IngestProcess(
        Command::new(&binary)
            .args(["--database-url", config.database.url.expose()])
            .args(["--brokers", &config.kafka.brokers])
            .args(["--topic-prefix", &config.kafka.topic_prefix])
            .args(["--group", &config.consumer.group_id])
            .args(["--health-addr", &format!("127.0.0.1:{port}")])
            .env("RUST_LOG", "warn")
            .env_remove("KALON_INGEST_MEMBERSHIP")
            .env_remove("KALON_INGEST_ASSIGN_ALL")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .stdin(Stdio::null())
            .spawn()
            .expect("start kalon-ingest"),
    );
    env.wait_for_rows(events.len() as i64, Duration::from_secs(60))
        .await;
    // the lag is measured every few seconds: wait for the drained figure
    let started = std::time::Instant::now();
    let body = loop {
        let (status, body) = get_json(port, "/readyz").await;
        if status == Some(200) && body["lag"] == 0 {
            break body;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "readiness never reported the drained topics: {status:?} {body}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(body["membership"], "assign-all", "{body}");
    assert_eq!(body["ready"], true);
    let (status, _) = get_json(port, "/healthz").await;
    assert_eq!(status, Some(200));
    child.sigterm_and_wait();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_during_a_stream_loses_nothing() {
    let mut env = TestEnv::with_private_broker(Storage::Sqlite("tansu.db".into())).await;
    let events = mixed(4, 10_000);
    let (stop, running) = spawn_ingest(Ingest::build(env.ingest_config()).await.unwrap());
    env.produce(&events[..5_000]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    env.broker
        .as_mut()
        .unwrap()
        .restart()
        .expect("restart the broker");
    env.produce(&events[5_000..]).await;
    env.wait_for_rows(events.len() as i64, Duration::from_secs(120))
        .await;
    stop.send(()).unwrap();
    running.await.unwrap().unwrap();
    assert_exactly(&env, &events).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_during_a_stream_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = tokio::task::spawn_blocking({
        let path = dir.path().join("pg");
        move || {
            let cluster = PgCluster::open(&path, kalon_tests::free_port())
                .unwrap()
                .stop_on_drop();
            cluster.start().unwrap();
            cluster
        }
    })
    .await
    .unwrap();
    let env = TestEnv::on_server(&cluster.url("postgres")).await;
    let events = mixed(5, 12_000);
    let (stop, running) = spawn_ingest(Ingest::build(env.ingest_config()).await.unwrap());
    let producing = {
        let kafka_env_events = events.clone();
        let kafka = env.kafka.clone();
        tokio::spawn(async move {
            for chunk in kafka_env_events.chunks(1_000) {
                let messages: Vec<Outgoing> =
                    chunk.iter().map(|e| Outgoing::event(&kafka, e)).collect();
                let k = kafka.clone();
                tokio::task::spawn_blocking(move || kalon_kafka::produce_all(&k, messages, |_| {}))
                    .await
                    .unwrap()
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.stop().unwrap();
        std::thread::sleep(Duration::from_secs(2));
        cluster.start().unwrap();
        cluster
    })
    .await
    .unwrap();
    producing.await.unwrap();
    env.wait_for_rows(events.len() as i64, Duration::from_secs(120))
        .await;
    stop.send(()).unwrap();
    running.await.unwrap().unwrap();
    assert_exactly(&env, &events).await;
    env.cleanup().await;
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_the_batch_and_commits() {
    let env = TestEnv::new().await;
    let binary = tokio::task::spawn_blocking(kalon_tests::ingest_binary)
        .await
        .unwrap();
    let events = mixed(6, 8_000);
    env.produce(&events).await;
    // a dynamic member: on SIGTERM it leaves the group, as a rolling
    // restart or a scale-down would
    let mut child = start_ingest_process(&env, &binary, Membership::Group);
    // stop it while it drains
    loop {
        assert!(!child.has_exited(), "ingest exited early");
        let landed: i64 = env.counts().await.iter().sum();
        if landed > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = child.sigterm_and_wait();
    assert!(
        status.success(),
        "ingest exits cleanly on SIGTERM: {status:?}"
    );
    let landed_at_stop: i64 = env.counts().await.iter().sum();
    assert!(landed_at_stop < events.len() as i64, "stopped mid-stream");

    // Every message written before SIGTERM is committed, and nothing more:
    // each partition's committed offset counts its messages in Postgres.
    // (Read with OffsetFetch: a successor in the same group would depend on
    // tansu 0.6's rebalancing, which sometimes leaves partitions unassigned.)
    let committed = {
        let kafka = env.kafka.clone();
        let group = env.ingest_config().consumer.group_id;
        tokio::task::spawn_blocking(move || kalon_tests::committed_messages(&kafka, &group))
            .await
            .unwrap()
    };
    assert_eq!(
        committed, landed_at_stop,
        "committed offsets match what was written"
    );

    // A consumer that starts over (a new group) lands the rest; what the
    // first one wrote comes back only as duplicates.
    let mut config = env.ingest_config();
    config.consumer.group_id = format!("{}successor", env.kafka.topic_prefix);
    let (stop, running) = spawn_ingest(Ingest::build(config).await.unwrap());
    env.wait_for_rows(events.len() as i64, Duration::from_secs(60))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.send(()).unwrap();
    let report = running.await.unwrap().unwrap();
    assert_eq!(report.duplicates as i64, landed_at_stop);
    assert_eq!(report.written as i64, events.len() as i64 - landed_at_stop);
    assert_exactly(&env, &events).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_the_database_refuses_is_dead_lettered_and_its_batch_lands() {
    let env = TestEnv::new().await;
    let mut generator = Generator::new(7);
    let mut good: Vec<Event> = (0..200)
        .map(|_| generator.event_of(EventKind::Rating))
        .collect();
    // valid by the contract, refused by Postgres: text cannot hold NUL
    let mut poison = match generator.event_of(EventKind::Rating) {
        Event::Rating(rating) => rating,
        _ => unreachable!(),
    };
    poison.query = "sunset\u{0}beach".into();
    let poison = Event::Rating(poison);
    assert!(Event::decode(EventKind::Rating, &poison.to_json()).is_ok());
    let mut stream = good.split_off(100);
    stream.insert(0, poison.clone());
    let all: Vec<Event> = good.iter().cloned().chain(stream.iter().cloned()).collect();
    env.produce(&all).await;

    let (stop, running) = spawn_ingest(Ingest::build(env.ingest_config()).await.unwrap());
    let expected: Vec<Event> = all.iter().filter(|e| **e != poison).cloned().collect();
    env.wait_for_rows(expected.len() as i64, Duration::from_secs(60))
        .await;
    let dead = env.dead_letters(1, Duration::from_secs(30)).await;
    stop.send(()).unwrap();
    let report = running.await.unwrap().unwrap();

    assert_exactly(&env, &expected).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].headers[dlq::REASON], "rejected_by_database");
    assert_eq!(dead[0].payload, poison.to_json());
    assert_eq!(report.dead_letters, 1);
    env.cleanup().await;
}
