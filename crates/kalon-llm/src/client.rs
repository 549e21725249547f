//! An OpenAI-compatible chat-completions client that is safe to point at a
//! paid endpoint: bounded concurrency, a token-bucket rate limit, retries
//! with exponential backoff and jitter (honouring `Retry-After`), a circuit
//! breaker and an hourly token budget. Usage and latency of every call are
//! recorded, in [`ClientStats`] and as OpenTelemetry metrics (`kalon.llm.*`,
//! by task).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::sync::Semaphore;

use crate::config::LlmConfig;
use crate::limits::{Budget, CircuitBreaker, TokenBucket};
use crate::metrics::Metrics;
use crate::protocol::{ChatRequest, ChatResponse, Message, Usage};

/// Why a call failed for good.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LlmError {
    #[error("LLM endpoint answered {status}: {body}")]
    Status { status: u16, body: String },
    #[error("LLM call timed out after {0:?}")]
    Timeout(Duration),
    #[error("cannot reach the LLM endpoint: {0}")]
    Transport(String),
    #[error("LLM endpoint sent an unreadable body ({reason}): {body}")]
    BadBody { reason: String, body: String },
    #[error("circuit breaker open after repeated failures; next probe in {0:?}")]
    CircuitOpen(Duration),
    #[error("hourly token budget spent: {used} of {limit} tokens")]
    Budget { used: u64, limit: u64 },
}

impl LlmError {
    /// Worth trying again later (the work should wait, not be dropped).
    pub fn is_transient(&self) -> bool {
        match self {
            LlmError::Status { status, .. } => *status == 429 || *status >= 500,
            LlmError::Timeout(_)
            | LlmError::Transport(_)
            | LlmError::BadBody { .. }
            | LlmError::CircuitOpen(_)
            | LlmError::Budget { .. } => true,
        }
    }

    /// Short class for metrics and stored records.
    pub fn kind(&self) -> &'static str {
        match self {
            LlmError::Status { status, .. } if *status == 429 => "rate_limited",
            LlmError::Status { status, .. } if *status >= 500 => "server_error",
            LlmError::Status { .. } => "rejected",
            LlmError::Timeout(_) => "timeout",
            LlmError::Transport(_) => "transport",
            LlmError::BadBody { .. } => "bad_body",
            LlmError::CircuitOpen(_) => "circuit_open",
            LlmError::Budget { .. } => "budget",
        }
    }
}

/// One successful call.
#[derive(Debug, Clone)]
pub struct Completion {
    /// The first choice's message content.
    pub text: String,
    /// The model the endpoint says answered.
    pub model: String,
    pub usage: Usage,
    /// From the first attempt to the answer, backoff included.
    pub latency: Duration,
    /// The successful attempt alone.
    pub attempt_latency: Duration,
    /// The endpoint's own processing time, when it reports one in
    /// `x-processing-ms` (the simulator does; OpenAI's `openai-processing-ms`
    /// is read too).
    pub server_ms: Option<f64>,
    pub attempts: u32,
    /// The response body as received.
    pub raw: String,
}

impl Completion {
    /// Cost at the configured price per 1,000 tokens.
    pub fn cost_usd(&self, usd_per_1k_tokens: f64) -> f64 {
        (self.usage.prompt_tokens + self.usage.completion_tokens) as f64 / 1000.0
            * usd_per_1k_tokens
    }
}

/// Running totals over the client's life.
#[derive(Debug, Default)]
pub struct ClientStats {
    pub calls: AtomicU64,
    pub attempts: AtomicU64,
    pub retries: AtomicU64,
    pub failures: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub completion_tokens: AtomicU64,
    pub latency_us: AtomicU64,
}

/// A snapshot of [`ClientStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct StatsSnapshot {
    pub calls: u64,
    pub attempts: u64,
    pub retries: u64,
    pub failures: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub latency_us: u64,
}

impl ClientStats {
    pub fn snapshot(&self) -> StatsSnapshot {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            calls: get(&self.calls),
            attempts: get(&self.attempts),
            retries: get(&self.retries),
            failures: get(&self.failures),
            prompt_tokens: get(&self.prompt_tokens),
            completion_tokens: get(&self.completion_tokens),
            latency_us: get(&self.latency_us),
        }
    }
}

/// Cheap to clone; clones share limits, breaker, budget and stats.
#[derive(Clone)]
pub struct LlmClient {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    http: reqwest::Client,
    config: LlmConfig,
    url: String,
    in_flight: Semaphore,
    bucket: TokenBucket,
    pub(crate) breaker: CircuitBreaker,
    pub(crate) budget: Budget,
    stats: ClientStats,
    metrics: Metrics,
}

/// What one attempt came to.
enum Attempt {
    Done(Completion),
    Retry(LlmError, Option<Duration>),
    Fatal(LlmError),
}

impl LlmClient {
    pub fn new(config: LlmConfig) -> anyhow::Result<Self> {
        config.validate()?;
        kalon_telemetry::install_crypto_provider();
        let http = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout.min(Duration::from_secs(10)))
            .pool_max_idle_per_host(config.concurrency)
            .build()?;
        let inner = Arc::new(Inner {
            http,
            url: config.completions_url(),
            in_flight: Semaphore::new(config.concurrency),
            bucket: TokenBucket::new(config.rate_per_s, config.burst),
            breaker: CircuitBreaker::new(config.breaker_failures, config.breaker_cooldown),
            budget: Budget::new(config.budget_tokens_per_hour),
            stats: ClientStats::default(),
            metrics: Metrics::new(),
            config,
        });
        Metrics::observe(Arc::downgrade(&inner));
        Ok(LlmClient { inner })
    }

    pub fn config(&self) -> &LlmConfig {
        &self.inner.config
    }

    pub fn stats(&self) -> StatsSnapshot {
        self.inner.stats.snapshot()
    }

    /// Tokens spent in the last hour.
    pub fn budget_used(&self) -> u64 {
        self.inner.budget.used()
    }

    pub fn breaker_open(&self) -> bool {
        self.inner.breaker.is_open()
    }

    /// Sends `messages` (temperature 0) and returns the first choice, after
    /// the retries the configuration allows. Its metrics count under the
    /// task `chat`; see [`LlmClient::chat_for`].
    pub async fn chat(&self, messages: Vec<Message>) -> Result<Completion, LlmError> {
        self.chat_for("chat", messages).await
    }

    /// As [`LlmClient::chat`], with the metrics' `task` attribute (what the
    /// call is for: `rephrase`, `compare`, `score`, `rank`).
    pub async fn chat_for(
        &self,
        task: &'static str,
        messages: Vec<Message>,
    ) -> Result<Completion, LlmError> {
        let request = ChatRequest {
            model: self.inner.config.model.clone(),
            messages,
            temperature: Some(0.0),
            max_tokens: None,
        };
        let body = serde_json::to_vec(&request).expect("a chat request always serialises");
        let inner = &self.inner;
        inner.stats.calls.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let failed = |error: LlmError| {
            inner.stats.failures.fetch_add(1, Ordering::Relaxed);
            inner
                .metrics
                .ended(task, error.kind(), started.elapsed().as_secs_f64());
            Err(error)
        };
        let mut attempt = 0u32;
        loop {
            if let Err((used, limit)) = inner.budget.check() {
                return failed(LlmError::Budget { used, limit });
            }
            if let Err(wait) = inner.breaker.allow() {
                return failed(LlmError::CircuitOpen(wait));
            }
            attempt += 1;
            let outcome = {
                let _permit = inner
                    .in_flight
                    .acquire()
                    .await
                    .expect("the semaphore is never closed");
                inner.bucket.take().await;
                inner.stats.attempts.fetch_add(1, Ordering::Relaxed);
                self.attempt(&body).await
            };
            let (error, retry_after) = match outcome {
                Attempt::Done(mut completion) => {
                    inner.breaker.record(true);
                    completion.latency = started.elapsed();
                    completion.attempts = attempt;
                    let usage = completion.usage;
                    inner
                        .budget
                        .spend(usage.prompt_tokens + usage.completion_tokens);
                    let stats = &inner.stats;
                    stats
                        .prompt_tokens
                        .fetch_add(usage.prompt_tokens, Ordering::Relaxed);
                    stats
                        .completion_tokens
                        .fetch_add(usage.completion_tokens, Ordering::Relaxed);
                    stats
                        .latency_us
                        .fetch_add(completion.latency.as_micros() as u64, Ordering::Relaxed);
                    inner
                        .metrics
                        .succeeded(task, &completion, inner.config.usd_per_1k_tokens);
                    tracing::debug!(
                        task,
                        model = %completion.model,
                        attempts = attempt,
                        latency_ms = completion.latency.as_millis() as u64,
                        prompt_tokens = usage.prompt_tokens,
                        completion_tokens = usage.completion_tokens,
                        "LLM call"
                    );
                    return Ok(completion);
                }
                Attempt::Fatal(error) => {
                    // the endpoint is up; the request itself was refused
                    inner.breaker.record(true);
                    return failed(error);
                }
                Attempt::Retry(error, retry_after) => {
                    inner.breaker.record(false);
                    (error, retry_after)
                }
            };
            if attempt > inner.config.max_retries {
                tracing::warn!(task, attempts = attempt, error = %error, "LLM call failed");
                return failed(error);
            }
            let wait = retry_after.unwrap_or_else(|| self.backoff(attempt));
            tracing::debug!(task, attempt, error = %error, wait_ms = wait.as_millis() as u64, "LLM call retried");
            inner.stats.retries.fetch_add(1, Ordering::Relaxed);
            inner.metrics.retried(task);
            tokio::time::sleep(wait).await;
        }
    }

    /// Full jitter: uniform in [0, min(max, base * 2^(attempt-1))].
    fn backoff(&self, attempt: u32) -> Duration {
        let config = &self.inner.config;
        let cap = config
            .backoff_base
            .saturating_mul(1u32 << (attempt - 1).min(16))
            .min(config.backoff_max);
        cap.mul_f64(rand::rng().random::<f64>())
    }

    async fn attempt(&self, body: &[u8]) -> Attempt {
        let inner = &self.inner;
        let mut request = inner
            .http
            .post(&inner.url)
            .header("content-type", "application/json")
            .body(body.to_vec());
        if let Some(key) = &inner.config.api_key {
            request = request.bearer_auth(key.expose());
        }
        let started = Instant::now();
        let response = match request.send().await {
            Ok(response) => response,
            Err(error) => {
                return Attempt::Retry(transport_error(error, inner.config.timeout), None)
            }
        };
        let status = response.status();
        let headers = response.headers().clone();
        let text = match response.text().await {
            Ok(text) => text,
            Err(error) => {
                return Attempt::Retry(transport_error(error, inner.config.timeout), None)
            }
        };
        let attempt_latency = started.elapsed();
        if !status.is_success() {
            let error = LlmError::Status {
                status: status.as_u16(),
                body: snippet(&text),
            };
            return if status.as_u16() == 429 || status.is_server_error() {
                let retry_after = headers
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<f64>().ok())
                    .filter(|s| s.is_finite() && *s >= 0.0)
                    .map(|s| Duration::from_secs_f64(s.min(300.0)));
                Attempt::Retry(error, retry_after)
            } else {
                Attempt::Fatal(error)
            };
        }
        let parsed: ChatResponse = match serde_json::from_str(&text) {
            Ok(parsed) => parsed,
            Err(error) => {
                return Attempt::Retry(
                    LlmError::BadBody {
                        reason: error.to_string(),
                        body: snippet(&text),
                    },
                    None,
                )
            }
        };
        let Some(content) = parsed
            .choices
            .first()
            .and_then(|c| c.message.content.clone())
        else {
            return Attempt::Retry(
                LlmError::BadBody {
                    reason: "no choice with content".into(),
                    body: snippet(&text),
                },
                None,
            );
        };
        let server_ms = ["x-processing-ms", "openai-processing-ms"]
            .iter()
            .find_map(|h| headers.get(*h))
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<f64>().ok());
        Attempt::Done(Completion {
            text: content,
            model: if parsed.model.is_empty() {
                inner.config.model.clone()
            } else {
                parsed.model
            },
            usage: parsed.usage.unwrap_or_default(),
            latency: attempt_latency,
            attempt_latency,
            server_ms,
            attempts: 1,
            raw: text,
        })
    }
}

fn transport_error(error: reqwest::Error, timeout: Duration) -> LlmError {
    if error.is_timeout() {
        LlmError::Timeout(timeout)
    } else if error.is_decode() || error.is_body() {
        LlmError::BadBody {
            reason: error.to_string(),
            body: String::new(),
        }
    } else {
        // the chain names the cause (refused, reset, DNS)
        let mut message = error.to_string();
        let mut source = std::error::Error::source(&error);
        while let Some(cause) = source {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            source = cause.source();
        }
        LlmError::Transport(message)
    }
}

/// The first 300 characters of a body, for error messages.
fn snippet(text: &str) -> String {
    let mut end = text.len().min(300);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}
