//! `kalonctl`: everything an operator does by hand.

mod align;
mod bench;
mod demo;
mod events;
mod llm;
mod model;
mod search;
mod search_bench;
mod sim;
mod tools;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use kalon_kafka::KafkaSettings;
use kalon_stack::{StackState, DEFAULT_BROKERS, DEFAULT_DATABASE_URL};

#[derive(Parser)]
#[command(version, about = "Kalon's operator command line")]
struct Cli {
    /// Postgres URL [default: the stack's, else postgres://postgres@127.0.0.1:5432/kalon]
    #[arg(long, global = true, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Kafka bootstrap servers [default: the stack's, else 127.0.0.1:9092]
    #[arg(long, global = true, env = "KALON_KAFKA_BROKERS")]
    brokers: Option<String>,
    /// Prefix of every topic name.
    #[arg(long, global = true, env = "KALON_TOPIC_PREFIX", default_value = "")]
    topic_prefix: String,
    /// Where the local stack keeps its state, data and logs.
    #[arg(long, global = true, env = "KALON_STATE_DIR", default_value = ".kalon")]
    state_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

/// A progress bar on stderr in Kalon's one style.
pub(crate) fn progress_bar(len: u64, what: &str) -> indicatif::ProgressBar {
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

#[derive(Subcommand)]
enum Command {
    /// The local stack: PostgreSQL and a Kafka-API broker (tansu).
    Stack {
        #[command(subcommand)]
        action: StackAction,
    },
    /// Install what Kalon needs besides its own binaries, once, into the
    /// cache: the tansu broker and ONNX Runtime's library.
    Tools {
        #[command(subcommand)]
        action: ToolsAction,
    },
    /// Apply the database migrations.
    Migrate,
    /// Kafka topics, from the one list in the code.
    Topics {
        #[command(subcommand)]
        action: TopicsAction,
    },
    /// Produce generated events (and optionally malformed ones) to the event topics.
    Produce(events::ProduceArgs),
    /// The main job: stack up, produce a stream of events, ingest it, show what landed; then pretrain, align and compare on a small simulated world.
    Demo(demo::DemoArgs),
    /// The simulated world.
    Sim {
        #[command(subcommand)]
        action: sim::Sim,
    },
    /// Train models.
    Train {
        #[command(subcommand)]
        action: model::Train,
    },
    /// Encoders on ONNX Runtime.
    Encoder {
        #[command(subcommand)]
        action: model::EncoderAction,
    },
    /// Evaluate models.
    Eval {
        #[command(subcommand)]
        action: model::Eval,
    },
    /// Embed the catalog under a model version into Postgres (search's index source).
    Index(search::IndexArgs),
    /// Make search answer out of the box: simulated catalog, reference model, index, deployment (each step skipped when done).
    SearchBootstrap(search::BootstrapArgs),
    /// Route a share of search traffic to an indexed model version (or take it out).
    Deploy(search::DeployArgs),
    /// Benchmarks that print figures.
    Bench {
        #[command(subcommand)]
        which: bench::Bench,
    },
}

#[derive(Subcommand)]
enum StackAction {
    /// Start what is not running (twice is harmless), migrate, create topics.
    Up,
    /// Stop what `up` started, nothing else.
    Down,
    /// Say what runs where.
    Status,
    /// Print `export` lines for the stack's addresses.
    Env,
}

#[derive(Subcommand)]
enum ToolsAction {
    /// Install what is missing (tansu: built once, 12 to 45 min on 2 cores;
    /// ONNX Runtime: about 24 MB from PyPI).
    Install,
}

#[derive(Subcommand)]
enum TopicsAction {
    /// Create every topic that does not exist.
    Create,
    /// List the topics Kalon uses and their partition counts.
    List,
}

/// Addresses resolved from flags/environment, then the stack's state, then defaults.
pub struct Endpoints {
    pub database_url: String,
    pub kafka: KafkaSettings,
}

impl Cli {
    fn endpoints(&self) -> Endpoints {
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

async fn migrate(url: &str) -> anyhow::Result<()> {
    kalon_db::create_database(url).await?;
    let pool = kalon_db::connect(url, 2).await?;
    kalon_db::migrate(&pool)
        .await
        .context("failed to migrate")?;
    pool.close().await;
    Ok(())
}

// Ingest allocates and frees many small strings per event; mimalloc handles
// that pattern markedly faster than glibc malloc (see `kalonctl bench ingest`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `kalonctl ... | head` closes stdout early, and `println!` then panics
/// ("failed printing to stdout: Broken pipe"). Exit quietly with the status
/// of a program stopped by SIGPIPE (141) instead; every other panic is
/// reported as before. (Restoring SIGPIPE itself would also stop the
/// services, and the processes the stack starts, on a closed socket.)
fn quiet_when_stdout_closes() {
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

fn main() -> anyhow::Result<()> {
    quiet_when_stdout_closes();
    let cli = Cli::parse();
    // before the runtime starts any thread
    kalon_model::train::pin_cpu_threads();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let _telemetry = kalon_telemetry::init("kalonctl")?;
    if matches!(
        cli.command,
        Command::Train { .. }
            | Command::Encoder { .. }
            | Command::Eval { .. }
            | Command::Index(_)
            | Command::SearchBootstrap(_)
            | Command::Bench { .. }
    ) {
        // these run models in ONNX Runtime: fetch it now if this machine lacks it
        tokio::task::spawn_blocking(tools::ensure_onnxruntime).await??;
    }
    match &cli.command {
        Command::Stack { action } => match action {
            StackAction::Up => {
                let endpoints = stack_up(
                    cli.database_url.as_deref(),
                    cli.brokers.as_deref(),
                    &cli.state_dir,
                    &cli.topic_prefix,
                )
                .await?;
                eprintln!("stack is up; migrations applied; topics present");
                print!(
                    "export DATABASE_URL={}\nexport KALON_KAFKA_BROKERS={}\n",
                    endpoints.database_url, endpoints.kafka.brokers
                );
            }
            StackAction::Down => kalon_stack::stack::down(&cli.state_dir)?,
            StackAction::Status => {
                let e = cli.endpoints();
                print!(
                    "{}",
                    kalon_stack::stack::status(&cli.state_dir, &e.database_url, &e.kafka.brokers)
                        .await?
                );
            }
            StackAction::Env => {
                let state = StackState::load(&cli.state_dir)
                    .context("the stack is not up here; run `kalonctl stack up`")?;
                print!("{}", state.env_lines());
            }
        },
        Command::Tools {
            action: ToolsAction::Install,
        } => tokio::task::spawn_blocking(tools::install).await??,
        Command::Migrate => {
            let e = cli.endpoints();
            migrate(&e.database_url).await?;
            eprintln!(
                "migrations applied to {}",
                kalon_db::redact(&e.database_url)
            );
        }
        Command::Topics { action } => match action {
            TopicsAction::Create => {
                let created = kalon_kafka::create_topics(&cli.endpoints().kafka).await?;
                eprintln!("created {} topic(s): {}", created.len(), created.join(", "));
            }
            TopicsAction::List => {
                for spec in kalon_events::TOPICS {
                    println!(
                        "{:<32} {:>3} partitions  {}",
                        spec.full_name(&cli.topic_prefix),
                        spec.partitions,
                        spec.purpose
                    );
                }
            }
        },
        Command::Produce(args) => events::produce(&cli.endpoints(), args).await?,
        Command::Demo(args) => demo::run(&cli, args).await?,
        Command::Sim {
            action: sim::Sim::ServeLlm(args),
        } => llm::serve(args).await?,
        Command::Sim { action } => {
            // image generation is CPU work: off the async runtime
            let action = action.clone();
            tokio::task::spawn_blocking(move || sim::run(&action)).await??
        }
        Command::Train { action } => {
            let action = action.clone();
            tokio::task::spawn_blocking(move || model::run_train(&action)).await??
        }
        Command::Encoder { action } => {
            let action = action.clone();
            tokio::task::spawn_blocking(move || model::run_encoder(&action)).await??
        }
        Command::Eval { action } => {
            let (action, state_dir) = (action.clone(), cli.state_dir.clone());
            tokio::task::spawn_blocking(move || model::run_eval(&state_dir, &action)).await??
        }
        Command::Index(args) => {
            search::index(&cli.endpoints(), args).await?;
        }
        Command::Deploy(args) => search::deploy(&cli.endpoints(), args).await?,
        Command::SearchBootstrap(args) => search::bootstrap(&cli.endpoints(), args).await?,
        Command::Bench { which } => bench::run(&cli, which).await?,
    }
    Ok(())
}
