//! The LMM judge as a library call that keeps a record: every comparison
//! and score is stored in `lmm_judgments` (with the raw responses, model,
//! tokens, cost and latency) and published on `lmm.judgment.v1`. The canary
//! analysis reuses it.

use kalon_events::{JudgmentKind, JudgmentOutcome, JudgmentVerdict, LmmJudgment, TopicPayload};
use kalon_kafka::KafkaSettings;
use kalon_kafka::Publisher;
use kalon_llm::judge::{Judge, Row};
use kalon_llm::{Aspect, Completion, ImageRef};
use rdkafka::message::OwnedHeaders;
use sqlx::PgPool;
use uuid::Uuid;

/// One row of results as judged: image ids and what the judge was shown.
#[derive(Debug, Clone)]
pub struct JudgedRow {
    pub ids: Vec<String>,
    pub images: Vec<ImageRef>,
}

/// What was stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Recorded {
    pub judgment_id: Uuid,
    pub verdict: Option<kalon_llm::Verdict>,
    pub scores: Option<(f64, f64)>,
}

pub struct JudgmentRecorder {
    judge: Judge,
    pool: PgPool,
    kafka: KafkaSettings,
    producer: Publisher,
    metrics: crate::metrics::Metrics,
}

fn row_name(row: Row) -> &'static str {
    match row {
        Row::A => "A",
        Row::B => "B",
    }
}

fn verdict(verdict: kalon_llm::Verdict) -> JudgmentVerdict {
    match verdict {
        kalon_llm::Verdict::Win => JudgmentVerdict::Win,
        kalon_llm::Verdict::Loss => JudgmentVerdict::Loss,
        kalon_llm::Verdict::Similar => JudgmentVerdict::Similar,
    }
}

impl JudgmentRecorder {
    pub fn new(judge: Judge, pool: PgPool, kafka: KafkaSettings) -> anyhow::Result<Self> {
        let producer = crate::publisher(&kafka, "kalon-judge")?;
        Ok(JudgmentRecorder {
            judge,
            pool,
            kafka,
            producer,
            metrics: crate::metrics::Metrics::new(),
        })
    }

    /// Order-consistent comparison of row A against row B.
    pub async fn compare(
        &self,
        query: &str,
        aspect: Aspect,
        a: &JudgedRow,
        b: &JudgedRow,
    ) -> anyhow::Result<Recorded> {
        let comparison = self
            .judge
            .compare(query, aspect, &a.images, &b.images)
            .await?;
        let recorded = Recorded {
            judgment_id: Uuid::now_v7(),
            verdict: Some(comparison.verdict),
            scores: None,
        };
        self.record(
            query,
            aspect,
            a,
            b,
            &recorded,
            Some((comparison.a_first, comparison.b_first)),
            &comparison.calls,
        )
        .await?;
        Ok(recorded)
    }

    /// 1-5 scores of both rows, averaged over both orders.
    pub async fn score(
        &self,
        query: &str,
        aspect: Aspect,
        a: &JudgedRow,
        b: &JudgedRow,
    ) -> anyhow::Result<Recorded> {
        let scores = self
            .judge
            .score(query, aspect, &a.images, &b.images)
            .await?;
        let recorded = Recorded {
            judgment_id: Uuid::now_v7(),
            verdict: None,
            scores: Some((scores.a, scores.b)),
        };
        self.record(query, aspect, a, b, &recorded, None, &scores.calls)
            .await?;
        Ok(recorded)
    }

    #[allow(clippy::too_many_arguments)]
    async fn record(
        &self,
        query: &str,
        aspect: Aspect,
        a: &JudgedRow,
        b: &JudgedRow,
        recorded: &Recorded,
        picks: Option<(Row, Row)>,
        calls: &[Completion],
    ) -> anyhow::Result<()> {
        let price = self.judge.client().config().usd_per_1k_tokens;
        let prompt_tokens: u64 = calls.iter().map(|c| c.usage.prompt_tokens).sum();
        let completion_tokens: u64 = calls.iter().map(|c| c.usage.completion_tokens).sum();
        let cost: f64 = calls.iter().map(|c| c.cost_usd(price)).sum();
        let latency_ms = calls
            .iter()
            .map(|c| c.latency.as_secs_f64() * 1e3)
            .fold(0.0, f64::max);
        let model = calls.last().map(|c| c.model.clone()).unwrap_or_default();
        let raw: Vec<&str> = calls.iter().map(|c| c.raw.as_str()).collect();
        let outcome = match (recorded.verdict, recorded.scores) {
            (Some(v), _) => JudgmentOutcome::Compared(verdict(v)),
            (None, Some((a, b))) => JudgmentOutcome::Scored(a, b),
            (None, None) => anyhow::bail!("a judgment with neither a verdict nor scores"),
        };
        let kind = if recorded.verdict.is_some() {
            JudgmentKind::Compare
        } else {
            JudgmentKind::Score
        };
        sqlx::query(
            "INSERT INTO lmm_judgments (judgment_id, query, aspect, kind, row_a, row_b, verdict, a_first, b_first,
                 score_a, score_b, model, prompt_tokens, completion_tokens, cost_usd, latency_ms, raw_responses)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)",
        )
        .bind(recorded.judgment_id)
        .bind(query)
        .bind(aspect.as_str())
        .bind(kind.as_str())
        .bind(serde_json::json!(a.ids))
        .bind(serde_json::json!(b.ids))
        .bind(recorded.verdict.map(|v| v.name()))
        .bind(picks.map(|p| row_name(p.0)))
        .bind(picks.map(|p| row_name(p.1)))
        .bind(recorded.scores.map(|s| s.0))
        .bind(recorded.scores.map(|s| s.1))
        .bind(&model)
        .bind(prompt_tokens as i64)
        .bind(completion_tokens as i64)
        .bind(cost)
        .bind(latency_ms)
        .bind(serde_json::json!(raw))
        .execute(&self.pool)
        .await?;
        let event = LmmJudgment::now(
            recorded.judgment_id,
            query,
            aspect,
            (&a.ids, &b.ids),
            outcome,
            model,
        );
        self.producer
            .publish(
                &self.kafka.topic(LmmJudgment::TOPIC),
                query.as_bytes(),
                &event.to_json(),
                OwnedHeaders::new(),
            )
            .await?;
        self.metrics.judgment(kind.as_str(), aspect.as_str());
        Ok(())
    }
}
