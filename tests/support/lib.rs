//! Helpers for Kalon's integration tests. Every test gets its own database
//! (random name, migrations applied) and its own topics (random prefix), so
//! tests run in parallel against one Postgres server. Each test starts its
//! own in-memory tansu broker unless `KALON_TEST_BROKERS` names a shared one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kalon_events::Event;
use kalon_kafka::{KafkaSettings, Outgoing};
use kalon_stack::{Broker, Storage};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use sqlx::PgPool;

pub use kalon_stack::free_port;

/// A random lowercase tag for names.
pub fn tag() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// The Postgres server tests create their databases on.
pub fn server_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| kalon_stack::DEFAULT_DATABASE_URL.into())
}

/// A fresh, migrated database on the server at `server`.
pub async fn fresh_database(server: &str) -> (String, PgPool) {
    let url = kalon_db::with_database(server, &format!("kalon_test_{}", tag()));
    kalon_db::create_database(&url)
        .await
        .expect("create test database");
    let pool = kalon_db::connect(&url, 4)
        .await
        .expect("connect to test database");
    kalon_db::migrate(&pool)
        .await
        .expect("migrate test database");
    (url, pool)
}

/// A private tansu broker for one test.
pub fn private_broker(storage: Storage) -> (Broker, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let binary = kalon_stack::tools::find_tansu().expect("tansu");
    let broker = Broker::start(&binary, free_port(), storage, dir.path()).expect("start tansu");
    (broker, dir)
}

/// One test's world: database, topics, maybe its own broker.
pub struct TestEnv {
    pub database_url: String,
    pub pool: PgPool,
    pub kafka: KafkaSettings,
    pub broker: Option<Broker>,
    _dir: Option<tempfile::TempDir>,
}

impl TestEnv {
    /// On a private in-memory broker, or on a shared one when
    /// `KALON_TEST_BROKERS` names it.
    pub async fn new() -> TestEnv {
        match std::env::var("KALON_TEST_BROKERS") {
            Ok(brokers) if !brokers.is_empty() => Self::on(brokers, None, None).await,
            _ => {
                let (broker, dir) = private_broker(Storage::Memory);
                Self::on(broker.address(), Some(broker), Some(dir)).await
            }
        }
    }

    /// With a private broker of the given storage (tests that restart it).
    pub async fn with_private_broker(storage: Storage) -> TestEnv {
        let (broker, dir) = private_broker(storage);
        Self::on(broker.address(), Some(broker), Some(dir)).await
    }

    /// With a given database server URL (tests that restart Postgres).
    pub async fn on_server(server: &str) -> TestEnv {
        let mut env = Self::new().await;
        let (url, pool) = fresh_database(server).await;
        env.pool.close().await;
        env.database_url = url;
        env.pool = pool;
        env
    }

    async fn on(
        brokers: String,
        broker: Option<Broker>,
        dir: Option<tempfile::TempDir>,
    ) -> TestEnv {
        let kafka = KafkaSettings::new(brokers, format!("t{}.", tag()));
        kalon_kafka::create_topics(&kafka)
            .await
            .expect("create test topics");
        let (database_url, pool) = fresh_database(&server_url()).await;
        TestEnv {
            database_url,
            pool,
            kafka,
            broker,
            _dir: dir,
        }
    }

    pub fn ingest_config(&self) -> kalon_ingest::IngestConfig {
        let mut config = kalon_ingest::IngestConfig::new(
            &self.database_url,
            &self.kafka.brokers,
            &self.kafka.topic_prefix,
        );
        config.max_backoff_ms = 500;
        config
    }

    /// Produces the events (blocking the caller's thread is avoided).
    pub async fn produce(&self, events: &[Event]) {
        let messages: Vec<Outgoing> = events
            .iter()
            .map(|e| Outgoing::event(&self.kafka, e))
            .collect();
        self.send(messages).await;
    }

    pub async fn send(&self, messages: Vec<Outgoing>) {
        let kafka = self.kafka.clone();
        let n = messages.len() as u64;
        let sent =
            tokio::task::spawn_blocking(move || kalon_kafka::produce_all(&kafka, messages, |_| {}))
                .await
                .expect("producer thread")
                .expect("produce");
        assert_eq!(sent, n);
    }

    /// Rows per event table (impressions, clicks, ratings).
    pub async fn counts(&self) -> [i64; 3] {
        kalon_db::event_counts(&self.pool)
            .await
            .expect("count rows")
    }

    /// Waits until the event tables hold `total` rows; panics after `timeout`.
    pub async fn wait_for_rows(&self, total: i64, timeout: Duration) {
        let start = Instant::now();
        loop {
            let now: i64 = match tokio::time::timeout(Duration::from_secs(5), self.counts()).await {
                Ok(counts) => counts.iter().sum(),
                Err(_) => -1,
            };
            if now >= total {
                return;
            }
            assert!(
                start.elapsed() < timeout,
                "only {now} of {total} rows after {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Reads `count` messages from the test's dead-letter topic, or what
    /// arrived within `timeout`.
    pub async fn dead_letters(&self, count: usize, timeout: Duration) -> Vec<Received> {
        let kafka = self.kafka.clone();
        tokio::task::spawn_blocking(move || {
            read_topic(
                &kafka,
                &kafka.topic(kalon_events::DEAD_LETTER_TOPIC),
                count,
                timeout,
            )
        })
        .await
        .expect("reader thread")
    }

    /// Drops the test's database. Its topics stay: deleting topics while
    /// other tests produce trips tansu 0.6's sqlite engine, and random names
    /// keep tests apart anyway.
    pub async fn cleanup(self) {
        self.pool.close().await;
        let _ = kalon_db::drop_database(&self.database_url).await;
    }
}

/// A message read back from a topic.
pub struct Received {
    pub headers: HashMap<String, String>,
    pub payload: Vec<u8>,
}

/// Reads `count` messages from `topic` (from the beginning), or fails after `timeout`.
pub fn read_topic(
    kafka: &KafkaSettings,
    topic: &str,
    count: usize,
    timeout: Duration,
) -> Vec<Received> {
    let consumer: BaseConsumer = kafka
        .client_config("kalon-test-reader")
        .set("group.id", format!("reader-{}", tag()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("reader");
    consumer.subscribe(&[topic]).expect("subscribe");
    let start = Instant::now();
    let mut out = Vec::new();
    while out.len() < count && start.elapsed() < timeout {
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(200)) {
            let headers = message
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| {
                            (
                                h.key.to_owned(),
                                String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            out.push(Received {
                headers,
                payload: message.payload().unwrap_or_default().to_vec(),
            });
        }
    }
    out
}

/// Messages `group` has committed over all of Kalon's event topics: the
/// sum of committed offsets (partitions start at offset 0).
pub fn committed_messages(kafka: &KafkaSettings, group: &str) -> i64 {
    kalon_kafka::consumer::GroupLag::new(kafka, group, kafka.event_topics())
        .expect("lag probe")
        .measure()
        .expect("OffsetFetch")
        .position
}

/// The first consumer-health figures that satisfy `done` (panics after 30 s).
pub async fn wait_health(
    mut health: tokio::sync::watch::Receiver<kalon_kafka::consumer::ConsumerHealth>,
    done: impl Fn(&kalon_kafka::consumer::ConsumerHealth) -> bool,
) -> kalon_kafka::consumer::ConsumerHealth {
    let reached = tokio::time::timeout(Duration::from_secs(30), async {
        health.wait_for(|h| done(h)).await.map(|h| h.clone())
    })
    .await;
    match reached {
        Ok(health) => health.expect("the lag watch stopped"),
        Err(_) => panic!("health never got there: {:?}", *health.borrow()),
    }
}

/// The `kalon-ingest` binary, built if needed (tests that kill the process).
pub fn ingest_binary() -> PathBuf {
    workspace_binary("kalon-ingest")
}

/// Builds (if stale) and locates the workspace binary `bin`.
/// It builds every workspace binary, as the test command does before the
/// tests: building one package alone unifies its dependencies' features
/// differently, so it would rebuild them (and replace the binaries the test
/// command built).
pub fn workspace_binary(bin: &str) -> PathBuf {
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml");
    let status = std::process::Command::new(env!("CARGO"))
        .args([
            "build",
            "--quiet",
            "--locked",
            "--workspace",
            "--bins",
            "--manifest-path",
            manifest,
        ])
        .status()
        .expect("run cargo build");
    assert!(
        status.success(),
        "building the workspace binaries ({bin}) failed"
    );
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/<test> -> target/<profile>/<bin>
    let path = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target dir")
        .join(bin);
    assert!(path.is_file(), "no {bin} binary at {}", path.display());
    path
}

/// The encoder made with the `onnx` Python package (tests/fixtures).
pub fn foreign_encoder() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/foreign-encoder")
}

/// A gzip file's text.
pub fn gunzip(path: &Path) -> String {
    use std::io::Read as _;
    let mut text = String::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap())
        .read_to_string(&mut text)
        .unwrap();
    text
}

/// CLIP's tokenizer.json (tests/fixtures/clip-tokenizer, built from
/// open_clip's vocabulary), written to `path`.
pub fn clip_tokenizer_json(path: &Path) {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/clip-tokenizer");
    std::fs::write(path, gunzip(&fixture.join("tokenizer.json.gz"))).unwrap();
}

/// The CLIP encoder fixture (open_clip's architecture, tiny, random
/// weights; tests/fixtures/clip-encoder/make.sh) as an encoder directory:
/// copied into a temporary one with its tokenizer.json unpacked.
pub fn clip_encoder() -> tempfile::TempDir {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/clip-encoder");
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(&fixture).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    clip_tokenizer_json(&dir.path().join("tokenizer.json"));
    dir
}

/// Largest element-wise difference of two equally long slices.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Runs schemathesis against an OpenAPI document (no server error allowed,
/// a fixed seed) and asserts it exercised `operations` operations.
pub async fn schemathesis(openapi_url: &str, operations: usize) {
    let cache = std::env::var("KALON_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/kalon"));
    let st = cache.join("py-schemathesis/bin/schemathesis");
    assert!(
        st.exists(),
        "{} missing: run bash scripts/install-tools.sh",
        st.display()
    );
    // schemathesis keeps a .schemathesis/ cache in its working directory:
    // a temporary one, not the checkout
    let scratch = tempfile::tempdir().unwrap();
    let output = tokio::process::Command::new(st)
        .current_dir(scratch.path())
        .args([
            "run",
            openapi_url,
            "--checks",
            "not_a_server_error",
            "--max-examples",
            "40",
            "--seed",
            "7",
            "--generation-database",
            "none",
            "--workers",
            "2",
            "--no-color",
            "--request-timeout",
            "20",
        ])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "schemathesis failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // it really exercised the operations
    assert!(
        stdout.contains(&format!("Tested: {operations}")),
        "{stdout}"
    );
}

/// A small world, a randomly initialised reference model on it, and an
/// aligned version of that model (a random adapter), for search tests.
/// A service's `run(shutdown)` future in a task of its own, stopped when the
/// test says so.
pub struct Background<T> {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<T>,
}

impl<T: Send + 'static> Background<T> {
    /// Spawns `run(shutdown)`; `shutdown` completes on [`Background::stop`].
    pub fn spawn<F>(
        run: impl FnOnce(std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>) -> F,
    ) -> Self
    where
        F: std::future::Future<Output = T> + Send + 'static,
    {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(run(Box::pin(async move {
            let _ = stopped.await;
        })));
        Background { stop, task }
    }

    /// Asks it to stop and waits for what it returns.
    pub async fn stop(self) -> T {
        let _ = self.stop.send(());
        self.task.await.expect("the service's task panicked")
    }
}

pub mod webdriver;

pub mod search {
    use std::net::SocketAddr;
    use std::path::PathBuf;

    use candle_core::{Device, Tensor};
    use candle_nn::VarMap;
    use kalon_encoder::EncoderOptions;
    use kalon_registry::indexer::{self, IndexJob, Indexed};
    use kalon_search::{Search, SearchConfig};
    use rand::{Rng, SeedableRng};

    use super::TestEnv;

    pub struct SearchWorld {
        pub world: tempfile::TempDir,
        pub parent: tempfile::TempDir,
        pub aligned: tempfile::TempDir,
    }

    impl SearchWorld {
        pub fn images(&self) -> PathBuf {
            self.world.path().join("images")
        }
    }

    /// The reference model, randomly initialised (seed 4) with a tokenizer
    /// built from `world`'s captions, exported into `out`.
    pub fn random_reference_model(world: &std::path::Path, out: &std::path::Path) {
        kalon_model::export::export_random_reference(world, out, 4).unwrap();
    }

    /// An alignment adapter of `kind` with weights drawn uniformly from
    /// (-scale, scale); the beauty kind's direction is the mean of a few
    /// random query rows.
    pub fn random_adapter_of(
        kind: kalon_align::adapter::AdapterKind,
        dim: usize,
        seed: u64,
        scale: f32,
    ) -> kalon_align::adapter::Adapter {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let queries: Vec<f32> = (0..4 * dim).map(|_| rng.random_range(0.0..1.0)).collect();
        let adapter = kalon_align::adapter::Adapter::in_varmap(
            VarMap::new(),
            dim,
            kind,
            Some(&queries),
            &Device::Cpu,
        )
        .unwrap();
        let var = &adapter.vars()[0];
        let values: Vec<f32> = (0..var.elem_count())
            .map(|_| rng.random_range(-scale..scale))
            .collect();
        var.set(&Tensor::from_vec(values, var.shape(), &Device::Cpu).unwrap())
            .unwrap();
        adapter
    }

    /// A full-matrix alignment adapter with random weights.
    pub fn random_adapter(dim: usize, seed: u64, scale: f32) -> kalon_align::adapter::Adapter {
        random_adapter_of(kalon_align::adapter::AdapterKind::Matrix, dim, seed, scale)
    }

    pub fn search_world(images: usize) -> SearchWorld {
        let world = tempfile::tempdir().unwrap();
        kalon_world::export(
            &kalon_world::WorldSpec::new(21, images),
            world.path(),
            |_| {},
        )
        .unwrap();
        let parent = tempfile::tempdir().unwrap();
        random_reference_model(world.path(), parent.path());
        // an adapter with random non-zero weights, exported as train align does
        let adapter = random_adapter(64, 9, 0.3);
        let aligned = tempfile::tempdir().unwrap();
        let notes = serde_json::json!({ "parent": parent.path().display().to_string() });
        let serde_json::Value::Object(notes) = notes else {
            unreachable!()
        };
        adapter
            .export(parent.path(), aligned.path(), notes)
            .unwrap();
        SearchWorld {
            world,
            parent,
            aligned,
        }
    }

    /// Indexes `version` from an encoder directory (adapter reuse where it can).
    pub async fn index(
        env: &TestEnv,
        world: &SearchWorld,
        version: &str,
        dir: &std::path::Path,
        force_tower: bool,
    ) -> Indexed {
        indexer::index_version(
            &env.pool,
            IndexJob {
                version,
                encoder_dir: dir,
                images: &world.images(),
                parent: None,
                force_tower,
                batch: 64,
                options: &EncoderOptions::default(),
            },
            |_, _| {},
        )
        .await
        .unwrap()
    }

    /// The service's settings for a test: its database and topics, reloads
    /// only on events, short broker timeouts.
    pub fn config(env: &TestEnv, world: &SearchWorld) -> SearchConfig {
        let mut config = SearchConfig::new(
            &env.database_url,
            &env.kafka.brokers,
            &env.kafka.topic_prefix,
        );
        config.images = Some(world.images());
        config.reload_every_s = 3600;
        config.kafka_timeout_ms = 3000;
        config
    }

    /// A running service on a free port; send on the returned channel to stop it.
    pub struct Running {
        pub addr: SocketAddr,
        pub state: kalon_search::AppState,
        pub stop: tokio::sync::oneshot::Sender<()>,
        pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
    }

    impl Running {
        pub fn url(&self, path: &str) -> String {
            format!("http://{}{path}", self.addr)
        }

        pub async fn shutdown(self) {
            let _ = self.stop.send(());
            self.task.await.unwrap().unwrap();
        }
    }

    pub async fn serve(config: SearchConfig) -> Running {
        let search = Search::build(config).await.unwrap();
        let state = search.state.clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(search.serve(listener, async move {
            let _ = stopped.await;
        }));
        Running {
            addr,
            state,
            stop,
            task,
        }
    }
}

/// A minimal OTLP/HTTP collector for the telemetry tests.
pub mod otlp {
    use std::sync::{Arc, Mutex};

    use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::trace::v1::Span;
    use prost::Message as _;
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    use tokio::net::TcpListener;

    #[derive(Default)]
    pub struct Received {
        pub traces: Vec<ExportTraceServiceRequest>,
        pub metrics: Vec<ExportMetricsServiceRequest>,
    }

    /// A minimal OTLP/HTTP collector: accepts POST /v1/traces and /v1/metrics
    /// (protobuf bodies, keep-alive connections) and keeps what it decodes.
    pub async fn collector() -> (String, Arc<Mutex<Received>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = format!("http://{}", listener.local_addr().unwrap());
        let received = Arc::new(Mutex::new(Received::default()));
        let store = received.clone();
        tokio::spawn(async move {
            loop {
                let (socket, _) = listener.accept().await.unwrap();
                let store = store.clone();
                tokio::spawn(async move {
                    let mut reader = BufReader::new(socket);
                    loop {
                        let mut request_line = String::new();
                        if reader.read_line(&mut request_line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        let mut length = 0usize;
                        loop {
                            let mut line = String::new();
                            reader.read_line(&mut line).await.unwrap();
                            if line == "\r\n" {
                                break;
                            }
                            if let Some((name, value)) = line.split_once(':') {
                                if name.eq_ignore_ascii_case("content-length") {
                                    length = value.trim().parse().unwrap();
                                }
                            }
                        }
                        let mut body = vec![0; length];
                        reader.read_exact(&mut body).await.unwrap();
                        {
                            let mut store = store.lock().unwrap();
                            if request_line.contains("/v1/traces") {
                                store
                                    .traces
                                    .push(ExportTraceServiceRequest::decode(&body[..]).unwrap());
                            } else if request_line.contains("/v1/metrics") {
                                store
                                    .metrics
                                    .push(ExportMetricsServiceRequest::decode(&body[..]).unwrap());
                            }
                        }
                        let response = "HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
                        reader
                            .get_mut()
                            .write_all(response.as_bytes())
                            .await
                            .unwrap();
                    }
                });
            }
        });
        (address, received)
    }

    impl Received {
        /// Every span received, in arrival order.
        pub fn spans(&self) -> Vec<Span> {
            self.traces
                .iter()
                .flat_map(|r| &r.resource_spans)
                .flat_map(|r| &r.scope_spans)
                .flat_map(|s| s.spans.clone())
                .collect()
        }

        /// Names of the metrics received.
        pub fn metric_names(&self) -> std::collections::BTreeSet<String> {
            self.metrics
                .iter()
                .flat_map(|r| &r.resource_metrics)
                .flat_map(|r| &r.scope_metrics)
                .flat_map(|s| &s.metrics)
                .map(|m| m.name.clone())
                .collect()
        }
    }

    pub fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Simulated search traffic whose examination curve is known: the world's
/// people (`kalon_world::Users::browse`, rank r examined with probability
/// `1 / r^0.8`) on lists from a decent but imperfect ranker, each list with
/// search's exploration swap (`kalon_events::explore`, rate 1).
pub mod traffic {
    use kalon_events::explore::{self, Exploration};
    use kalon_events::ResultItem;
    use kalon_world::text::Split;
    use kalon_world::{Catalog, ImageMeta, Oracle, Query, QuerySet, Users};

    /// One answered search and what the person clicked.
    pub struct List {
        pub request_id: String,
        pub query: String,
        /// As shown (swap applied; the moved pair carries `model_rank`).
        pub shown: Vec<ResultItem>,
        /// Shown ranks clicked.
        pub clicks: Vec<u32>,
    }

    pub struct Traffic {
        pub lists: Vec<List>,
        pub queries: Vec<Query>,
        pub users: Users,
        /// Lists whose swap was at k, for k = 1..depth-1.
        pub swaps: [u64; 9],
    }

    /// The top `depth` images for `query`: relevance plus the oracle's
    /// beauty, with noise, so attractiveness falls with rank as it does
    /// behind a real model.
    fn ranked<'c>(
        catalog: &'c Catalog,
        query: &Query,
        oracle: &Oracle,
        depth: usize,
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
        scored.truncate(depth);
        scored
    }

    impl Traffic {
        /// `sessions` searches of each of `queries` training queries
        /// (depth at most 10), the same for a seed.
        pub fn generate(seed: u64, queries: usize, sessions: usize, depth: usize) -> Traffic {
            assert!((2..=10).contains(&depth));
            let catalog = Catalog::generate(seed, 3_000);
            let queries: Vec<Query> = QuerySet::generate(seed, 160)
                .split(Split::Train)
                .take(queries)
                .cloned()
                .collect();
            let oracle = Oracle::default();
            let users = Users::default();
            let exploration = Exploration::new(1.0, depth as u32).unwrap();
            let mut ranker_rng = kalon_world::stream(seed, "ranker");
            let mut people = kalon_world::stream(seed, "people");
            let mut swaps = [0u64; 9];
            let mut lists = Vec::new();
            for (q, query) in queries.iter().enumerate() {
                let list = ranked(&catalog, query, &oracle, depth, &mut ranker_rng);
                assert_eq!(list.len(), depth, "{} has enough matches", query.text);
                for s in 0..sessions {
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
                    }
                    lists.push(List {
                        request_id,
                        query: query.text.clone(),
                        shown,
                        clicks: session.clicks,
                    });
                }
            }
            Traffic {
                lists,
                queries,
                users,
                swaps,
            }
        }
    }
}
