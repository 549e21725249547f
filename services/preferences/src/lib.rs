//! Kalon preference builder: the loop's learning signal.
//!
//! - [`clicks`]: impressions joined with their clicks by `request_id` once a
//!   list is quiet; skip-above and skip-next pairs weighted by the inverse
//!   examination propensity (estimated from the traffic, [`propensity`]).
//! - [`ratings`]: higher over lower mean stars per query and aspect.
//! - [`consume`]: `lmm.judgment.v1` -> pairs; `query.rephrased.v1` -> the
//!   D_po queue.
//! - [`dpo`]: D_po from live queries with the serving version and the
//!   teacher.
//!
//! Every pair's id is derived from what made it, and every consumed input
//! is marked in the transaction that stores its pairs: a restart, a
//! redelivery or a rebuild never doubles a pair. One replica (the holder of
//! the `preferences` advisory lock) runs the click, rating and propensity
//! passes; every replica reads its share of the topics and works the D_po
//! queue.

pub mod cli;
pub mod clicks;
pub mod config;
pub mod consume;
pub mod dpo;
mod metrics;
pub mod propensity;
pub mod ratings;
pub mod store;

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use kalon_events::{LmmJudgment, QueryRephrased, TopicPayload};
use kalon_kafka::consumer::{group_consumer, Consuming};
use kalon_service::{LeaderGuard, LeaderLock};
use rdkafka::consumer::StreamConsumer;
use sqlx::PgPool;
use tokio::sync::watch;
use tracing::{info, warn};

pub use config::{PreferencesConfig, Teacher};

pub const LEADER_LOCK: &str = "preferences";

/// What the builder is doing, for `/readyz` and tests.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Status {
    /// Whether this replica runs the click, rating and propensity passes.
    pub leader: bool,
    pub passes: u64,
    pub clicks_marked: u64,
    pub ratings_marked: u64,
    pub waiting_clicks: u64,
    pub dpo_done: u64,
    /// The version D_po retrieves with, once loaded.
    pub serving: Option<String>,
    /// The position-bias estimate click pairs are weighted with (its row id).
    pub propensity_estimate: Option<i64>,
    pub teacher: Option<String>,
    pub last_error: Option<String>,
}

pub struct Builder {
    config: PreferencesConfig,
    pool: PgPool,
    /// The LMM teacher's client (its token counts are a metric).
    llm: Option<kalon_llm::LlmClient>,
    consumer: StreamConsumer,
    consuming: Consuming,
    judgment_topic: String,
    cache: PathBuf,
    status: Arc<Mutex<Status>>,
    metrics: metrics::Metrics,
}

impl Builder {
    /// Connects to Postgres (migrating it) and the broker; `llm` is the LMM
    /// teacher's endpoint (KALON_LLM_*), when there is one.
    pub async fn build(
        config: PreferencesConfig,
        llm: Option<kalon_llm::LlmConfig>,
    ) -> anyhow::Result<Builder> {
        config.validate()?;
        if config.dpo && config.teacher() == Teacher::Lmm && llm.is_none() {
            anyhow::bail!(
                "--teacher lmm needs the LMM's endpoint: set KALON_LLM_BASE_URL (or choose --teacher low-level / model, or --dpo false)"
            );
        }
        let llm = llm.map(kalon_llm::LlmClient::new).transpose()?;
        // the passes write up to four chunks at once; the reader and D_po one each
        let pool = config.database.connect(8).await?;
        kalon_db::migrate(&pool)
            .await
            .context("failed to migrate")?;
        let kafka = config.kafka.settings();
        let consumer =
            group_consumer(&kafka, "kalon-preferences", &config.consumer.group_id, None)?;
        let judgment_topic = kafka.topic(LmmJudgment::TOPIC);
        let topics = vec![judgment_topic.clone(), kafka.topic(QueryRephrased::TOPIC)];
        let (consumer, consuming) = Consuming::start(
            consumer,
            &kafka,
            &config.consumer.group_id,
            topics.clone(),
            config.consumer.membership(),
            config.consumer.stall_after(),
        )
        .await
        .context("failed to take the judgment and rephrasing partitions")?;
        let cache = config
            .model_cache
            .clone()
            .unwrap_or_else(kalon_registry::artifact::default_cache_dir);
        let teacher = config.dpo.then(|| config.teacher().name().to_owned());
        info!(?topics, group = %config.consumer.group_id, membership = %consuming.membership(), dpo = config.dpo, ?teacher, "preference builder ready");
        Ok(Builder {
            status: Arc::new(Mutex::new(Status {
                teacher,
                ..Default::default()
            })),
            config,
            pool,
            llm,
            consumer,
            consuming,
            judgment_topic,
            cache,
            metrics: metrics::Metrics::new(),
        })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub fn status(&self) -> Status {
        self.status.lock().expect("status lock").clone()
    }

    /// Ready while the topic reader keeps up; the body says what the
    /// builder is doing.
    pub fn readiness(&self) -> kalon_telemetry::health::Readiness {
        let status = self.status.clone();
        let consuming = self.consuming.readiness();
        Arc::new(move || {
            let (ready, reader) = consuming();
            let status = status.lock().expect("status lock").clone();
            (
                ready,
                serde_json::json!({"reader": reader, "builder": status}),
            )
        })
    }

    fn set_status(&self, change: impl FnOnce(&mut Status)) {
        change(&mut self.status.lock().expect("status lock"));
    }

    /// Runs until `shutdown` resolves.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let (stop, stopped) = watch::channel(false);
        let this = Arc::new(self);
        let passes = tokio::spawn({
            let this = this.clone();
            let stopped = stopped.clone();
            async move { this.lead(stopped).await }
        });
        let worker = tokio::spawn({
            let this = this.clone();
            let stopped = stopped.clone();
            async move { this.work_dpo(stopped).await }
        });
        let reader = consume::Reader {
            pool: &this.pool,
            judgment_topic: this.judgment_topic.clone(),
            metrics: &this.metrics,
        };
        let read = reader.run(&this.consumer, stopped);
        tokio::pin!(read);
        tokio::pin!(shutdown);
        tokio::select! {
            result = &mut read => { result?; }
            () = &mut shutdown => {
                let _ = stop.send(true);
                read.await?;
            }
        }
        let _ = stop.send(true);
        passes.await?;
        worker.await?;
        info!(status = ?this.status(), "preference builder stopped");
        Ok(())
    }

    /// The leader's loop: click and rating passes every poll, the
    /// propensity estimate when due.
    async fn lead(&self, mut stopped: watch::Receiver<bool>) {
        let lock = LeaderLock::new(LEADER_LOCK);
        let mut leader: Option<LeaderGuard> = None;
        let mut estimated: Option<Instant> = None;
        let mut curve = propensity::Curve::prior(self.config.prior());
        loop {
            if *stopped.borrow() {
                break;
            }
            match &mut leader {
                None => match lock.try_acquire(&self.pool).await {
                    Ok(Some(guard)) => {
                        info!("leading: this replica builds click and rating pairs");
                        leader = Some(guard);
                        self.set_status(|s| s.leader = true);
                        estimated = None;
                    }
                    Ok(None) => {}
                    Err(error) => {
                        warn!(%error, "cannot reach the database to take the leader lock")
                    }
                },
                Some(guard) => {
                    if !guard.is_held().await {
                        warn!("leader lock lost: following");
                        leader = None;
                        self.set_status(|s| s.leader = false);
                    }
                }
            }
            if leader.is_some() {
                if let Err(error) = self.pass(&mut estimated, &mut curve).await {
                    let error = format!("{error:#}");
                    warn!(error, "preference pass failed; trying again");
                    self.set_status(|s| s.last_error = Some(error));
                }
            }
            tokio::select! {
                _ = stopped.wait_for(|s| *s) => break,
                () = tokio::time::sleep(self.config.poll()) => {}
            }
        }
        if let Some(guard) = leader {
            let _ = guard.release().await;
        }
    }

    async fn pass(
        &self,
        estimated: &mut Option<Instant>,
        curve: &mut propensity::Curve,
    ) -> anyhow::Result<()> {
        let every = Duration::from_secs(self.config.propensity_every_s);
        if self.config.propensity_every_s > 0 && estimated.is_none_or(|at| at.elapsed() >= every) {
            *estimated = Some(Instant::now());
            match propensity::estimate_and_store(&self.pool, &self.config).await {
                Ok(Some(id)) => info!(id, "position bias estimated from the traffic"),
                Ok(None) => {}
                Err(error) => warn!("estimating position bias failed: {error:#}"),
            }
        }
        if let Some(latest) = propensity::Curve::latest(&self.pool, self.config.prior()).await? {
            *curve = latest;
        }
        for (rank, value) in curve.examination(self.config.propensity_depth) {
            self.metrics.propensity(rank, value);
        }
        let timing = clicks::Timing {
            quiet: self.config.quiet(),
            expire_after: self.config.expire_after(),
            lookback: self.config.lookback(),
        };
        let clicked = clicks::pass(&self.pool, timing, self.config.batch, curve).await?;
        self.metrics.pairs("click", clicked.new_pairs);
        self.metrics.inputs("click", clicked.clicks);
        for (reason, count) in &clicked.refused {
            self.metrics.refused("click", reason, *count);
        }
        self.metrics
            .waiting(clicked.waiting, clicked.oldest_waiting_s);
        let rated = ratings::pass(
            &self.pool,
            self.config.lookback(),
            self.config.batch,
            self.config.rating_rules(),
        )
        .await?;
        self.metrics.pairs("rating", rated.new_pairs);
        self.metrics.inputs("rating", rated.ratings);
        for (reason, count) in &rated.refused {
            self.metrics.refused("rating", reason, *count);
        }
        let pending: i64 =
            sqlx::query_scalar("SELECT count(*) FROM dpo_queue WHERE state = 'pending'")
                .fetch_one(&self.pool)
                .await?;
        self.metrics.dpo_pending(pending as u64);
        self.set_status(|s| {
            s.passes += 1;
            s.clicks_marked += clicked.clicks;
            s.ratings_marked += rated.ratings;
            s.waiting_clicks = clicked.waiting;
            s.propensity_estimate = curve.id();
            s.last_error = None;
        });
        Ok(())
    }

    /// Works the D_po queue: one query at a time (the teacher's client
    /// keeps its own limits).
    async fn work_dpo(&self, mut stopped: watch::Receiver<bool>) {
        if !self.config.dpo {
            return;
        }
        let lease = Duration::from_secs(self.config.lease_s);
        let max_backoff = Duration::from_millis(self.config.max_backoff_ms);
        let mut current: Option<Arc<dpo::Serving>> = None;
        let mut teacher: Option<(String, Arc<dyn kalon_align::AestheticScorer>)> = None;
        let mut said_waiting = false;
        loop {
            if *stopped.borrow() {
                break;
            }
            let worked = match self
                .dpo_step(
                    lease,
                    max_backoff,
                    &mut current,
                    &mut teacher,
                    &mut said_waiting,
                )
                .await
            {
                Ok(worked) => worked,
                Err(error) => {
                    warn!("D_po step failed: {error:#}");
                    false
                }
            };
            if !worked {
                tokio::select! {
                    _ = stopped.wait_for(|s| *s) => break,
                    () = tokio::time::sleep(self.config.poll()) => {}
                }
            }
        }
        // the LMM teacher owns a runtime, which may not be dropped here
        if let Some((_, teacher)) = teacher.take() {
            let _ = tokio::task::spawn_blocking(move || drop(teacher)).await;
        }
    }

    /// One queued query, if one is due and a version serves. Returns whether
    /// it worked on one.
    async fn dpo_step(
        &self,
        lease: Duration,
        max_backoff: Duration,
        current: &mut Option<Arc<dpo::Serving>>,
        teacher: &mut Option<(String, Arc<dyn kalon_align::AestheticScorer>)>,
        said_waiting: &mut bool,
    ) -> anyhow::Result<bool> {
        let Some(serving) = dpo::serving(&self.pool, &self.config, &self.cache, current).await?
        else {
            if !*said_waiting {
                info!("no promoted version yet: rephrased queries wait for D_po");
                *said_waiting = true;
            }
            return Ok(false);
        };
        *said_waiting = false;
        self.set_status(|s| s.serving = Some(serving.version.clone()));
        if teacher.as_ref().is_none_or(|(v, _)| *v != serving.version) {
            let built = dpo::teacher(&self.config, self.llm.as_ref(), &serving.dir)?;
            let old = teacher.replace((
                serving.version.clone(),
                Arc::new(dpo::Remembering::new(built)),
            ));
            if let Some((_, old)) = old {
                tokio::task::spawn_blocking(move || drop(old)).await?;
            }
        }
        let scorer = teacher.as_ref().expect("teacher built").1.clone();
        let Some(item) = store::claim_dpo(&self.pool, lease).await? else {
            return Ok(false);
        };
        if item.attempts > self.config.dpo_max_attempts {
            let reason = format!(
                "gave up after {} attempts (--dpo-max-attempts); set state = 'pending' to try again",
                self.config.dpo_max_attempts
            );
            warn!(query = item.query, reason, "no D_po for this query");
            store::refuse_dpo(&self.pool, item.event_id, &reason).await?;
            self.metrics.refused("dpo", "gave_up", 1);
            return Ok(true);
        }
        if store::dpo_built(&self.pool, &item, &serving.version).await? {
            store::finish_dpo(&self.pool, item.event_id, &serving.version, &[]).await?;
            return Ok(true);
        }
        let variants = self.config.dpo_variants.clone();
        let spec = self.config.spec();
        let work = {
            let item = item.clone();
            let serving = serving.clone();
            tokio::task::spawn_blocking(move || {
                dpo::build(&item, &serving, scorer.as_ref(), &variants, &spec)
            })
        };
        // the claim is kept while the teacher works, however long it takes
        let renew = async {
            let mut tick = tokio::time::interval(lease / 3);
            tick.tick().await;
            loop {
                tick.tick().await;
                if let Err(error) = store::renew_dpo(&self.pool, item.event_id, lease).await {
                    warn!(%error, "renewing a D_po claim failed");
                }
            }
        };
        let built = tokio::select! {
            built = work => built?,
            () = renew => unreachable!("renewing never ends"),
        };
        let stored = match built {
            Ok(dpo::Outcome::Pairs(rows)) => {
                match store::finish_dpo(&self.pool, item.event_id, &serving.version, &rows).await {
                    Ok(new) => {
                        self.metrics.pairs("dpo", new);
                        self.metrics.inputs("dpo", 1);
                        if let Some(client) = &self.llm {
                            let spent = client.stats();
                            self.metrics
                                .teacher_tokens(spent.prompt_tokens + spent.completion_tokens);
                        }
                        self.set_status(|s| s.dpo_done += 1);
                        Ok(())
                    }
                    Err(error) => Err(error),
                }
            }
            Ok(dpo::Outcome::Refused(reason)) => {
                warn!(query = item.query, reason, "no D_po for this query");
                store::refuse_dpo(&self.pool, item.event_id, &reason).await?;
                self.metrics.refused("dpo", "no_dpo", 1);
                Ok(())
            }
            Err(error) => Err(error),
        };
        if let Err(error) = stored {
            let retry_in = dpo::backoff(item.attempts, max_backoff);
            dpo::warn_failed(&item, &error, retry_in);
            store::postpone_dpo(&self.pool, item.event_id, retry_in, &format!("{error:#}")).await?;
        }
        Ok(true)
    }
}
