//! Kalon enricher: the paper's two uses of large models as a service.
//!
//! - A consumer (its own group) reads `search.impression.v1` and upserts
//!   each normalised query into the `enrich_queries` queue in Postgres, then
//!   commits its offsets. It never calls the LLM, so it never slows down,
//!   and ingest's group is not involved at all.
//! - Workers claim due queries with a lease and ask the LLM for each
//!   configured prompt variant not already stored within the TTL; answers
//!   are parsed robustly, stored with model, latency, tokens and the raw
//!   response, and the query's rephrasings are published on
//!   `query.rephrased.v1`. A malformed answer is recorded and asked again
//!   with the strict prompt; if that fails too it is recorded as dead and
//!   sent to `enrich.deadletter.v1`.
//! - When the LLM fails (down, 429s, breaker open, budget spent) the query
//!   stays pending with a backoff and what was already answered is kept:
//!   nothing is lost and nothing is asked twice. A crashed worker's lease
//!   runs out and another takes the query.
//! - [`judgments::JudgmentRecorder`]: the LMM judge as a library call that
//!   stores its judgments and publishes them on `lmm.judgment.v1`.
//! - Metrics (`kalon.enricher.*`, in `metrics`) count what is read, stored,
//!   postponed and dead-lettered, and the queue's size; the LLM client
//!   counts its own calls (`kalon.llm.*`).

pub mod cli;
mod config;
pub mod judgments;
mod metrics;
pub mod store;

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use kalon_events::{EnrichDeadLetter, EnrichTask, Event, EventKind, QueryRephrased, TopicPayload};
use kalon_kafka::consumer::{group_consumer, Consuming};
use kalon_kafka::{KafkaSettings, Publisher};
use kalon_llm::ask::AskError;
use kalon_llm::rephrase::ask_rephrasing;
use kalon_llm::{LlmClient, LlmConfig};
use rand::Rng;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::OwnedHeaders;
use rdkafka::{Message, Offset, TopicPartitionList};
use sqlx::PgPool;
use tokio::sync::watch;
use tracing::{debug, info, warn};

pub use config::EnricherConfig;

/// How often an idle reader commits its position again.
const RECOMMIT_EVERY: Duration = Duration::from_secs(30);

/// How often the queue's size is measured for `kalon.enricher.queue`.
const MEASURE_QUEUE_EVERY: Duration = Duration::from_secs(15);

/// What a run did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct EnrichReport {
    pub impressions: u64,
    pub skipped: u64,
    pub enriched: u64,
    pub postponed: u64,
    pub dead_lettered: u64,
}

#[derive(Default)]
struct Counters {
    impressions: AtomicU64,
    skipped: AtomicU64,
    enriched: AtomicU64,
    postponed: AtomicU64,
    dead_lettered: AtomicU64,
}

impl Counters {
    fn report(&self) -> EnrichReport {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        EnrichReport {
            impressions: get(&self.impressions),
            skipped: get(&self.skipped),
            enriched: get(&self.enriched),
            postponed: get(&self.postponed),
            dead_lettered: get(&self.dead_lettered),
        }
    }
}

pub struct Enricher {
    shared: Arc<Shared>,
    consumer: StreamConsumer,
    consuming: Consuming,
}

struct Shared {
    config: EnricherConfig,
    kafka: KafkaSettings,
    pool: PgPool,
    llm: LlmClient,
    producer: Publisher,
    counters: Counters,
    metrics: metrics::Metrics,
}

/// The enricher's publisher: each event acknowledged within 10 s.
pub(crate) fn publisher(kafka: &KafkaSettings, client_id: &str) -> anyhow::Result<Publisher> {
    Ok(Publisher::new(kafka, client_id, Duration::from_secs(10))?)
}

impl Enricher {
    /// Connects to Postgres (migrating it), the broker and checks the LLM
    /// settings; does not call the LLM.
    pub async fn build(config: EnricherConfig, llm: LlmConfig) -> anyhow::Result<Enricher> {
        config.validate()?;
        let llm = LlmClient::new(llm)?;
        let pool = config.database.connect(config.workers as u32 + 2).await?;
        kalon_db::migrate(&pool)
            .await
            .context("failed to migrate")?;
        let kafka = config.kafka.settings();
        let consumer = group_consumer(&kafka, "kalon-enricher", &config.consumer.group_id, None)?;
        let topic = kafka.topic(EventKind::Impression.topic());
        let (consumer, consuming) = Consuming::start(
            consumer,
            &kafka,
            &config.consumer.group_id,
            vec![topic.clone()],
            config.consumer.membership(),
            config.consumer.stall_after(),
        )
        .await
        .context("failed to take the impression partitions")?;
        let producer = publisher(&kafka, "kalon-enricher")?;
        info!(topic, group = %config.consumer.group_id, membership = %consuming.membership(), variants = ?config.variants, "enricher ready");
        Ok(Enricher {
            shared: Arc::new(Shared {
                config,
                kafka,
                pool,
                llm,
                producer,
                counters: Counters::default(),
                metrics: metrics::Metrics::new(),
            }),
            consumer,
            consuming,
        })
    }

    /// Partitions the impression reader holds now.
    pub fn assigned_partitions(&self) -> usize {
        kalon_kafka::consumer::assigned(&self.consumer)
    }

    /// How the impression reader took its partitions, its group's lag,
    /// readiness.
    pub fn consuming(&self) -> &Consuming {
        &self.consuming
    }

    /// Runs until `shutdown` resolves: in-flight queries are released for
    /// the next run, offsets of queued queries committed.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<EnrichReport> {
        let (stop, stopped) = watch::channel(false);
        let mut workers = Vec::new();
        for _ in 0..self.shared.config.workers {
            let shared = self.shared.clone();
            let stopped = stopped.clone();
            workers.push(tokio::spawn(async move { shared.work(stopped).await }));
        }
        let measure = tokio::spawn({
            let shared = self.shared.clone();
            let stopped = stopped.clone();
            async move { shared.measure_queue(stopped).await }
        });
        let shared = self.shared.clone();
        let consume = shared.consume(&self.consumer, stopped);
        tokio::pin!(consume);
        tokio::select! {
            result = &mut consume => { result?; }
            _ = shutdown => {
                let _ = stop.send(true);
                consume.await?;
            }
        }
        let _ = stop.send(true);
        for worker in workers {
            worker.await?;
        }
        measure.await?;
        let report = self.shared.counters.report();
        info!(?report, "enricher stopped");
        Ok(report)
    }
}

/// Resolves once the stop flag is set (the watch guard never crosses an await).
async fn until_stopped(stopped: &mut watch::Receiver<bool>) {
    let _ = stopped.wait_for(|s| *s).await;
}

impl Shared {
    async fn consume(
        &self,
        consumer: &StreamConsumer,
        mut stopped: watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        let mut backoff = Duration::from_millis(100);
        // the first re-commit after a full period: at the start nothing is read
        let mut recommit =
            tokio::time::interval_at(tokio::time::Instant::now() + RECOMMIT_EVERY, RECOMMIT_EVERY);
        recommit.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let first = tokio::select! {
                message = consumer.recv() => message,
                _ = until_stopped(&mut stopped) => break,
                _ = recommit.tick() => {
                    // Idle: everything read is queued, so the position is
                    // safe to commit again. A lost asynchronous commit would
                    // otherwise leave the group behind with no new traffic to
                    // move it, which the lag watch would call a stall.
                    if let Ok(position) = consumer.position() {
                        let mut read = TopicPartitionList::new();
                        for p in position.elements() {
                            if let Offset::Offset(n) = p.offset() {
                                read.add_partition_offset(p.topic(), p.partition(), Offset::Offset(n))?;
                            }
                        }
                        if read.count() > 0 {
                            let _ = consumer.commit(&read, CommitMode::Async);
                        }
                    }
                    continue;
                }
            };
            let mut offsets: HashMap<(String, i32), i64> = HashMap::new();
            let mut queries = BTreeSet::new();
            let (mut queued, mut skipped) = (0u64, 0u64);
            let mut take = |message: rdkafka::message::BorrowedMessage<'_>| {
                offsets.insert(
                    (message.topic().to_owned(), message.partition()),
                    message.offset() + 1,
                );
                self.counters.impressions.fetch_add(1, Ordering::Relaxed);
                match message
                    .payload()
                    .map(|p| Event::decode(EventKind::Impression, p))
                {
                    Some(Ok(Event::Impression(impression))) => {
                        match store::normalise(&impression.query) {
                            Some(query) => {
                                queries.insert(query);
                                queued += 1;
                            }
                            None => {
                                self.counters.skipped.fetch_add(1, Ordering::Relaxed);
                                skipped += 1;
                            }
                        }
                    }
                    // ingest dead-letters invalid events; here they are skipped
                    _ => {
                        self.counters.skipped.fetch_add(1, Ordering::Relaxed);
                        skipped += 1;
                    }
                }
            };
            match first {
                Ok(message) => take(message),
                Err(error) => {
                    warn!(%error, "reading impressions failed");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            }
            // gather what else is ready, briefly
            let deadline = tokio::time::Instant::now() + Duration::from_millis(50);
            for _ in 1..500 {
                match tokio::time::timeout_at(deadline, consumer.recv()).await {
                    Ok(Ok(message)) => take(message),
                    _ => break,
                }
            }
            // the queue must hold them before the offsets move
            loop {
                match store::enqueue(&self.pool, &queries, self.config.ttl()).await {
                    Ok(()) => break,
                    Err(error) => {
                        warn!(%error, queries = queries.len(), "queueing queries failed; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff =
                            (backoff * 2).min(Duration::from_millis(self.config.max_backoff_ms));
                    }
                }
            }
            backoff = Duration::from_millis(100);
            self.metrics.impressions("queued", queued);
            self.metrics.impressions("skipped", skipped);
            let mut list = TopicPartitionList::new();
            for ((topic, partition), offset) in offsets {
                list.add_partition_offset(&topic, partition, Offset::Offset(offset))?;
            }
            if let Err(error) = consumer.commit(&list, CommitMode::Async) {
                debug!(%error, "offset commit failed; impressions will be read again (harmless)");
            }
            debug!(queries = queries.len(), "queries queued");
        }
        if let Ok(list) = consumer.position() {
            let _ = consumer.commit(&list, CommitMode::Sync);
        }
        Ok(())
    }

    async fn work(self: Arc<Self>, mut stopped: watch::Receiver<bool>) {
        let lease = Duration::from_secs(self.config.lease_s);
        let poll = Duration::from_millis(self.config.poll_ms);
        while !*stopped.borrow() {
            let claimed = match store::claim(&self.pool, lease).await {
                Ok(claimed) => claimed,
                Err(error) => {
                    warn!(%error, "claiming a query failed");
                    None
                }
            };
            let Some((query, attempt)) = claimed else {
                tokio::select! {
                    _ = tokio::time::sleep(poll) => {}
                    _ = until_stopped(&mut stopped) => {}
                }
                continue;
            };
            tokio::select! {
                // the work first: when it has just finished the query, the
                // renewal that found the claim gone (no longer pending) is
                // no takeover, and must not be reported as one
                biased;
                result = self.enrich(&query, attempt) => {
                    if let Err(error) = result {
                        warn!(%error, query, "enriching failed; will retry");
                        let _ = store::postpone(&self.pool, &query, self.backoff(attempt), &format!("{error:#}")).await;
                        self.counters.postponed.fetch_add(1, Ordering::Relaxed);
                        self.metrics.query("postponed");
                    }
                }
                () = self.keep_lease(&query, attempt, lease) => {
                    // another worker holds the query now; it asks what is left
                    warn!(query, "lease lost mid-work; leaving the query to its new holder");
                }
                _ = until_stopped(&mut stopped) => {
                    // give the query back for the next run
                    let _ = store::postpone(&self.pool, &query, Duration::ZERO, "enricher stopped").await;
                }
            }
        }
    }

    /// Renews this worker's lease on `query` every third of `lease` while it
    /// works, so slow LLM calls never let another worker claim the query
    /// and ask the same variants again. Returns only when the claim is lost.
    async fn keep_lease(&self, query: &str, attempt: i32, lease: Duration) {
        let mut tick = tokio::time::interval(lease / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await; // the first tick is immediate; the claim is fresh
        loop {
            tick.tick().await;
            match store::renew(&self.pool, query, attempt, lease).await {
                Ok(true) => {}
                Ok(false) => return,
                // the lease may run out; renewing goes on
                Err(error) => warn!(%error, query, "renewing a lease failed"),
            }
        }
    }

    /// Measures the queue every [`MEASURE_QUEUE_EVERY`] until stopped.
    async fn measure_queue(&self, mut stopped: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(MEASURE_QUEUE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = until_stopped(&mut stopped) => return,
            }
            match store::waiting(&self.pool).await {
                Ok((pending, retrying)) => self.metrics.queue(pending, retrying),
                Err(error) => debug!(%error, "measuring the query queue failed"),
            }
        }
    }

    fn backoff(&self, attempt: i32) -> Duration {
        let exponent = attempt.clamp(1, 16) as u32 - 1;
        let cap = Duration::from_millis(250u64.saturating_mul(1 << exponent))
            .min(Duration::from_millis(self.config.max_backoff_ms));
        cap.mul_f64(0.5 + 0.5 * rand::rng().random::<f64>())
    }

    async fn enrich(&self, query: &str, attempt: i32) -> anyhow::Result<()> {
        let fresh = store::fresh_variants(&self.pool, query, self.config.ttl()).await?;
        for &variant in &self.config.variants {
            if fresh.contains(variant.name()) {
                continue;
            }
            match ask_rephrasing(&self.llm, query, variant).await {
                Ok(answer) => {
                    store::save_rephrasing(&self.pool, query, variant, &answer).await?;
                    self.metrics.malformed("rephrase", answer.refused.len());
                    self.metrics.rephrasing(variant.name());
                }
                Err(AskError::Malformed { refused }) => {
                    store::save_dead(
                        &self.pool,
                        "rephrase",
                        query,
                        Some(variant.name()),
                        &refused,
                    )
                    .await?;
                    self.metrics.malformed("rephrase", refused.len());
                    let dead = EnrichDeadLetter {
                        errors: refused.iter().map(|(_, e)| e.0.clone()).collect(),
                        query: query.to_owned(),
                        raw_responses: refused.iter().map(|(c, _)| c.raw.clone()).collect(),
                        task: EnrichTask::Rephrase,
                        variant: variant.name().to_owned(),
                    };
                    let headers = kalon_kafka::headers_from(&dead.headers());
                    self.producer
                        .publish(
                            &self.kafka.topic(EnrichDeadLetter::TOPIC),
                            query.as_bytes(),
                            &dead.to_json(),
                            headers,
                        )
                        .await?;
                    self.counters.dead_lettered.fetch_add(1, Ordering::Relaxed);
                    self.metrics.dead_letter("rephrase");
                    warn!(
                        query,
                        variant = variant.name(),
                        "malformed LLM output dead-lettered"
                    );
                }
                Err(AskError::Llm(error)) => {
                    // keep what is done; ask for the rest later
                    debug!(%error, query, "LLM unavailable; query postponed");
                    store::postpone(&self.pool, query, self.backoff(attempt), &error.to_string())
                        .await?;
                    self.counters.postponed.fetch_add(1, Ordering::Relaxed);
                    self.metrics.query("postponed");
                    return Ok(());
                }
            }
        }
        let (rephrasings, model) = store::rephrasings(&self.pool, query).await?;
        let event = QueryRephrased::now(query, model, rephrasings);
        self.producer
            .publish(
                &self.kafka.topic(QueryRephrased::TOPIC),
                query.as_bytes(),
                &event.to_json(),
                OwnedHeaders::new(),
            )
            .await?;
        store::finish(&self.pool, query).await?;
        self.counters.enriched.fetch_add(1, Ordering::Relaxed);
        self.metrics.query("enriched");
        debug!(query, "query enriched");
        Ok(())
    }
}
