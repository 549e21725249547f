//! The console's settings.

use std::net::SocketAddr;

use kalon_service::{DatabaseArgs, Secret};

#[derive(clap::Args, Debug, Clone)]
pub struct ConsoleConfig {
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// Where the console listens (its pages and its JSON API).
    #[arg(long, env = "KALON_CONSOLE_ADDR", default_value = "127.0.0.1:8087")]
    pub addr: SocketAddr,
    /// The search service: pinned searches for the comparison, and the
    /// images the pages show.
    #[arg(
        long,
        env = "KALON_CONSOLE_SEARCH_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub search_url: String,
    /// The canary controller's admin API, which the operator's buttons
    /// call (promote, roll back, pause, resume).
    #[arg(
        long,
        env = "KALON_CONSOLE_CANARY_URL",
        default_value = "http://127.0.0.1:8086"
    )]
    pub canary_url: String,
    /// The operator's token (the canary's): the console's state-changing
    /// and spending calls (canary actions, asking the LMM judge) need it
    /// as `Authorization: Bearer <token>`; without one configured they are
    /// refused.
    #[arg(long, env = "KALON_CANARY_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<Secret<String>>,
    /// How often the pages refresh their figures, in milliseconds.
    #[arg(long, env = "KALON_CONSOLE_REFRESH_MS", default_value_t = 3000)]
    pub refresh_ms: u64,
}

impl ConsoleConfig {
    /// Defaults for a database (tests, kalonctl; the environment is not
    /// read).
    pub fn new(database_url: &str) -> Self {
        let mut config: ConsoleConfig = kalon_service::defaults();
        config.database = DatabaseArgs::new(database_url);
        config
    }
}
