//! The flags every service shares, as clap argument groups to
//! `#[command(flatten)]` into a service's settings: [`DatabaseArgs`],
//! [`KafkaArgs`], and a consumer's flags from [`consumer_args!`](crate::consumer_args).
//!
//! Every flag also reads an environment variable, so containers are
//! configured without a command line.

use kalon_kafka::KafkaSettings;
use sqlx::PgPool;

use crate::secret::DatabaseUrl;

/// Where Kalon's database is when nothing says otherwise.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/kalon";
/// Where Kalon's brokers are when nothing says otherwise.
pub const DEFAULT_BROKERS: &str = "127.0.0.1:9092";

/// The Postgres database a service works in.
#[derive(Debug, Clone, clap::Args)]
pub struct DatabaseArgs {
    /// Postgres URL (logged with its password hidden).
    #[arg(
        id = "database_url",
        long = "database-url",
        env = "DATABASE_URL",
        hide_env_values = true,
        default_value = DEFAULT_DATABASE_URL
    )]
    pub url: DatabaseUrl,
}

impl DatabaseArgs {
    pub fn new(url: impl Into<String>) -> Self {
        DatabaseArgs {
            url: DatabaseUrl::new(url),
        }
    }

    /// A pool of at most `max_connections` (see [`kalon_db::connect`]).
    pub async fn connect(&self, max_connections: u32) -> kalon_db::Result<PgPool> {
        kalon_db::connect(self.url.expose(), max_connections).await
    }
}

/// Where the brokers are and how the topics are named.
#[derive(Debug, Clone, clap::Args)]
pub struct KafkaArgs {
    /// Kafka bootstrap servers.
    #[arg(long, env = "KALON_KAFKA_BROKERS", default_value = DEFAULT_BROKERS)]
    pub brokers: String,
    /// Prefix of every topic name (empty in production).
    #[arg(long, env = "KALON_TOPIC_PREFIX", default_value = "")]
    pub topic_prefix: String,
}

impl KafkaArgs {
    pub fn new(brokers: impl Into<String>, topic_prefix: impl Into<String>) -> Self {
        KafkaArgs {
            brokers: brokers.into(),
            topic_prefix: topic_prefix.into(),
        }
    }

    pub fn settings(&self) -> KafkaSettings {
        KafkaSettings::new(&self.brokers, &self.topic_prefix)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(!self.brokers.trim().is_empty(), "no Kafka brokers given");
        Ok(())
    }
}

/// Defines a consuming service's shared flags as a struct of its own, with
/// the service's environment names: `--group`, `--membership`,
/// `--assign-all`, `--stall-after-s` and `--health-addr`, read from
/// `<env_prefix>GROUP`, `<env_prefix>MEMBERSHIP`, `<env_prefix>ASSIGN_ALL`,
/// `<env_prefix>STALL_AFTER_S` and `<env_prefix>HEALTH_ADDR`.
///
/// ```
/// kalon_service::consumer_args! {
///     /// How the example consumes.
///     pub struct ExampleConsumer {
///         env_prefix: "KALON_EXAMPLE_",
///         group: "kalon-example",
///         health_addr: "127.0.0.1:9189",
///     }
/// }
/// let consumer: ExampleConsumer = kalon_service::defaults();
/// assert_eq!(consumer.group_id, "kalon-example");
/// assert_eq!(consumer.membership(), kalon_service::Membership::Auto);
/// ```
///
/// The calling crate needs `clap` (the derive names it).
#[macro_export]
macro_rules! consumer_args {
    (
        $(#[$meta:meta])*
        $vis:vis struct $name:ident {
            env_prefix: $env:literal,
            group: $group:literal,
            health_addr: $health:literal $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, clap::Args)]
        $vis struct $name {
            /// Consumer group id.
            #[arg(long = "group", env = concat!($env, "GROUP"), default_value = $group)]
            pub group_id: String,
            /// How this process takes its partitions. `auto` (the default):
            /// every partition itself when the broker is tansu (the local
            /// stack: one replica, and tansu 0.6's coordinator never hands a
            /// crashed member's partitions over), the consumer group
            /// everywhere else (real Kafka, several replicas). `group` or
            /// `assign-all` to choose yourself; never run two replicas with
            /// `assign-all`.
            #[arg(
                long,
                env = concat!($env, "MEMBERSHIP"),
                value_enum,
                default_value_t = $crate::Membership::Auto
            )]
            pub membership: $crate::Membership,
            /// Shorthand for `--membership assign-all` (kept for existing setups).
            #[arg(long, env = concat!($env, "ASSIGN_ALL"), conflicts_with = "membership")]
            pub assign_all: bool,
            /// Readiness fails when messages wait and the group's committed
            /// offsets have not moved for this many seconds.
            #[arg(long, env = concat!($env, "STALL_AFTER_S"), default_value_t = 60)]
            pub stall_after_s: u64,
            /// Where `/healthz` and `/readyz` are served (`/readyz` answers
            /// 503 while messages wait and the group does not move); port 0
            /// picks one.
            #[arg(long, env = concat!($env, "HEALTH_ADDR"), default_value = $health)]
            pub health_addr: ::std::net::SocketAddr,
        }

        impl $name {
            /// The membership asked for (`--assign-all` included).
            pub fn membership(&self) -> $crate::Membership {
                self.membership.or_assign_all(self.assign_all)
            }

            pub fn stall_after(&self) -> ::std::time::Duration {
                ::std::time::Duration::from_secs(self.stall_after_s)
            }

            pub fn validate(&self) -> $crate::__private::anyhow::Result<()> {
                $crate::__private::anyhow::ensure!(
                    self.stall_after_s >= 1,
                    "stall_after_s must be at least 1"
                );
                Ok(())
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        database: DatabaseArgs,
        #[command(flatten)]
        kafka: KafkaArgs,
    }

    #[test]
    fn the_groups_read_todays_flags_and_environment_names() {
        assert_eq!(
            crate::flags_and_env::<Cli>(),
            [
                "--database-url DATABASE_URL",
                "--brokers KALON_KAFKA_BROKERS",
                "--topic-prefix KALON_TOPIC_PREFIX",
            ]
        );
        let cli = Cli::try_parse_from([
            "cli",
            "--database-url",
            "postgres://kalon:hunter2@db/kalon",
            "--brokers",
            "k:9092",
            "--topic-prefix",
            "t.",
        ])
        .unwrap();
        assert_eq!(
            cli.database.url.expose(),
            "postgres://kalon:hunter2@db/kalon"
        );
        assert_eq!(cli.kafka.settings().topic("x"), "t.x");
        let defaults: Cli = crate::defaults();
        assert_eq!(defaults.database.url.expose(), DEFAULT_DATABASE_URL);
        assert_eq!(defaults.kafka.brokers, DEFAULT_BROKERS);
        assert_eq!(defaults.kafka.topic_prefix, "");
        assert!(KafkaArgs::new(" ", "").validate().is_err());
    }

    #[test]
    fn help_never_shows_the_database_url_from_the_environment() {
        use clap::CommandFactory;
        let command = Cli::command();
        let url = command
            .get_arguments()
            .find(|arg| arg.get_id() == "database_url")
            .unwrap();
        // without it, `--help` prints `[env: DATABASE_URL=<the URL>]`
        assert!(url.is_hide_env_values_set());
    }
}
