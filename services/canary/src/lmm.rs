//! The LMM-judged canary: live queries sampled from the canary's
//! impressions, both versions' top-k rows from pinned searches (search's
//! `model_version` request field: no impression, no routing), and the
//! order-consistent judge (`kalon-llm`, both orders, a win only when both
//! agree) on aesthetic and relevance. Each verdict is stored once per
//! (canary, query, aspect), so a restart pays for nothing twice; the LLM
//! client's hourly token budget bounds the spend like every other call.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use kalon_events::{Aspect, EvidenceKind, MetricEvidence};
use kalon_llm::{ImageRef, Judge, Verdict};
use serde::Deserialize;
use sqlx::PgPool;

use crate::evidence::{evidence, Window};
use crate::stats::sequential::{decide_preference, PreferenceConfig, PreferenceCounts};

/// What the LMM canary needs besides the judge.
pub struct LmmCanary {
    pub judge: Judge,
    pub search_url: String,
    /// `<dataset>/images`, to show the judge the PNGs; without it, the
    /// image URLs search returns.
    pub images: Option<PathBuf>,
    pub k: u32,
    pub per_look: u32,
    pub max_queries: u32,
    client: reqwest::Client,
    metrics: crate::metrics::Metrics,
}

#[derive(Debug, Deserialize)]
struct SearchAnswer {
    results: Vec<Hit>,
}

#[derive(Debug, Deserialize)]
struct Hit {
    image_id: String,
    #[serde(default)]
    url: Option<String>,
}

impl LmmCanary {
    pub fn new(
        judge: Judge,
        search_url: String,
        images: Option<PathBuf>,
        k: u32,
        per_look: u32,
        max_queries: u32,
    ) -> Self {
        kalon_telemetry::install_crypto_provider();
        LmmCanary {
            judge,
            search_url: search_url.trim_end_matches('/').to_owned(),
            images,
            k,
            per_look,
            max_queries,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("an HTTP client"),
            metrics: crate::metrics::Metrics::new(),
        }
    }

    async fn row(&self, query: &str, version: &str) -> anyhow::Result<Vec<ImageRef>> {
        let body = serde_json::json!({ "query": query, "k": self.k, "model_version": version });
        let response = self
            .client
            .post(format!("{}/v1/search", self.search_url))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await?;
        let status = response.status();
        let bytes = response.bytes().await?;
        anyhow::ensure!(
            status.is_success(),
            "pinned search of {version} answered {status}: {}",
            String::from_utf8_lossy(&bytes)
        );
        let answer: SearchAnswer = serde_json::from_slice(&bytes)?;
        let mut row = Vec::with_capacity(answer.results.len());
        for hit in answer.results {
            let file = self
                .images
                .as_ref()
                .map(|dir| dir.join(format!("{}.png", hit.image_id)));
            match file {
                Some(file) if file.is_file() => {
                    row.push(ImageRef::Png(tokio::fs::read(&file).await?))
                }
                _ => {
                    let url = hit
                        .url
                        .unwrap_or_else(|| format!("/v1/images/{}", hit.image_id));
                    let url = if url.starts_with("http") {
                        url
                    } else {
                        format!("{}{url}", self.search_url)
                    };
                    row.push(ImageRef::Url(url));
                }
            }
        }
        Ok(row)
    }

    /// The judge's verdict on `query`, per aspect: the candidate's top-k row
    /// against the stable's (1 win, 0 similar, -1 loss), with the tokens
    /// it cost. Identical rows are similar without a call.
    pub async fn judge_query(
        &self,
        query: &str,
        stable: &str,
        candidate: &str,
    ) -> anyhow::Result<Vec<(Aspect, i8, u64)>> {
        let (candidate, stable) =
            futures::try_join!(self.row(query, candidate), self.row(query, stable))?;
        let mut out = Vec::with_capacity(2);
        for aspect in [Aspect::Aesthetic, Aspect::Relevance] {
            if candidate.len() == stable.len() && same_rows(&candidate, &stable) {
                self.metrics
                    .lmm_judged(aspect_name(aspect), Verdict::Similar.name(), 0);
                out.push((aspect, 0, 0));
                continue;
            }
            let comparison = self
                .judge
                .compare(query, aspect, &candidate, &stable)
                .await?;
            let tokens = comparison.calls.iter().map(|c| c.usage.total_tokens).sum();
            self.metrics
                .lmm_judged(aspect_name(aspect), comparison.verdict.name(), tokens);
            let preference = match comparison.verdict {
                Verdict::Win => 1,
                Verdict::Loss => -1,
                Verdict::Similar => 0,
            };
            out.push((aspect, preference, tokens));
        }
        Ok(out)
    }

    /// Judges up to `per_look` queries not judged yet for this canary.
    /// Returns how many were judged.
    pub async fn look(
        &self,
        pool: &PgPool,
        canary_id: i64,
        window: &Window,
    ) -> anyhow::Result<u32> {
        let (judged,): (i64,) = sqlx::query_as(
            "SELECT count(DISTINCT query) FROM canary_judgments WHERE canary_id = $1",
        )
        .bind(canary_id)
        .fetch_one(pool)
        .await?;
        let room = (self.max_queries as i64 - judged).clamp(0, self.per_look as i64);
        if room == 0 {
            return Ok(0);
        }
        // a fixed pseudo-random order per canary: a restart samples the same
        let queries: Vec<(String,)> = sqlx::query_as(
            "SELECT q.query FROM (
                 SELECT DISTINCT i.query FROM impressions i
                 WHERE i.occurred_at >= $2 AND i.occurred_at < $3 AND i.model_version = ANY($4)
             ) q
             WHERE NOT EXISTS (SELECT 1 FROM canary_judgments j
                               WHERE j.canary_id = $1 AND j.query = q.query)
             ORDER BY md5(q.query || $1::text) LIMIT $5",
        )
        .bind(canary_id)
        .bind(window.since)
        .bind(window.until)
        .bind([window.stable.as_str(), window.candidate.as_str()].as_slice())
        .bind(room)
        .fetch_all(pool)
        .await?;
        let mut done = 0;
        for (query,) in queries {
            for (aspect, preference, tokens) in self
                .judge_query(&query, &window.stable, &window.candidate)
                .await?
            {
                sqlx::query(
                    "INSERT INTO canary_judgments (canary_id, query, aspect, preference, tokens)
                     VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                )
                .bind(canary_id)
                .bind(&query)
                .bind(aspect_name(aspect))
                .bind(preference as i16)
                .bind(tokens as i64)
                .execute(pool)
                .await?;
            }
            done += 1;
        }
        Ok(done)
    }
}

fn same_rows(a: &[ImageRef], b: &[ImageRef]) -> bool {
    a.iter().zip(b).all(|pair| match pair {
        (ImageRef::Png(x), ImageRef::Png(y)) => x == y,
        (ImageRef::Url(x), ImageRef::Url(y)) => x == y,
        _ => false,
    })
}

fn aspect_name(aspect: Aspect) -> &'static str {
    match aspect {
        Aspect::Aesthetic => "aesthetic",
        Aspect::Relevance => "relevance",
    }
}

/// The stored verdicts per aspect.
pub async fn counts(
    pool: &PgPool,
    canary_id: i64,
) -> sqlx::Result<HashMap<String, PreferenceCounts>> {
    let rows: Vec<(String, i16)> =
        sqlx::query_as("SELECT aspect, preference FROM canary_judgments WHERE canary_id = $1")
            .bind(canary_id)
            .fetch_all(pool)
            .await?;
    let mut out: HashMap<String, PreferenceCounts> = HashMap::new();
    for (aspect, preference) in rows {
        out.entry(aspect).or_default().push(preference as i8);
    }
    Ok(out)
}

/// `lmm_aesthetic` and `lmm_relevance` verdicts.
pub fn lmm_evidence(
    counts: &HashMap<String, PreferenceCounts>,
    margin: f64,
    alpha: f64,
    min_decisive: u64,
) -> anyhow::Result<Vec<MetricEvidence>> {
    let config = PreferenceConfig {
        min_decisive,
        ..PreferenceConfig::default()
    };
    let mut out = Vec::new();
    for aspect in ["aesthetic", "relevance"] {
        let c = counts.get(aspect).copied().unwrap_or_default();
        let verdict = decide_preference(&c, margin, alpha, &config)?;
        out.push(evidence(
            &format!("lmm_{aspect}"),
            EvidenceKind::Lmm,
            &verdict,
        ));
    }
    Ok(out)
}
