//! `kalonctl`: everything an operator does by hand.

use std::ffi::OsString;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};
use kalon_stack::StackState;
use kalonctl::{
    demo, events, model, models, pairs, search, serve, sim, stack_up, tools, trainer, Globals,
};

#[derive(Parser)]
#[command(version, about = "Kalon's operator command line")]
struct Cli {
    #[command(flatten)]
    globals: Globals,
    #[command(subcommand)]
    command: Command,
}

// `kalonctl serve ...`, parsed without kalonctl's global flags: a service's
// own flags share their names and ids (`--database-url`, `--brokers`,
// `--topic-prefix`) but not always their types, and clap, which hands a
// global flag's value to every argument of the same id along the parsed
// path, cannot parse both at once (it panics reading them back). (`//`, not
// `///`: clap would take a doc comment for help text.)
#[derive(Parser)]
#[command(version, about = "Kalon's operator command line")]
struct ServeCli {
    #[command(subcommand)]
    command: Command,
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
    /// Model versions in the registry: list, show, why (lineage), promote, retire.
    Models {
        #[command(subcommand)]
        action: models::Models,
    },
    /// The trainer service's runs.
    Runs {
        #[command(subcommand)]
        action: trainer::RunsAction,
    },
    /// The preference builder's pairs: counts by source, day and version.
    Pairs {
        #[command(subcommand)]
        action: pairs::PairsAction,
    },
    /// The canary controller: status, history and the evidence behind each
    /// decision; promote, rollback, pause, resume by hand.
    Canary {
        #[command(subcommand)]
        command: kalonctl::canary::CanaryCommand,
    },
    /// The whole loop on this machine: the stack, a search that answers,
    /// the simulated LLM (unless KALON_LLM_BASE_URL names yours), and every
    /// service as its own supervised process (restarted when it crashes,
    /// logs under <state dir>/loop/logs), until Ctrl-C.
    Up(kalonctl::up::UpArgs),
    /// Run one service in this process, exactly as its own binary
    /// (kalon-ingest, ...) does: what `kalonctl up` supervises.
    Serve {
        // boxed: a service's settings outweigh every other command's
        #[command(subcommand)]
        service: Box<serve::Service>,
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

// Ingest allocates and frees many small strings per event; mimalloc handles
// that pattern markedly faster than glibc malloc (see `kalon-bench ingest`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let args: Vec<OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|arg| arg == "serve") {
        return kalonctl::main_with(|cli: ServeCli| run_serve(cli.command));
    }
    // `kalonctl --brokers ... serve ...`: the full parse would panic (see
    // `ServeCli`), so say where the flags go instead
    if args.iter().any(|arg| arg == "serve")
        && Cli::command()
            .try_get_matches_from(&args)
            .is_ok_and(|matches| matches.subcommand_name() == Some("serve"))
    {
        anyhow::bail!(
            "`serve` comes first: `kalonctl serve <service> [flags]`, with the service's own \
             flags (--database-url, --brokers, ...) after its name"
        );
    }
    kalonctl::main_with(run)
}

/// A service, with its own telemetry (under its own name, not kalonctl's).
async fn run_serve(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve { service } => serve::run(*service).await,
        _ => unreachable!("`serve` is the first argument"),
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let (command, cli) = (cli.command, cli.globals);
    if let Command::Serve { .. } = command {
        // main hands `serve` to `run_serve` before parsing `Cli`
        return run_serve(command).await;
    }
    let _telemetry = kalon_telemetry::init("kalonctl")?;
    if matches!(
        command,
        Command::Train {
            action: model::Train::Pretrain { .. } | model::Train::Align(_)
        } | Command::Encoder { .. }
            | Command::Eval { .. }
            | Command::Index(_)
            | Command::SearchBootstrap(_)
            | Command::Up(_)
    ) {
        // these run models in ONNX Runtime: fetch it now if this machine lacks it
        tokio::task::spawn_blocking(tools::ensure_onnxruntime).await??;
    }
    match &command {
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
            kalonctl::migrate(&e.database_url).await?;
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
        } => kalon_sim_llm::cli::serve(args).await?,
        Command::Sim { action } => {
            // image generation is CPU work: off the async runtime
            let action = action.clone();
            tokio::task::spawn_blocking(move || sim::run(&action)).await??
        }
        Command::Train {
            action: model::Train::Now(args),
        } => trainer::now(&cli.endpoints(), args).await?,
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
        Command::Models { action } => models::run(&cli.endpoints(), action).await?,
        Command::Runs { action } => trainer::runs(&cli.endpoints(), action).await?,
        Command::Pairs { action } => pairs::run(&cli.endpoints(), action).await?,
        Command::Canary { command } => kalonctl::canary::run(&cli.endpoints(), command).await?,
        Command::Up(args) => kalonctl::up::run(&cli, args).await?,
        Command::Serve { .. } => unreachable!("dispatched before kalonctl's telemetry"),
    }
    Ok(())
}
