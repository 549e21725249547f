//! The reader of `lmm.judgment.v1` and `query.rephrased.v1` (the builder's
//! own group). A judgment becomes its pairs and its mark in one
//! transaction; a rephrased query goes into the D_po queue. Offsets are
//! committed only after that is durable, so a crash reads the batch again
//! and the ids and marks make the second reading a no-op. A bad event (an
//! unknown verdict, a comparison without one, an undecodable payload) is
//! marked with its reason and the partition moves on.

use std::collections::HashMap;
use std::time::Duration;

use kalon_align::feedback::{judgment_pairs, RowVerdict};
use kalon_events::{JudgmentKind, JudgmentVerdict, LmmJudgment, QueryRephrased, TopicPayload};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use sqlx::PgPool;
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::metrics::Metrics;
use crate::store::{self, Mark, OnConflict, PairRow};

/// Reasons a judgment is refused.
pub const UNKNOWN_VERDICT: &str = "unknown_verdict";
pub const NO_VERDICT: &str = "missing_verdict";
pub const UNREADABLE: &str = "unreadable_event";

/// A scoring (two 1-5 scores) counts as a win when the scores differ by at
/// least this much.
const SCORE_MARGIN: f64 = 0.5;

/// What a batch read.
#[derive(Default)]
struct Batch {
    offsets: HashMap<(String, i32), i64>,
    rows: Vec<PairRow>,
    marks: Vec<Mark>,
    rephrased: Vec<QueryRephrased>,
    unreadable_rephrasings: u64,
}

pub(crate) struct Reader<'a> {
    pub pool: &'a PgPool,
    pub judgment_topic: String,
    pub metrics: &'a Metrics,
}

impl Reader<'_> {
    pub(crate) async fn run(
        &self,
        consumer: &StreamConsumer,
        mut stopped: watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        let mut backoff = Duration::from_millis(100);
        loop {
            let first = tokio::select! {
                message = consumer.recv() => message,
                _ = stopped.wait_for(|s| *s) => break,
            };
            let mut batch = Batch::default();
            match first {
                Ok(message) => self.take(&message, &mut batch),
                Err(error) => {
                    warn!(%error, "reading judgments and rephrasings failed");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            }
            let deadline = tokio::time::Instant::now() + Duration::from_millis(50);
            for _ in 1..1000 {
                match tokio::time::timeout_at(deadline, consumer.recv()).await {
                    Ok(Ok(message)) => self.take(&message, &mut batch),
                    _ => break,
                }
            }
            // durable before the offsets move
            loop {
                match self.store(&batch).await {
                    Ok(()) => break,
                    Err(error) => {
                        warn!(%error, "storing judgments' pairs and rephrasings failed; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                    }
                }
            }
            backoff = Duration::from_millis(100);
            let mut list = TopicPartitionList::new();
            for ((topic, partition), offset) in &batch.offsets {
                list.add_partition_offset(topic, *partition, Offset::Offset(*offset))?;
            }
            if let Err(error) = consumer.commit(&list, CommitMode::Async) {
                debug!(%error, "offset commit failed; the batch will be read again (harmless)");
            }
        }
        if let Ok(list) = consumer.position() {
            let _ = consumer.commit(&list, CommitMode::Sync);
        }
        Ok(())
    }

    async fn store(&self, batch: &Batch) -> anyhow::Result<()> {
        let mut tx = self.pool.begin().await?;
        let new = store::insert_pairs(&mut tx, &batch.rows, OnConflict::Keep).await?;
        store::mark(&mut tx, "judgment", &batch.marks).await?;
        tx.commit().await?;
        store::enqueue_dpo(self.pool, &batch.rephrased).await?;
        self.metrics.pairs("judgment", new);
        for mark in batch.marks.iter().filter(|m| m.outcome != "paired") {
            self.metrics.refused("judgment", &mark.outcome, 1);
        }
        if batch.unreadable_rephrasings > 0 {
            self.metrics
                .refused("rephrasing", UNREADABLE, batch.unreadable_rephrasings);
            warn!(
                count = batch.unreadable_rephrasings,
                "unreadable query.rephrased.v1 events skipped"
            );
        }
        Ok(())
    }

    fn take(&self, message: &rdkafka::message::BorrowedMessage<'_>, batch: &mut Batch) {
        batch.offsets.insert(
            (message.topic().to_owned(), message.partition()),
            message.offset() + 1,
        );
        let payload = message.payload().unwrap_or_default();
        if message.topic() == self.judgment_topic {
            let coordinates = format!(
                "{}:{}:{}",
                message.topic(),
                message.partition(),
                message.offset()
            );
            match judgment(payload, &coordinates) {
                Ok((rows, mark)) => {
                    batch.rows.extend(rows);
                    batch.marks.push(mark);
                }
                Err(mark) => batch.marks.push(mark),
            }
        } else {
            match QueryRephrased::decode(payload) {
                Ok(event) if !has_nul(payload) => batch.rephrased.push(event),
                _ => batch.unreadable_rephrasings += 1,
            }
        }
    }
}

/// Whether a JSON payload holds an escaped NUL, which Postgres text and
/// jsonb refuse (a raw NUL byte is not JSON at all).
fn has_nul(payload: &[u8]) -> bool {
    payload
        .windows(6)
        .any(|w| w.eq_ignore_ascii_case(b"\\u0000"))
}

/// One judgment's pairs and mark, or its refusal (marked by the message's
/// coordinates when it has no readable judgment id).
pub fn judgment(payload: &[u8], coordinates: &str) -> Result<(Vec<PairRow>, Mark), Mark> {
    if has_nul(payload) {
        // Postgres text and jsonb cannot hold it: refused, never retried
        return Err(Mark::refused(
            coordinates,
            UNREADABLE,
            "the event holds a NUL character (\\u0000)",
        ));
    }
    let event = match LmmJudgment::decode(payload) {
        Ok(event) => event,
        Err(error) => {
            // a readable id with an unknown verdict is refused by that id
            // (only a real judgment id: anything else could be any size)
            let value: serde_json::Value = serde_json::from_slice(payload).unwrap_or_default();
            let id = value["judgment_id"]
                .as_str()
                .and_then(|id| uuid::Uuid::parse_str(id).ok())
                .map(|id| id.to_string())
                .unwrap_or_else(|| coordinates.to_owned());
            let reason = match value.get("verdict") {
                Some(serde_json::Value::String(v))
                    if !["win", "loss", "similar"].contains(&v.as_str()) =>
                {
                    UNKNOWN_VERDICT
                }
                Some(serde_json::Value::Null) | None if value["kind"] == "compare" => NO_VERDICT,
                _ => UNREADABLE,
            };
            return Err(Mark::refused(
                id,
                reason,
                error.to_string().replace('\0', ""),
            ));
        }
    };
    let id = event.judgment_id.to_string();
    let verdict = match (event.kind, event.verdict, event.score_a, event.score_b) {
        (JudgmentKind::Compare, Some(verdict), _, _) => verdict,
        (JudgmentKind::Score, _, Some(a), Some(b)) if (a - b).abs() >= SCORE_MARGIN => {
            if a > b {
                JudgmentVerdict::Win
            } else {
                JudgmentVerdict::Loss
            }
        }
        (JudgmentKind::Score, _, Some(_), Some(_)) => JudgmentVerdict::Similar,
        _ => {
            return Err(Mark::refused(
                id,
                NO_VERDICT,
                "a comparison without a verdict, or a scoring without both scores",
            ))
        }
    };
    let verdict = match verdict {
        JudgmentVerdict::Win => kalon_llm::Verdict::Win,
        JudgmentVerdict::Loss => kalon_llm::Verdict::Loss,
        JudgmentVerdict::Similar => kalon_llm::Verdict::Similar,
    };
    let aspect = event.aspect.as_str();
    let rows = judgment_pairs(&RowVerdict {
        judgment_id: &id,
        query: &event.query,
        row_a: &event.row_a,
        row_b: &event.row_b,
        verdict,
    })
    .into_iter()
    .filter(|pair| pair.validate().is_ok())
    .map(|mut pair| {
        let identity = serde_json::json!({"judgment_id": id});
        let row_id = store::pair_id(&pair, &identity);
        if let Some(object) = pair.provenance.as_object_mut() {
            object.insert("aspect".into(), aspect.into());
            object.insert("kind".into(), event.kind.as_str().into());
            object.insert("model".into(), event.model.clone().into());
        }
        PairRow {
            id: row_id,
            pair,
            model_version: None,
            variant: None,
        }
    })
    .collect();
    Ok((rows, Mark::paired(id)))
}
