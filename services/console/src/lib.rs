//! Kalon's console: a web page and its JSON API for the people who run the
//! loop.
//!
//! - **Overview**: the loop's stages with live figures (events/s, the
//!   enricher's queue, pairs by source, the last training run, what search
//!   serves and with which weights, the canary's step), refreshed in place.
//! - **Canary**: the current and past canaries, every decision with its
//!   evidence (estimates, intervals, sample sizes, thresholds), a chart of
//!   the primary metric and of the interleaving preference over time, and
//!   the operator's promote / roll back / pause / resume buttons, which call
//!   the canary controller's admin API with the operator's token.
//! - **Compare**: a query's top-k from two versions side by side (pinned
//!   searches: no impression is published), and on request the
//!   order-consistent LMM judge's verdict.
//! - **Models**: the registry with states, gates and pair counts, and a
//!   version's lineage ("why did the model change").
//!
//! Its own service, not a page of search or of the canary: it reads the
//! tables of every stage (registry, runs, pairs, canaries), so it belongs
//! to none of them, and it keeps working while one of them restarts. The
//! page is plain HTML, CSS and JavaScript compiled into the binary (no CDN,
//! no build step); charts are SVG drawn by the page itself.

pub mod api;
pub mod cli;
pub mod config;
pub mod data;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use kalon_llm::{Judge, LlmClient, LlmConfig};
use sqlx::PgPool;

pub use config::ConsoleConfig;

/// What the handlers share.
pub struct Shared {
    pub config: ConsoleConfig,
    pub pool: PgPool,
    pub http: reqwest::Client,
    /// The order-consistent LMM judge, when an LLM endpoint is configured.
    pub judge: Option<Judge>,
}

/// A console, connected, not serving yet.
pub struct Console {
    shared: Arc<Shared>,
}

impl Console {
    /// Connects to the database (its schema must be current) and builds
    /// the judge when `llm` is given.
    pub async fn build(config: ConsoleConfig, llm: Option<LlmConfig>) -> anyhow::Result<Console> {
        let pool = config.database.connect(4).await?;
        kalon_db::check_schema(&pool).await?;
        kalon_telemetry::install_crypto_provider();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()?;
        let judge = llm.map(LlmClient::new).transpose()?.map(Judge::new);
        Ok(Console {
            shared: Arc::new(Shared {
                config,
                pool,
                http,
                judge,
            }),
        })
    }

    /// Binds the configured address (`--addr`).
    pub async fn bind(&self) -> anyhow::Result<tokio::net::TcpListener> {
        let addr = self.shared.config.addr;
        tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("the console cannot listen on {addr}: {e}"))
    }

    /// Serves on `listener` until `shutdown` completes.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let addr: SocketAddr = listener.local_addr()?;
        if self.shared.config.admin_token.is_none() {
            tracing::warn!("no KALON_CANARY_ADMIN_TOKEN: the console refuses every canary action and every call to the judge");
        }
        tracing::info!(%addr, "console: http://{addr}/");
        axum::serve(listener, api::router(self.shared))
            .with_graceful_shutdown(shutdown)
            .await?;
        Ok(())
    }
}
