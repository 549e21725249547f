//! What every Kalon service shares, so each one's settings are built the
//! same way:
//!
//! - [`Secret`] and [`DatabaseUrl`]: values that print redacted, so a
//!   settings struct derives `Debug` and is logged whole
//!   ([`log_settings`]);
//! - clap argument groups to `#[command(flatten)]`: [`DatabaseArgs`]
//!   (`--database-url`, `DATABASE_URL`), [`KafkaArgs`] (`--brokers`,
//!   `--topic-prefix`), and [`consumer_args!`] for a consuming service's
//!   group, membership, stall and health flags under its own environment
//!   names;
//! - [`defaults`] and [`defaults_at`]: the settings a struct declares, for
//!   constructors;
//! - [`LeaderLock`]: one leader among replicas, by a Postgres advisory lock;
//! - [`auth`]: the operator's bearer token on state-changing HTTP calls.
//!
//! Telemetry (`RUST_LOG`, `KALON_LOG_FORMAT`, `OTEL_*`) and the shutdown
//! signal stay in `kalon-telemetry` (`init`, `shutdown_signal`): they are
//! read from the environment, not from flags.

pub mod args;
pub mod auth;
pub mod leader;
pub mod secret;

pub use args::{DatabaseArgs, KafkaArgs, DEFAULT_BROKERS, DEFAULT_DATABASE_URL};
pub use kalon_kafka::consumer::Membership;
pub use leader::{LeaderGuard, LeaderLock};
pub use secret::{DatabaseUrl, Secret};

/// What [`consumer_args!`] names from this crate; not an API.
#[doc(hidden)]
pub mod __private {
    pub use anyhow;
}

/// The settings `T` declares as defaults: no flags, and the environment
/// not read (constructors for tests and in-process services). Panics when
/// `T` has a required setting without a default.
pub fn defaults<T: clap::Args + clap::FromArgMatches>() -> T {
    parse_ignoring_env(Vec::new())
}

/// As [`defaults`], at a database, brokers and topic prefix: for a `T`
/// that flattens [`DatabaseArgs`] and [`KafkaArgs`]. The prefix also goes
/// in front of the consumer group of a `T` with a `--group` flag (from
/// [`consumer_args!`]), so tests on one broker keep apart.
pub fn defaults_at<T: clap::Args + clap::FromArgMatches>(
    database_url: &str,
    brokers: &str,
    topic_prefix: &str,
) -> T {
    let mut flags = vec![
        format!("--database-url={database_url}"),
        format!("--brokers={brokers}"),
        format!("--topic-prefix={topic_prefix}"),
    ];
    let command = T::augment_args(clap::Command::new("defaults"));
    let group = command
        .get_arguments()
        .find(|arg| arg.get_long() == Some("group"))
        .and_then(|arg| arg.get_default_values().first());
    if let Some(group) = group {
        flags.push(format!("--group={topic_prefix}{}", group.to_string_lossy()));
    }
    parse_ignoring_env(flags)
}

fn parse_ignoring_env<T: clap::Args + clap::FromArgMatches>(flags: Vec<String>) -> T {
    let command = T::augment_args(clap::Command::new("defaults").no_binary_name(true))
        .mut_args(|arg| arg.env(None::<&str>));
    command
        .try_get_matches_from(flags)
        .and_then(|matches| T::from_arg_matches(&matches))
        .unwrap_or_else(|error| panic!("{}: {error}", std::any::type_name::<T>()))
}

/// Every long flag of `T` with its environment variable, in order, as
/// `--flag ENV` (or `--flag` alone): what deployments depend on, for tests
/// that keep them as they are.
pub fn flags_and_env<T: clap::Args>() -> Vec<String> {
    T::augment_args(clap::Command::new("flags"))
        .get_arguments()
        .filter_map(|arg| {
            let long = arg.get_long()?;
            Some(match arg.get_env() {
                Some(env) => format!("--{long} {}", env.to_string_lossy()),
                None => format!("--{long}"),
            })
        })
        .collect()
}

/// The flags (and environment variables) of a service's config after the
/// shared database and Kafka groups, which every config flattens first
/// (asserted): what a service's own flag test compares with today's names.
pub fn own_flags<T: clap::Args>() -> Vec<String> {
    let flags = flags_and_env::<T>();
    assert_eq!(
        flags[..3],
        [
            "--database-url DATABASE_URL",
            "--brokers KALON_KAFKA_BROKERS",
            "--topic-prefix KALON_TOPIC_PREFIX"
        ],
        "the shared groups come first"
    );
    flags[3..].to_vec()
}

/// Logs a service's settings at start (at info, field `settings`), as its
/// `Debug` prints them: secrets redacted.
pub fn log_settings(settings: &dyn std::fmt::Debug) {
    tracing::info!(settings = ?settings, "settings");
}
