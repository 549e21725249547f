//! `kalonctl`'s library: the commands an operator runs by hand (stack,
//! migrate, topics, produce, demo, sim, train, eval, encoder, index, deploy,
//! models, pairs, canary, serve, up),
//! as thin wiring over the crates that do the work. The `kalonctl` binary
//! parses arguments and calls these; `kalon-bench` (tools/bench) reuses the
//! same wiring for its benchmarks, which stay out of the production image.

pub mod align;
pub mod canary;
pub mod demo;
pub mod events;
pub mod model;
pub mod models;
pub mod pairs;
pub mod quality;
pub mod search;
pub mod serve;
pub mod sim;
pub mod supervisor;
pub mod tools;
pub mod trainer;
pub mod up;

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use kalon_kafka::KafkaSettings;
use kalon_stack::{StackState, DEFAULT_BROKERS, DEFAULT_DATABASE_URL};

/// The flags every kalonctl (and kalon-bench) command takes.
#[derive(Clone, Debug, Args)]
pub struct Globals {
    /// Postgres URL [default: the stack's, else postgres://postgres@127.0.0.1:5432/kalon]
    #[arg(long, global = true, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Kafka bootstrap servers [default: the stack's, else 127.0.0.1:9092]
    #[arg(long, global = true, env = "KALON_KAFKA_BROKERS")]
    pub brokers: Option<String>,
    /// Prefix of every topic name.
    #[arg(long, global = true, env = "KALON_TOPIC_PREFIX", default_value = "")]
    pub topic_prefix: String,
    /// Where the local stack keeps its state, data and logs.
    #[arg(long, global = true, env = "KALON_STATE_DIR", default_value = ".kalon")]
    pub state_dir: PathBuf,
}

/// A progress bar on stderr in Kalon's one style.
pub fn progress_bar(len: u64, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg:>10} [{bar:40}] {pos}/{len} ({per_sec}, eta {eta})",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_message(what.to_owned());
    bar
}

/// Addresses resolved from flags/environment, then the stack's state, then defaults.
pub struct Endpoints {
    pub database_url: String,
    pub kafka: KafkaSettings,
}

impl Globals {
    pub fn endpoints(&self) -> Endpoints {
        let state = StackState::load(&self.state_dir);
        let database_url = self
            .database_url
            .clone()
            .or_else(|| state.as_ref().map(|s| s.database_url.clone()))
            .unwrap_or_else(|| DEFAULT_DATABASE_URL.into());
        let brokers = self
            .brokers
            .clone()
            .or_else(|| state.as_ref().map(|s| s.brokers.clone()))
            .unwrap_or_else(|| DEFAULT_BROKERS.into());
        Endpoints {
            database_url,
            kafka: KafkaSettings::new(brokers, &self.topic_prefix),
        }
    }
}

/// `stack up` and the preparation every job needs: migrations and topics.
pub async fn stack_up(
    cli_db: Option<&str>,
    cli_brokers: Option<&str>,
    state_dir: &std::path::Path,
    prefix: &str,
) -> anyhow::Result<Endpoints> {
    let state = kalon_stack::stack::up(state_dir, cli_db, cli_brokers).await?;
    let endpoints = Endpoints {
        database_url: state.database_url.clone(),
        kafka: KafkaSettings::new(&state.brokers, prefix),
    };
    migrate(&endpoints.database_url).await?;
    let created = kalon_kafka::create_topics(&endpoints.kafka).await?;
    if !created.is_empty() {
        eprintln!("kafka: created topics {}", created.join(", "));
    }
    Ok(endpoints)
}

pub async fn migrate(url: &str) -> anyhow::Result<()> {
    kalon_db::create_database(url).await?;
    let pool = kalon_db::connect(url, 2).await?;
    kalon_db::migrate(&pool)
        .await
        .context("failed to migrate")?;
    pool.close().await;
    Ok(())
}

/// A command-line program's `main` as kalonctl and kalon-bench run it:
/// quiet on a closed stdout, arguments parsed, the CPU threads pinned before
/// any runtime thread starts, then `run` on a multi-threaded runtime.
pub fn main_with<C, F>(run: impl FnOnce(C) -> F) -> anyhow::Result<()>
where
    C: clap::Parser,
    F: std::future::Future<Output = anyhow::Result<()>>,
{
    quiet_when_stdout_closes();
    let cli = C::parse();
    kalon_model::train::pin_cpu_threads();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(run(cli))
}

/// `kalonctl ... | head` closes stdout early, and `println!` then panics
/// ("failed printing to stdout: Broken pipe"). Exit quietly with the status
/// of a program stopped by SIGPIPE (141) instead; every other panic is
/// reported as before. (Restoring SIGPIPE itself would also stop the
/// services, and the processes the stack starts, on a closed socket.)
pub fn quiet_when_stdout_closes() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if message.starts_with("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(141);
        }
        report(info);
    }));
}
