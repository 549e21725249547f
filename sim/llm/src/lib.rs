//! The simulated world's OpenAI-compatible endpoint (the `kalon-sim-llm`
//! program, also `kalonctl sim serve-llm`).
//!
//! It plays the LLM and the LMM from what the world knows: rephrasings come
//! from [`WorldRephraser`] with noise; comparisons and scores come from the
//! hidden oracle (relevance for accuracy, the people's aesthetic for
//! aesthetics) seen through perception noise and a position bias towards
//! the row shown first, so order consistency matters. Latency and faults
//! (429 with Retry-After, 500, timeouts, truncated or garbage bodies,
//! malformed answers) are injected at configured rates, or scripted one by
//! one through `POST /sim/faults` for tests. `GET /sim/stats` says what it
//! was asked.
//!
//! Images are recognised by URL (`.../<image id>` or `.../<image id>.png`)
//! or, for inline `data:` URLs, by their bytes when the world's image
//! folder is given.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use kalon_world::text::Split;
use kalon_world::{Catalog, ImageMeta, Oracle, Query, QuerySet};
use rand::rngs::StdRng;
use rand::Rng;
use serde::{Deserialize, Serialize};

use kalon_llm::prompts::{hpir_name, Aspect};
use kalon_llm::protocol::{ChatRequest, Content, ErrorBody, ErrorDetail, Part, Role};
use kalon_llm::rephrase::{PromptVariant, Rephraser};

pub mod cli;
mod rephraser;

pub use rephraser::WorldRephraser;

/// Faults injected at random, each with its probability per request.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaultRates {
    pub rate_limited: f64,
    pub server_error: f64,
    pub timeout: f64,
    pub truncated: f64,
    pub garbage: f64,
    pub malformed: f64,
}

/// One injected fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fault {
    /// 429 with `Retry-After`.
    RateLimited,
    /// 500.
    ServerError,
    /// No answer until the client gives up.
    Timeout,
    /// 200 with the body cut in half.
    Truncated,
    /// 200 with an HTML page instead of JSON.
    Garbage,
    /// A well-formed response whose content is a refusal.
    Malformed,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::RateLimited => "rate_limited",
            Fault::ServerError => "server_error",
            Fault::Timeout => "timeout",
            Fault::Truncated => "truncated",
            Fault::Garbage => "garbage",
            Fault::Malformed => "malformed",
        }
    }
}

/// What the endpoint knows and how it misbehaves.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// The world: its seed and catalog size (as `sim generate` made it).
    pub seed: u64,
    pub images: usize,
    /// The world's image folder, to recognise images sent inline.
    pub world_dir: Option<PathBuf>,
    pub model: String,
    /// Required bearer token, if any.
    pub api_key: Option<kalon_service::Secret<String>>,
    /// Added to every answer.
    pub latency: Duration,
    /// Log-odds added to picking the row shown first.
    pub position_bias: f64,
    /// Standard deviation of the judge's perception of a row's mean value.
    pub perception_noise: f64,
    /// Value difference that moves the pick by one unit of log-odds.
    pub sharpness: f64,
    /// Chance that a rephrasing picks up a filler word.
    pub rephrase_noise: f64,
    /// Chance that an answer comes wrapped in prose or code fences.
    pub chatty: f64,
    pub faults: FaultRates,
    /// Seconds sent in `Retry-After` with a 429.
    pub retry_after_s: f64,
}

impl SimConfig {
    pub fn new(seed: u64, images: usize) -> Self {
        SimConfig {
            seed,
            images,
            world_dir: None,
            model: "kalon-sim-1".into(),
            api_key: None,
            latency: Duration::ZERO,
            position_bias: 1.0,
            perception_noise: 0.02,
            sharpness: 0.02,
            rephrase_noise: 0.1,
            chatty: 0.2,
            faults: FaultRates::default(),
            retry_after_s: 1.0,
        }
    }
}

/// What the endpoint was asked.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SimStats {
    pub requests: u64,
    pub rephrase: u64,
    pub compare: u64,
    pub score: u64,
    pub rank: u64,
    pub other: u64,
    pub rejected: u64,
    pub faults: BTreeMap<String, u64>,
    /// Rephrase requests per (query, variant) as "query|variant".
    pub rephrased: BTreeMap<String, u64>,
    /// Milliseconds since start at which each request arrived.
    pub arrivals_ms: Vec<f64>,
}

/// Body of `POST /sim/faults`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaultControl {
    /// Faults for the next requests, one each, before the rates apply.
    pub script: Vec<Fault>,
    /// New random rates (unchanged when absent).
    pub rates: Option<FaultRates>,
}

struct World {
    images: HashMap<String, ImageMeta>,
    queries: HashMap<String, Query>,
    by_bytes: HashMap<u64, String>,
}

struct Shared {
    config: SimConfig,
    world: World,
    oracle: Oracle,
    rephraser: WorldRephraser,
    started: Instant,
    rng: Mutex<StdRng>,
    rates: Mutex<FaultRates>,
    script: Mutex<VecDeque<Fault>>,
    stats: Mutex<SimStats>,
    next_id: std::sync::atomic::AtomicU64,
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

impl World {
    fn build(config: &SimConfig) -> anyhow::Result<World> {
        let catalog = Catalog::generate(config.seed, config.images);
        let queries = QuerySet::generate(config.seed, 160).queries;
        let mut by_bytes = HashMap::new();
        if let Some(dir) = &config.world_dir {
            for meta in &catalog.images {
                let path = dir.join("images").join(format!("{}.png", meta.id));
                match std::fs::read(&path) {
                    Ok(bytes) => {
                        by_bytes.insert(fnv(&bytes), meta.id.clone());
                    }
                    Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                    Err(error) => anyhow::bail!("cannot read {}: {error}", path.display()),
                }
            }
            anyhow::ensure!(
                !by_bytes.is_empty(),
                "no images of world seed {} in {}/images: generate the world with `kalonctl sim generate --seed {} --images {}`",
                config.seed,
                dir.display(),
                config.seed,
                config.images
            );
        }
        Ok(World {
            images: catalog
                .images
                .into_iter()
                .map(|m| (m.id.clone(), m))
                .collect(),
            queries: queries.into_iter().map(|q| (q.text.clone(), q)).collect(),
            by_bytes,
        })
    }

    fn image(&self, url: &str) -> Option<&ImageMeta> {
        if let Some(data) = url.strip_prefix("data:") {
            let (_, encoded) = data.split_once(";base64,")?;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .ok()?;
            return self
                .by_bytes
                .get(&fnv(&bytes))
                .and_then(|id| self.images.get(id));
        }
        let path = url.split(['?', '#']).next()?;
        let last = path.rsplit('/').next()?;
        let id = last.strip_suffix(".png").unwrap_or(last);
        self.images.get(id)
    }
}

/// A running endpoint.
pub struct SimServer {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl SimServer {
    /// Starts serving on `listener`.
    pub async fn start(
        config: SimConfig,
        listener: tokio::net::TcpListener,
    ) -> anyhow::Result<SimServer> {
        let world = tokio::task::spawn_blocking({
            let config = config.clone();
            move || World::build(&config)
        })
        .await??;
        let shared = Arc::new(Shared {
            rng: Mutex::new(kalon_world::stream(config.seed, "sim-llm")),
            rates: Mutex::new(config.faults.clone()),
            rephraser: WorldRephraser { seed: config.seed },
            config,
            world,
            oracle: Oracle::default(),
            started: Instant::now(),
            script: Mutex::new(VecDeque::new()),
            stats: Mutex::new(SimStats::default()),
            next_id: Default::default(),
        });
        let addr = listener.local_addr()?;
        let app = router(shared.clone());
        let task = tokio::spawn(async move {
            if let Err(error) = axum::serve(listener, app).await {
                tracing::error!(%error, "simulated LLM endpoint stopped");
            }
        });
        Ok(SimServer { addr, shared, task })
    }

    /// `http://ADDR/v1`, the base URL clients are given.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn stats(&self) -> SimStats {
        lock(&self.shared.stats).clone()
    }

    pub fn control(&self, control: FaultControl) {
        apply(&self.shared, control);
    }

    /// Stops at once: open connections are dropped, as a crash would.
    pub async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
    }

    /// Serves until the task ends (the CLI).
    pub async fn wait(self) -> anyhow::Result<()> {
        Ok(self.task.await?)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

fn apply(shared: &Shared, control: FaultControl) {
    lock(&shared.script).extend(control.script);
    if let Some(rates) = control.rates {
        *lock(&shared.rates) = rates;
    }
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/sim/stats", get(stats))
        .route("/sim/faults", post(faults))
        .with_state(shared)
}

async fn models(State(shared): State<Arc<Shared>>) -> Json<serde_json::Value> {
    Json(
        serde_json::json!({"object": "list", "data": [{"id": shared.config.model, "object": "model"}]}),
    )
}

async fn stats(State(shared): State<Arc<Shared>>) -> Json<SimStats> {
    Json(lock(&shared.stats).clone())
}

async fn faults(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    match serde_json::from_slice::<FaultControl>(&body) {
        Ok(control) => {
            apply(&shared, control);
            StatusCode::NO_CONTENT.into_response()
        }
        Err(error) => error_response(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            &error.to_string(),
        ),
    }
}

fn error_response(status: StatusCode, kind: &str, message: &str) -> Response {
    let body = ErrorBody {
        error: ErrorDetail {
            message: message.to_owned(),
            kind: kind.to_owned(),
        },
    };
    (status, Json(body)).into_response()
}

/// The task a prompt asks for, read the way a model reads it.
enum Task {
    Rephrase {
        query: String,
        variant: PromptVariant,
    },
    Rows {
        score: bool,
        query: String,
        aspect: String,
        rows: [Vec<String>; 2],
    },
    Rank {
        query: String,
        aspect: String,
        images: Vec<String>,
    },
    Other,
}

fn field<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|line| line.strip_prefix(name))
        .map(str::trim)
}

fn read_task(request: &ChatRequest) -> Task {
    let Some(user) = request.messages.iter().rev().find(|m| m.role == Role::User) else {
        return Task::Other;
    };
    let parts: Vec<Part> = match &user.content {
        Content::Text(text) => vec![Part::text(text.clone())],
        Content::Parts(parts) => parts.clone(),
    };
    let text: String = parts
        .iter()
        .filter_map(|p| match p {
            Part::Text { text } => Some(text.as_str()),
            Part::ImageUrl { .. } => None,
        })
        .collect::<Vec<_>>()
        .join("\n");
    let query = field(&text, "Query:").unwrap_or_default().to_owned();
    match field(&text, "Task:") {
        Some("rephrase") => {
            let variant = field(&text, "Variant:")
                .and_then(|name| PromptVariant::ALL.into_iter().find(|v| v.name() == name))
                .unwrap_or(PromptVariant::Detail);
            Task::Rephrase { query, variant }
        }
        Some("rank") => Task::Rank {
            aspect: field(&text, "Aspect:").unwrap_or("aesthetic").to_owned(),
            query,
            images: parts
                .iter()
                .filter_map(|p| match p {
                    Part::ImageUrl { image_url } => Some(image_url.url.clone()),
                    Part::Text { .. } => None,
                })
                .collect(),
        },
        Some(task @ ("compare" | "score")) => {
            let mut rows: [Vec<String>; 2] = Default::default();
            let mut current = None;
            for part in &parts {
                match part {
                    Part::Text { text } => {
                        if text.contains("Row 2:") {
                            current = Some(1);
                        } else if text.contains("Row 1:") {
                            current = Some(0);
                        }
                    }
                    Part::ImageUrl { image_url } => {
                        if let Some(row) = current {
                            rows[row].push(image_url.url.clone());
                        }
                    }
                }
            }
            Task::Rows {
                score: task == "score",
                query,
                aspect: field(&text, "Aspect:").unwrap_or("aesthetic").to_owned(),
                rows,
            }
        }
        _ => Task::Other,
    }
}

impl Shared {
    fn next_fault(&self) -> Option<Fault> {
        if let Some(fault) = lock(&self.script).pop_front() {
            return Some(fault);
        }
        let rates = lock(&self.rates).clone();
        let mut rng = lock(&self.rng);
        [
            (rates.rate_limited, Fault::RateLimited),
            (rates.server_error, Fault::ServerError),
            (rates.timeout, Fault::Timeout),
            (rates.truncated, Fault::Truncated),
            (rates.garbage, Fault::Garbage),
            (rates.malformed, Fault::Malformed),
        ]
        .into_iter()
        .find(|(p, _)| *p > 0.0 && rng.random_bool(p.min(1.0)))
        .map(|(_, f)| f)
    }

    /// The mean true value of a row on an aspect, as people see it.
    /// `aspect` is as the prompt names it: HPIR's `accuracy` for relevance.
    fn row_value(&self, query: &str, aspect: &str, urls: &[String]) -> f64 {
        let relevance = aspect == hpir_name(Aspect::Relevance);
        let known = self.world.queries.get(query);
        let values: Vec<f64> = urls
            .iter()
            .map(|url| match (self.world.image(url), known) {
                (Some(meta), Some(query)) if relevance => query.relevance(meta),
                (Some(meta), Some(query)) => self.oracle.aesthetic(query, meta),
                (Some(meta), None) if !relevance => {
                    // a query the world does not know: taste without intent
                    let neutral = Query {
                        text: query.to_owned(),
                        subject: meta.subject,
                        colour: None,
                        scene: None,
                        style_intent: None,
                        split: Split::Train,
                    };
                    self.oracle.aesthetic(&neutral, meta)
                }
                _ => 0.5,
            })
            .collect();
        if values.is_empty() {
            0.5
        } else {
            values.iter().sum::<f64>() / values.len() as f64
        }
    }

    /// The answer to `task`. Its noise is drawn from the request's own
    /// bytes, so the same request always gets the same answer (a model at
    /// temperature 0) and runs are reproducible whatever the concurrency;
    /// the same rows in the other order are another request.
    fn answer(&self, task: &Task, request: &[u8]) -> String {
        let config = &self.config;
        let mut rng = <StdRng as rand::SeedableRng>::seed_from_u64(fnv(request) ^ config.seed);
        let content = match task {
            Task::Rephrase { query, variant } => {
                let mut text = self
                    .rephraser
                    .rephrase(query, *variant)
                    .unwrap_or_else(|_| query.clone());
                if *variant != PromptVariant::Original && rng.random_bool(config.rephrase_noise) {
                    let filler = ["picture", "high quality", "image"][rng.random_range(0..3)];
                    text = format!("{text}, {filler}");
                }
                serde_json::json!({ "rephrasing": text }).to_string()
            }
            Task::Rows {
                score,
                query,
                aspect,
                rows,
            } => {
                let perceived: Vec<f64> = rows
                    .iter()
                    .map(|row| {
                        self.row_value(query, aspect, row)
                            + config.perception_noise * kalon_world::normal(&mut rng)
                    })
                    .collect();
                if *score {
                    let score =
                        |v: f64, bonus: f64| (1.0 + 4.0 * v + bonus).round().clamp(1.0, 5.0);
                    serde_json::json!({
                        "row1": score(perceived[0], 0.25 * config.position_bias),
                        "row2": score(perceived[1], 0.0),
                    })
                    .to_string()
                } else {
                    let logit =
                        (perceived[0] - perceived[1]) / config.sharpness + config.position_bias;
                    let first = rng.random_bool(1.0 / (1.0 + (-logit).exp()));
                    serde_json::json!({ "better": if first { 1 } else { 2 } }).to_string()
                }
            }
            Task::Rank {
                query,
                aspect,
                images,
            } => {
                // perceived value, plus a bias towards images shown early
                let n = images.len().max(2) as f64;
                let mut perceived: Vec<(f64, usize)> = images
                    .iter()
                    .enumerate()
                    .map(|(i, url)| {
                        let early = (n - 1.0 - i as f64) / (n - 1.0);
                        let value = self.row_value(query, aspect, std::slice::from_ref(url))
                            + config.perception_noise * kalon_world::normal(&mut rng)
                            + config.position_bias * config.sharpness * early;
                        (value, i + 1)
                    })
                    .collect();
                perceived.sort_by(|a, b| b.0.total_cmp(&a.0));
                let order: Vec<usize> = perceived.into_iter().map(|(_, i)| i).collect();
                serde_json::json!({ "order": order }).to_string()
            }
            Task::Other => {
                "I am Kalon's simulated model; I rephrase queries and judge result rows.".to_owned()
            }
        };
        if rng.random_bool(config.chatty) {
            if rng.random_bool(0.5) {
                format!("```json\n{content}\n```")
            } else {
                format!("Sure! Here is my answer:\n{content}")
            }
        } else {
            content
        }
    }
}

fn words(text: &str) -> u64 {
    text.split_whitespace().count() as u64
}

async fn completions(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let started = Instant::now();
    lock(&shared.stats).requests += 1;
    lock(&shared.stats)
        .arrivals_ms
        .push(shared.started.elapsed().as_secs_f64() * 1e3);
    if let Some(key) = &shared.config.api_key {
        let given = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(key.expose().as_str()) {
            lock(&shared.stats).rejected += 1;
            return error_response(
                StatusCode::UNAUTHORIZED,
                "invalid_api_key",
                "missing or wrong API key",
            );
        }
    }
    let request: ChatRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(error) => {
            lock(&shared.stats).rejected += 1;
            return error_response(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                &format!("not a chat completion request: {error}"),
            );
        }
    };
    let task = read_task(&request);
    {
        let mut stats = lock(&shared.stats);
        match &task {
            Task::Rephrase { query, variant } => {
                stats.rephrase += 1;
                *stats
                    .rephrased
                    .entry(format!("{query}|{}", variant.name()))
                    .or_default() += 1;
            }
            Task::Rows { score: true, .. } => stats.score += 1,
            Task::Rows { score: false, .. } => stats.compare += 1,
            Task::Rank { .. } => stats.rank += 1,
            Task::Other => stats.other += 1,
        }
    }
    if !shared.config.latency.is_zero() {
        tokio::time::sleep(shared.config.latency).await;
    }
    let fault = shared.next_fault();
    if let Some(fault) = fault {
        *lock(&shared.stats)
            .faults
            .entry(fault.name().to_owned())
            .or_default() += 1;
    }
    let content = match fault {
        Some(Fault::RateLimited) => {
            let mut response = error_response(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_exceeded",
                "slow down",
            );
            if let Ok(value) = format!("{}", shared.config.retry_after_s).parse() {
                response.headers_mut().insert("retry-after", value);
            }
            return response;
        }
        Some(Fault::ServerError) => {
            return error_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "the model crashed",
            )
        }
        Some(Fault::Timeout) => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            return StatusCode::GATEWAY_TIMEOUT.into_response();
        }
        Some(Fault::Garbage) => {
            return (
                StatusCode::OK,
                "<html><body>502 upstream hiccup</body></html>",
            )
                .into_response()
        }
        Some(Fault::Malformed) => "I'm sorry, I can't help with that.".to_owned(),
        Some(Fault::Truncated) | None => shared.answer(&task, &body),
    };
    let prompt_tokens: u64 = request
        .messages
        .iter()
        .map(|m| match &m.content {
            Content::Text(text) => words(text),
            Content::Parts(parts) => parts
                .iter()
                .map(|p| match p {
                    Part::Text { text } => words(text),
                    Part::ImageUrl { .. } => 85,
                })
                .sum(),
        })
        .sum();
    let completion_tokens = words(&content);
    let id = shared
        .next_id
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let body = serde_json::json!({
        "id": format!("chatcmpl-sim-{id}"),
        "object": "chat.completion",
        "model": shared.config.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens},
    })
    .to_string();
    let body = if fault == Some(Fault::Truncated) {
        body[..body.len() / 2].to_owned()
    } else {
        body
    };
    let mut response =
        (StatusCode::OK, [("content-type", "application/json")], body).into_response();
    if let Ok(value) = format!("{:.3}", started.elapsed().as_secs_f64() * 1e3).parse() {
        response.headers_mut().insert("x-processing-ms", value);
    }
    response
}
