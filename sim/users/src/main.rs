//! `kalon-sim-users`: simulated people searching a running Kalon search
//! service; prints progress on stderr and, last, one JSON line: what they
//! saw per variant (CTR, the oracle's mean beauty and relevance).

use std::time::Duration;

use clap::Parser;
use kalon_sim_users::{Population, UsersConfig};

#[derive(Parser)]
#[command(version, about = "Simulated people searching Kalon's search service")]
struct Cli {
    /// Search's base URL.
    #[arg(
        long,
        env = "KALON_SEARCH_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    search_url: String,
    /// The world search serves (`kalonctl sim generate --seed --images`).
    #[arg(long, default_value_t = 1)]
    world_seed: u64,
    #[arg(long, default_value_t = 10_000)]
    images: usize,
    /// The people's seed: the same seed gives the same people.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Distinct (pseudonymous) users.
    #[arg(long, default_value_t = 200)]
    users: usize,
    /// Sessions to run (one search each, with its clicks and ratings).
    #[arg(long, default_value_t = 1_000)]
    sessions: usize,
    /// Stop starting sessions after this many seconds.
    #[arg(long)]
    duration_s: Option<f64>,
    /// Sessions started per second at most (default: as fast as they finish).
    #[arg(long)]
    rate: Option<f64>,
    /// Sessions in flight at once.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Results asked for per search.
    #[arg(long, default_value_t = 10)]
    k: u32,
    /// Examination falls with rank as 1 / rank^bias.
    #[arg(long, default_value_t = 0.8)]
    position_bias: f64,
    /// Chance that a click is followed by a star rating.
    #[arg(long, default_value_t = 0.05)]
    rating_rate: f64,
    /// Where clicks and ratings go: `api` (search's feedback API) or
    /// `kafka` (produced to their topics directly).
    #[arg(long, default_value = "api", value_parser = ["api", "kafka"])]
    feedback: String,
    /// Kafka bootstrap servers (with --feedback kafka).
    #[arg(long, env = "KALON_KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    brokers: String,
    /// Prefix of every topic name (with --feedback kafka).
    #[arg(long, env = "KALON_TOPIC_PREFIX", default_value = "")]
    topic_prefix: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    anyhow::ensure!(
        (0.0..=1.0).contains(&cli.rating_rate) && cli.position_bias >= 0.0,
        "--rating-rate must be in [0, 1] and --position-bias not negative"
    );
    let mut config = UsersConfig::new(&cli.search_url, cli.world_seed, cli.images);
    config.seed = cli.seed;
    config.users = cli.users;
    config.sessions = cli.sessions;
    config.duration = cli.duration_s.map(Duration::from_secs_f64);
    config.rate_per_s = cli.rate;
    config.concurrency = cli.concurrency;
    config.k = cli.k;
    config.behaviour.position_bias = cli.position_bias;
    config.behaviour.rating_rate = cli.rating_rate;
    if cli.feedback == "kafka" {
        config.feedback = kalon_sim_users::FeedbackRoute::Kafka(kalon_kafka::KafkaSettings::new(
            &cli.brokers,
            &cli.topic_prefix,
        ));
    }
    let population = Population::new(config)?;
    let mut done = 0u64;
    let report = population
        .run(|_| {
            done += 1;
            if done.is_multiple_of(100) {
                eprintln!("{done} sessions");
            }
        })
        .await;
    if report.sessions > 0 && report.failed == report.sessions {
        anyhow::bail!(
            "every session failed ({}); is search running at {}?",
            report.failed,
            cli.search_url
        );
    }
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
