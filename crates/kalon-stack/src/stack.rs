//! `kalonctl stack up | down | status`: the whole local stack, with what it
//! started recorded in `.kalon/stack.json` so `down` stops only that.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::{tools, Broker, PgCluster, Storage};

pub use kalon_service::{DEFAULT_BROKERS, DEFAULT_DATABASE_URL};
/// Port of the private cluster started when no Postgres answers.
pub const PRIVATE_PG_PORT: u16 = 54329;

/// What the stack is and what `up` started.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StackState {
    pub database_url: String,
    pub brokers: String,
    /// `up` started a private Postgres cluster in this folder.
    pub started_postgres: Option<PathBuf>,
    /// `up` started this tansu process.
    pub started_broker_pid: Option<u32>,
}

impl StackState {
    fn path(root: &Path) -> PathBuf {
        root.join("stack.json")
    }

    /// The state recorded by the last `up` in `root`, if any.
    pub fn load(root: &Path) -> Option<StackState> {
        let text = std::fs::read_to_string(Self::path(root)).ok()?;
        serde_json::from_str(&text).ok()
    }

    fn save(&self, root: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(root)?;
        std::fs::write(Self::path(root), serde_json::to_string_pretty(self)?)?;
        Ok(())
    }

    /// Shell lines that point other programs at this stack.
    pub fn env_lines(&self) -> String {
        format!(
            "export DATABASE_URL={}\nexport KALON_KAFKA_BROKERS={}\n",
            self.database_url, self.brokers
        )
    }
}

/// Whether a Postgres server answers at `url` (its `postgres` database).
async fn postgres_answers(url: &str) -> bool {
    let admin = kalon_db::with_database(url, "postgres");
    kalon_db::connect(&admin, 1).await.is_ok()
}

/// Whether a Kafka-API broker answers at `brokers` (a metadata request).
fn broker_answers(brokers: &str) -> bool {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let first = brokers.split(',').next().unwrap_or_default();
    if !crate::port_open(first) {
        return false;
    }
    let consumer: Result<BaseConsumer, _> = kalon_kafka::KafkaSettings::new(brokers, "")
        .client_config("kalon-stack-probe")
        .create();
    consumer.is_ok_and(|c| {
        c.fetch_metadata(None, std::time::Duration::from_secs(3))
            .is_ok()
    })
}

/// Brings the stack up: uses what answers at the given addresses (else
/// those of the last `up` here, else the defaults) and starts the rest.
/// Running it twice is harmless.
pub async fn up(
    root: &Path,
    database_url: Option<&str>,
    brokers: Option<&str>,
) -> anyhow::Result<StackState> {
    let previous = StackState::load(root);
    let database_url = database_url
        .map(str::to_owned)
        .or_else(|| previous.as_ref().map(|p| p.database_url.clone()))
        .unwrap_or_else(|| DEFAULT_DATABASE_URL.to_owned());
    let brokers = brokers
        .map(str::to_owned)
        .or_else(|| previous.as_ref().map(|p| p.brokers.clone()))
        .unwrap_or_else(|| DEFAULT_BROKERS.to_owned());
    // what the last `up` started at these same addresses is still ours
    let ours = previous.filter(|p| p.database_url == database_url || p.brokers == brokers);
    let mut state = StackState {
        database_url: database_url.clone(),
        brokers: brokers.clone(),
        started_postgres: None,
        started_broker_pid: None,
    };
    let database_url = database_url.as_str();
    let brokers = brokers.as_str();

    if postgres_answers(database_url).await {
        eprintln!(
            "postgres: using the server at {}",
            kalon_db::redact(database_url)
        );
        state.started_postgres = ours
            .as_ref()
            .filter(|p| p.database_url == database_url)
            .and_then(|p| p.started_postgres.clone());
    } else {
        let dir = root.join("pg");
        let url = kalon_db::with_database(
            &format!("postgres://postgres@127.0.0.1:{PRIVATE_PG_PORT}/"),
            kalon_db::options(database_url)?
                .get_database()
                .unwrap_or("kalon"),
        );
        eprintln!(
            "postgres: nothing answers at {}; starting a private cluster in {} on port {PRIVATE_PG_PORT}",
            kalon_db::redact(database_url),
            dir.display()
        );
        let cluster = tokio::task::spawn_blocking(move || -> anyhow::Result<PathBuf> {
            let cluster = PgCluster::open(&dir, PRIVATE_PG_PORT)?;
            cluster.start()?;
            Ok(dir)
        })
        .await??;
        state.database_url = url;
        state.started_postgres = Some(cluster);
    }
    kalon_db::create_database(&state.database_url).await?;

    let probe = brokers.to_owned();
    if tokio::task::spawn_blocking(move || broker_answers(&probe)).await? {
        eprintln!("kafka: using the broker at {brokers}");
        state.started_broker_pid = ours
            .filter(|p| p.brokers == brokers)
            .and_then(|p| p.started_broker_pid.filter(|pid| is_tansu(*pid)));
    } else {
        let port: u16 = brokers
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .context("KALON_KAFKA_BROKERS must be host:port to start a local broker")?;
        let binary = tokio::task::spawn_blocking(tools::install_tansu).await??;
        let dir = root.join("tansu");
        eprintln!(
            "kafka: starting tansu on 127.0.0.1:{port} (sqlite storage in {})",
            dir.display()
        );
        let broker = Broker::start(&binary, port, Storage::Sqlite("tansu.db".into()), &dir)?;
        state.brokers = broker.address();
        state.started_broker_pid = broker.detach();
    }
    state.save(root)?;
    Ok(state)
}

fn is_tansu(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|cmd| String::from_utf8_lossy(&cmd).contains("tansu"))
}

/// Stops what `up` started, and nothing else.
pub fn down(root: &Path) -> anyhow::Result<()> {
    let Some(state) = StackState::load(root) else {
        eprintln!("nothing recorded in {}; nothing to stop", root.display());
        return Ok(());
    };
    match state.started_broker_pid {
        Some(pid) if is_tansu(pid) => {
            std::process::Command::new("kill")
                .arg(pid.to_string())
                .status()?;
            eprintln!("kafka: stopped tansu (pid {pid})");
        }
        _ => eprintln!("kafka: not started by the stack; left alone"),
    }
    match &state.started_postgres {
        Some(dir) => {
            PgCluster::open(dir, PRIVATE_PG_PORT)?.stop()?;
            eprintln!("postgres: stopped the private cluster in {}", dir.display());
        }
        None => eprintln!("postgres: not started by the stack; left alone"),
    }
    std::fs::remove_file(StackState::path(root)).ok();
    Ok(())
}

/// Restarts the tansu broker `up` started: SIGKILL, as a crash would, then
/// the same port and storage (the chaos mode of `kalonctl up`).
pub fn restart_broker(root: &Path) -> anyhow::Result<()> {
    let mut state = StackState::load(root).context("the stack is not up here")?;
    let pid = state
        .started_broker_pid
        .filter(|pid| is_tansu(*pid))
        .with_context(|| {
            format!(
                "the broker at {} was not started by the stack; not restarted",
                state.brokers
            )
        })?;
    std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()?;
    let gone = std::time::Instant::now();
    while is_tansu(pid) && gone.elapsed() < std::time::Duration::from_secs(10) {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let port: u16 = state
        .brokers
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .context("the stack's broker address has no port")?;
    let binary = tools::find_tansu()?;
    let broker = Broker::start(
        &binary,
        port,
        Storage::Sqlite("tansu.db".into()),
        &root.join("tansu"),
    )?;
    state.started_broker_pid = broker.detach();
    state.save(root)
}

/// Restarts the private Postgres cluster `up` started (fast shutdown: open
/// sessions are cut), for the chaos mode of `kalonctl up`.
pub fn restart_postgres(root: &Path) -> anyhow::Result<()> {
    let state = StackState::load(root).context("the stack is not up here")?;
    let dir = state.started_postgres.with_context(|| {
        format!(
            "postgres at {} was not started by the stack; not restarted",
            kalon_db::redact(&state.database_url)
        )
    })?;
    let cluster = PgCluster::open(&dir, PRIVATE_PG_PORT)?;
    cluster.stop()?;
    cluster.start()
}

/// One line per part: where it is, whether it answers, who started it.
pub async fn status(root: &Path, database_url: &str, brokers: &str) -> anyhow::Result<String> {
    let state = StackState::load(root);
    let (db, kafka) = match &state {
        Some(s) => (s.database_url.clone(), s.brokers.clone()),
        None => (database_url.to_owned(), brokers.to_owned()),
    };
    let pg_up = postgres_answers(&db).await;
    let probe = kafka.clone();
    let kafka_up = tokio::task::spawn_blocking(move || broker_answers(&probe)).await?;
    let pg_owner = match state.as_ref().and_then(|s| s.started_postgres.as_ref()) {
        Some(dir) => format!("private cluster in {}", dir.display()),
        None => "external".into(),
    };
    let kafka_owner = match state.as_ref().and_then(|s| s.started_broker_pid) {
        Some(pid) => format!("tansu pid {pid}"),
        None => "external".into(),
    };
    let word = |up: bool| if up { "up" } else { "DOWN" };
    Ok(format!(
        "postgres  {:<5} {}  ({pg_owner})\nkafka     {:<5} {}  ({kafka_owner})\n",
        word(pg_up),
        kalon_db::redact(&db),
        word(kafka_up),
        kafka
    ))
}
