//! `kalon-search`: the service people query. It embeds the query with each
//! deployed model version's text tower, finds the nearest catalog images in
//! an in-memory index built from Postgres, splits traffic between versions
//! by a stable hash of the session (canary), swaps versions on deployment
//! events without a restart, and logs every answer as an impression. A
//! canary's requests may get a team-draft interleaving with the promoted
//! version's ranking, a pinned search asks one version by name (an
//! evaluation, logged nowhere), and `/v1/stats` counts per version.
//!
//! Search only reads the registry (`kalon-registry`: versions, embeddings,
//! deployments); writing it (indexing, deploying) is the registry's and its
//! callers' (kalonctl, the coming canary controller).

pub mod api;
pub mod cli;
pub mod config;
pub mod events;
pub mod index;
pub mod openapi;
pub mod reload;
pub mod routing;
pub mod stats;

use std::sync::Arc;
use std::time::Duration;

use kalon_encoder::EncoderOptions;
use kalon_kafka::KafkaSettings;

pub use api::{router, AppState, Limits, SearchRequest, SearchResponse};
pub use config::SearchConfig;
pub use reload::Reloader;
pub use routing::{Live, Routing};

/// A built search service: state loaded, deployment watcher positioned.
pub struct Search {
    pub state: AppState,
    pub reloader: Reloader,
    watcher: Option<rdkafka::consumer::StreamConsumer>,
    kafka: KafkaSettings,
    reload_every: Duration,
    config: SearchConfig,
}

impl Search {
    /// Connects, positions the deployment watcher, then loads every
    /// deployed version (so no change after this read is missed).
    pub async fn build(config: SearchConfig) -> anyhow::Result<Search> {
        kalon_telemetry::install_propagator();
        let explore = config.exploration()?;
        let pool = config.database.connect(8).await?;
        kalon_db::check_schema(&pool).await?;
        let kafka = config.kafka.settings();
        let serving = Arc::new(stats::Serving::default());
        let events = events::Events::new(
            &kafka,
            config.impression_buffer,
            Duration::from_millis(config.kafka_timeout_ms),
            serving.clone(),
        )?;
        let live = Arc::new(Live::default());
        let reloader = Reloader {
            pool,
            live: live.clone(),
            options: EncoderOptions::from_env()?,
            params: config.index_params(),
            cache: config
                .model_cache
                .clone()
                .unwrap_or_else(kalon_registry::artifact::default_cache_dir),
        };
        // without the broker search still serves what Postgres says; the
        // watcher is positioned once the broker answers (see Reloader::run)
        let watcher = match reloader.watch(&kafka) {
            Ok(consumer) => Some(consumer),
            Err(error) => {
                tracing::warn!(%error, "deployment events unavailable; re-reading deployments periodically until the broker answers");
                None
            }
        };
        if let Err(error) = reloader.reload().await {
            // start anyway (not ready) and keep trying: a bad version must
            // not keep the service down once a good one is deployed
            tracing::error!(%error, "loading the deployed versions failed");
        }
        let state = AppState {
            metrics: api::Metrics::default(),
            live,
            events,
            images: config.images.clone(),
            public_url: config.public_url.trim_end_matches('/').to_owned(),
            limits: config.limits(),
            explore,
            serving,
        };
        Ok(Search {
            state,
            reloader,
            watcher,
            kafka,
            reload_every: Duration::from_secs(config.reload_every_s.max(1)),
            config,
        })
    }

    /// Serves on `listener` until `shutdown` resolves, then drains requests.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut stop_watch = stop_rx.clone();
        let watcher = tokio::spawn(self.reloader.run(
            self.kafka,
            self.watcher,
            self.reload_every,
            async move {
                let _ = stop_watch.changed().await;
            },
        ));
        tracing::info!(addr = %listener.local_addr()?, "search listening");
        let app = router(self.state);
        let mut stop_serve = stop_rx;
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stop_serve.changed().await;
            })
            .await?;
        watcher.await?;
        Ok(())
    }

    /// Binds the configured address and serves.
    pub async fn run(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let listener = tokio::net::TcpListener::bind(self.config.listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", self.config.listen))?;
        self.serve(listener, shutdown).await
    }
}
