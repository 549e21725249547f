//! The consume -> decode -> write -> commit loop.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::future::join_all;
use kalon_events::{DeadLetterReason, Event, EventKind, DEAD_LETTER_TOPIC};
use kalon_kafka::consumer::{group_consumer, ConsumerHealth, Consuming};
use kalon_kafka::Publisher;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use sqlx::PgPool;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, info_span, warn};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::metrics::Metrics;
use crate::store::{is_transient, Rows, Written};
use crate::{DeadLetter, IngestConfig};

/// How often the durable offsets are committed again (see `recommit`).
const RECOMMIT_EVERY: Duration = Duration::from_secs(30);

/// Totals of one run.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct IngestReport {
    pub batches: u64,
    /// Rows inserted.
    pub written: u64,
    /// Events already present (redeliveries), not inserted again.
    pub duplicates: u64,
    pub dead_letters: u64,
}

/// Where one accepted event came from and what it said, to write it alone
/// (and dead-letter it) if the database refuses its batch.
struct Source {
    topic: Arc<str>,
    partition: i32,
    offset: i64,
    kind: EventKind,
    payload: Vec<u8>,
}

/// Messages gathered for one transaction.
struct Batch {
    rows: Rows,
    sources: Vec<Source>,
    dead: Vec<DeadLetter>,
    /// Highest offset seen per topic-partition.
    offsets: Vec<(Arc<str>, i32, i64)>,
    /// One span per traced message, closed when the batch is durable.
    spans: Vec<tracing::Span>,
}

impl Batch {
    fn new() -> Self {
        Batch {
            rows: Rows::default(),
            sources: Vec::new(),
            dead: Vec::new(),
            offsets: Vec::new(),
            spans: Vec::new(),
        }
    }

    fn len(&self) -> usize {
        self.rows.len() + self.dead.len()
    }

    fn track(&mut self, topic: &str, partition: i32, offset: i64) -> Arc<str> {
        match self
            .offsets
            .iter_mut()
            .find(|(t, p, _)| &**t == topic && *p == partition)
        {
            Some(entry) => {
                entry.2 = entry.2.max(offset);
                entry.0.clone()
            }
            None => {
                let topic: Arc<str> = Arc::from(topic);
                self.offsets.push((topic.clone(), partition, offset));
                topic
            }
        }
    }
}

/// What a finished batch did, and which offsets it makes safe to commit.
struct Done {
    written: Written,
    dead_letters: u64,
    offsets: Vec<(Arc<str>, i32, i64)>,
}

/// State the writer tasks share.
struct Shared {
    pool: PgPool,
    producer: Publisher,
    dead_letter_topic: String,
    metrics: Metrics,
    max_backoff: Duration,
    stop: watch::Receiver<bool>,
}

/// A running ingest: build it, then `run` it until shutdown.
pub struct Ingest {
    config: IngestConfig,
    consumer: StreamConsumer,
    consuming: Consuming,
    pool: PgPool,
    producer: Publisher,
    metrics: Metrics,
    handled: Arc<AtomicU64>,
}

impl Ingest {
    /// Connects to Postgres (checking the schema is current and the
    /// partitions exist) and joins the consumer group.
    pub async fn build(config: IngestConfig) -> anyhow::Result<Self> {
        config.validate()?;
        let pool = config.database.connect(config.writers as u32 + 1).await?;
        kalon_db::check_schema(&pool).await?;
        let created = kalon_db::ensure_partitions(&pool, 2).await?;
        if created > 0 {
            info!(created, "created monthly event partitions");
        }
        let kafka = config.kafka.settings();
        let consumer = group_consumer(
            &kafka,
            "kalon-ingest",
            &config.consumer.group_id,
            config.instance_id.as_deref(),
        )
        .context("failed to create the Kafka consumer")?;
        let topics = kafka.event_topics();
        let (consumer, consuming) = Consuming::start(
            consumer,
            &kafka,
            &config.consumer.group_id,
            topics.clone(),
            config.consumer.membership(),
            config.consumer.stall_after(),
        )
        .await
        .context("failed to take the event partitions")?;
        let metrics = Metrics::new(consuming.health());
        // librdkafka's default delivery timeout (5 min), as before: a dead
        // letter is retried by the client rather than given up and re-sent
        let producer = Publisher::new(&kafka, "kalon-ingest-dlq", Duration::from_secs(300))
            .context("failed to create the dead-letter producer")?;
        info!(topics = ?topics, group = %config.consumer.group_id, membership = %consuming.membership(), "ingest consuming");
        Ok(Ingest {
            config,
            consumer,
            consuming,
            pool,
            producer,
            metrics,
            handled: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Partitions this process holds now.
    pub fn assigned_partitions(&self) -> usize {
        kalon_kafka::consumer::assigned(&self.consumer)
    }

    /// How the partitions were taken, the group's lag, readiness.
    pub fn consuming(&self) -> &Consuming {
        &self.consuming
    }

    /// A live count of events made durable so far (written, duplicate or
    /// dead-lettered, with offsets committed); for progress displays.
    pub fn handled(&self) -> Arc<AtomicU64> {
        self.handled.clone()
    }

    /// Consumes until `shutdown` resolves, then finishes the batches in
    /// flight, commits their offsets and returns the totals.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<IngestReport> {
        let (stop_tx, stop_rx) = watch::channel(false);
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
        let shared = Arc::new(Shared {
            pool: self.pool.clone(),
            producer: self.producer.clone(),
            dead_letter_topic: self.config.kafka.settings().topic(DEAD_LETTER_TOPIC),
            metrics: self.metrics.clone(),
            max_backoff: Duration::from_millis(self.config.max_backoff_ms),
            stop: stop_rx.clone(),
        });
        let mut stop = stop_rx;
        let mut inflight: VecDeque<JoinHandle<Option<Done>>> = VecDeque::new();
        let mut report = IngestReport::default();
        let mut progress = Progress::new();
        let mut committed = TopicPartitionList::new();
        let mut recommitted = Instant::now();

        loop {
            // Commit what finished, in order; wait for the oldest when full.
            while let Some(front) = inflight.front() {
                if !front.is_finished() && inflight.len() < self.config.writers {
                    break;
                }
                let handle = inflight.pop_front().expect("front exists");
                match handle.await.context("a batch writer panicked")? {
                    Some(done) => {
                        self.commit(&done, CommitMode::Async, &mut report, &mut committed)
                    }
                    // Stopped while retrying: nothing after it may be committed.
                    None => return self.abandon(inflight, report).await,
                }
            }
            if *stop.borrow() {
                break;
            }
            let batch = self.gather(&mut stop).await;
            if batch.len() > 0 {
                inflight.push_back(tokio::spawn(persist(shared.clone(), batch)));
            }
            progress.tick(&report, &self.consuming.health().borrow(), &self.consumer);
            if recommitted.elapsed() >= RECOMMIT_EVERY {
                self.recommit(&committed);
                recommitted = Instant::now();
            }
        }

        info!(
            in_flight = inflight.len(),
            "shutting down: finishing batches in flight"
        );
        while let Some(handle) = inflight.pop_front() {
            match handle.await.context("a batch writer panicked")? {
                Some(done) => self.commit(&done, CommitMode::Async, &mut report, &mut committed),
                None => return self.abandon(inflight, report).await,
            }
        }
        // One synchronous commit of every offset this run made durable, so
        // nothing written is redelivered to a successor.
        if committed.count() > 0 {
            if let Err(error) = self.consumer.commit(&committed, CommitMode::Sync) {
                warn!(%error, "final offset commit failed; a successor will see redeliveries (deduplicated)");
            }
        }
        self.pool.close().await;
        info!(?report, "ingest stopped");
        Ok(report)
    }

    async fn abandon(
        &self,
        inflight: VecDeque<JoinHandle<Option<Done>>>,
        report: IngestReport,
    ) -> anyhow::Result<IngestReport> {
        warn!("stopped before a batch was durable; its offsets stay uncommitted and will be redelivered");
        for handle in inflight {
            let _ = handle.await;
        }
        Ok(report)
    }

    /// Receives messages until the batch is full, the linger time after the
    /// first message ran out, or shutdown was asked for.
    async fn gather(&self, stop: &mut watch::Receiver<bool>) -> Batch {
        let mut batch = Batch::new();
        let mut deadline: Option<tokio::time::Instant> = None;
        let prefix = &self.config.kafka.topic_prefix;
        while batch.len() < self.config.batch_max {
            let wait = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            };
            tokio::select! {
                message = self.consumer.recv() => match message {
                    Ok(message) => {
                        accept(prefix, &message, &mut batch);
                        deadline.get_or_insert_with(|| tokio::time::Instant::now() + self.config.linger());
                    }
                    Err(error) => {
                        warn!(%error, "kafka consumer error");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                _ = wait => break,
                _ = stop.changed() => break,
            }
        }
        batch
    }

    /// Commits again the durable offsets of the partitions this process
    /// still holds. A lost asynchronous commit would otherwise leave the
    /// group behind what is written, with no new traffic to move it, which
    /// the lag watch would call a stall. Partitions a rebalance took away
    /// are left to their new owner.
    fn recommit(&self, committed: &TopicPartitionList) {
        let Ok(assignment) = self.consumer.assignment() else {
            return;
        };
        let mut held = TopicPartitionList::new();
        for element in committed.elements() {
            if assignment
                .find_partition(element.topic(), element.partition())
                .is_some()
            {
                let _ = held.add_partition_offset(
                    element.topic(),
                    element.partition(),
                    element.offset(),
                );
            }
        }
        if held.count() > 0 {
            if let Err(error) = self.consumer.commit(&held, CommitMode::Async) {
                debug!(%error, "offset re-commit failed; tried again later");
            }
        }
    }

    fn commit(
        &self,
        done: &Done,
        mode: CommitMode,
        report: &mut IngestReport,
        committed: &mut TopicPartitionList,
    ) {
        report.batches += 1;
        report.written += done.written.total();
        report.duplicates += done.written.duplicates;
        report.dead_letters += done.dead_letters;
        self.handled.fetch_add(
            done.written.total() + done.written.duplicates + done.dead_letters,
            Ordering::Relaxed,
        );
        let mut offsets = TopicPartitionList::new();
        for (topic, partition, offset) in &done.offsets {
            for list in [&mut offsets, &mut *committed] {
                let next = Offset::Offset(offset + 1);
                // set fails when the partition is not in the list yet
                if list.set_partition_offset(topic, *partition, next).is_err() {
                    let _ = list.add_partition_offset(topic, *partition, next);
                }
            }
        }
        // A failed commit is harmless: the events are durable and a
        // redelivery is ignored by event id.
        if let Err(error) = self.consumer.commit(&offsets, mode) {
            debug!(%error, "offset commit failed; events will be redelivered and deduplicated");
        }
    }
}

fn accept(prefix: &str, message: &BorrowedMessage<'_>, batch: &mut Batch) {
    let (partition, offset) = (message.partition(), message.offset());
    let topic = batch.track(message.topic(), partition, offset);
    if let Some(context) = kalon_kafka::extract_trace(message.headers()) {
        let span = info_span!("ingest.event", topic = %topic, partition, offset);
        let _ = span.set_parent(context);
        batch.spans.push(span);
    }
    let payload = message.payload().unwrap_or_default();
    let refuse = |reason: DeadLetterReason, detail: String| DeadLetter {
        reason,
        detail,
        topic: topic.to_string(),
        partition,
        offset,
        key: message.key().map(<[u8]>::to_vec),
        payload: payload.to_vec(),
    };
    let Some(kind) = EventKind::from_topic(prefix, &topic) else {
        batch.dead.push(refuse(
            DeadLetterReason::UnknownTopic,
            format!("no event kind for topic {topic}"),
        ));
        return;
    };
    match Event::decode(kind, payload) {
        Ok(event) => {
            batch.rows.push(event);
            batch.sources.push(Source {
                topic,
                partition,
                offset,
                kind,
                payload: payload.to_vec(),
            });
        }
        Err(error) => batch.dead.push(refuse(error.class(), error.to_string())),
    }
}

/// Writes a batch durably: rows, then dead letters. Retries transient
/// failures until they pass or shutdown is asked for (then `None`: nothing
/// of this batch may be committed).
async fn persist(shared: Arc<Shared>, mut batch: Batch) -> Option<Done> {
    let started = Instant::now();
    let size = batch.len();
    let written = if batch.rows.is_empty() {
        Written::default()
    } else {
        match retry(&shared, "write batch", || batch.rows.write(&shared.pool)).await? {
            Ok(written) => written,
            Err(error) => {
                warn!(%error, events = batch.rows.len(), "database refused the batch; writing its events one by one");
                let (written, refused) = write_one_by_one(&shared, &batch).await?;
                batch.dead.extend(refused);
                written
            }
        }
    };
    shared.metrics.batch(size, started.elapsed().as_secs_f64());
    let dead_letters = batch.dead.len() as u64;
    send_dead_letters(&shared, &batch.dead).await?;
    let counts = batch.rows.counts();
    for (kind, (count, inserted)) in EventKind::ALL
        .iter()
        .zip(counts.iter().zip(written.inserted))
    {
        shared.metrics.events(kind.topic(), "written", inserted);
        shared
            .metrics
            .events(kind.topic(), "duplicate", count - inserted.min(*count));
    }
    for dead in &batch.dead {
        shared.metrics.dead_letter(dead.reason.as_str());
    }
    drop(batch.spans);
    Some(Done {
        written,
        dead_letters,
        offsets: batch.offsets,
    })
}

/// Runs `op` until it succeeds or fails for good. Transient failures are
/// retried with exponential backoff and jitter; `None` when shutdown came
/// first; `Some(Err)` for a permanent failure.
async fn retry<T, F, Fut>(shared: &Shared, what: &str, mut op: F) -> Option<Result<T, sqlx::Error>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, sqlx::Error>>,
{
    let mut backoff = Duration::from_millis(100);
    loop {
        match op().await {
            Ok(value) => return Some(Ok(value)),
            Err(error) if is_transient(&error) => {
                warn!(%error, retry_in_ms = backoff.as_millis() as u64, "{what} failed; retrying");
                if pause(shared, backoff).await {
                    return None;
                }
                backoff = (backoff * 2).min(shared.max_backoff);
            }
            Err(error) => return Some(Err(error)),
        }
    }
}

/// Sleeps about `backoff` (with jitter); true when shutdown was asked for.
async fn pause(shared: &Shared, backoff: Duration) -> bool {
    let jitter = rand::random_range(0.5..1.0);
    let mut stop = shared.stop.clone();
    if *stop.borrow() {
        return true;
    }
    tokio::select! {
        _ = tokio::time::sleep(backoff.mul_f64(jitter)) => false,
        _ = stop.changed() => true,
    }
}

/// Writes each event of a refused batch alone, so one bad row cannot stop
/// its partition; the refused ones become dead letters.
async fn write_one_by_one(shared: &Shared, batch: &Batch) -> Option<(Written, Vec<DeadLetter>)> {
    let mut total = Written::default();
    let mut refused = Vec::new();
    for source in &batch.sources {
        let event = Event::decode(source.kind, &source.payload).expect("decoded once already");
        let mut single = Rows::default();
        single.push(event);
        match retry(shared, "write event", || single.write(&shared.pool)).await? {
            Ok(written) => {
                for (sum, n) in total.inserted.iter_mut().zip(written.inserted) {
                    *sum += n;
                }
                total.duplicates += written.duplicates;
            }
            Err(error) => refused.push(DeadLetter {
                reason: DeadLetterReason::RejectedByDatabase,
                detail: error.to_string(),
                topic: source.topic.to_string(),
                partition: source.partition,
                offset: source.offset,
                key: None,
                payload: source.payload.clone(),
            }),
        }
    }
    Some((total, refused))
}

/// Produces the dead letters and waits until the broker has them all.
async fn send_dead_letters(shared: &Shared, dead: &[DeadLetter]) -> Option<()> {
    let mut pending: Vec<&DeadLetter> = dead.iter().collect();
    let mut backoff = Duration::from_millis(100);
    while !pending.is_empty() {
        let sends = pending.iter().map(|d| {
            shared.producer.publish_record(
                &shared.dead_letter_topic,
                d.key.as_deref(),
                &d.payload,
                d.headers(),
            )
        });
        let outcomes = join_all(sends).await;
        let mut failed = Vec::new();
        for (d, outcome) in pending.iter().zip(outcomes) {
            if let Err(error) = outcome {
                warn!(%error, "dead letter not acknowledged; retrying");
                failed.push(*d);
            }
        }
        pending = failed;
        if !pending.is_empty() {
            if pause(shared, backoff).await {
                return None;
            }
            backoff = (backoff * 2).min(shared.max_backoff);
        }
    }
    Some(())
}

/// A log line every ten seconds so an operator sees ingest move.
struct Progress {
    last: Instant,
    last_written: u64,
}

impl Progress {
    fn new() -> Self {
        Progress {
            last: Instant::now(),
            last_written: 0,
        }
    }

    fn tick(&mut self, report: &IngestReport, health: &ConsumerHealth, consumer: &StreamConsumer) {
        let elapsed = self.last.elapsed();
        if elapsed < Duration::from_secs(10) {
            return;
        }
        let rate = (report.written - self.last_written) as f64 / elapsed.as_secs_f64();
        info!(
            written = report.written,
            duplicates = report.duplicates,
            dead_letters = report.dead_letters,
            events_per_s = rate.round(),
            consumer_lag = health.lag.map_or(-1, |l| l.messages),
            assigned_partitions = kalon_kafka::consumer::assigned(consumer),
            ready = health.ready(),
            "ingest progress"
        );
        self.last = Instant::now();
        self.last_written = report.written;
    }
}
