//! The HTTP API: search, image files, feedback, serving figures, OpenAPI,
//! health.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::Utc;
use kalon_events::explore::{self, Exploration};
use kalon_events::interleave::{self, Team};
use kalon_events::{Aspect, Click, Event, Impression, Rating, ResultItem};
use opentelemetry::propagation::Extractor;
use opentelemetry::trace::TraceContextExt;
use rand::rngs::StdRng;
use rand::SeedableRng;
use rdkafka::message::OwnedHeaders;
use serde::{Deserialize, Serialize};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use uuid::Uuid;

use crate::events::{Events, FeedbackError};
use crate::routing::{Live, Routing, Served, Variant};
use crate::stats::{Outcome, Serving, ServingStats};

/// Request limits (see `SearchConfig` for the flags).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_query_chars: usize,
    pub max_k: u32,
    pub max_body_bytes: usize,
    /// Session, user, request and image ids.
    pub max_id_chars: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_query_chars: 512,
            max_k: 100,
            max_body_bytes: 16 * 1024,
            max_id_chars: 128,
        }
    }
}

/// Request metrics (OTLP; a no-op meter until telemetry exports).
#[derive(Clone)]
pub struct Metrics {
    /// Seconds per answered search, by variant and model version.
    pub duration: opentelemetry::metrics::Histogram<f64>,
    /// Search requests by outcome (HTTP status class).
    pub requests: opentelemetry::metrics::Counter<u64>,
}

impl Default for Metrics {
    fn default() -> Self {
        let meter = kalon_telemetry::meter();
        Metrics {
            duration: meter
                .f64_histogram("kalon.search.request.duration")
                .with_unit("s")
                .with_boundaries(kalon_telemetry::REQUEST_SECONDS.to_vec())
                .with_description("time to answer a search, embed + ANN + queueing the impression")
                .build(),
            requests: meter
                .u64_counter("kalon.search.requests")
                .with_description("search requests by status")
                .build(),
        }
    }
}

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    pub metrics: Metrics,
    pub live: Arc<Live>,
    pub events: Events,
    /// Folder of `<image id>.png` files, if this instance serves images.
    pub images: Option<PathBuf>,
    /// Prefix of image URLs in answers (e.g. `https://search.example.com`);
    /// empty gives paths relative to this service.
    pub public_url: String,
    pub limits: Limits,
    /// The randomised adjacent swap for a share of requests
    /// (`--explore-rate`, `--explore-depth`).
    pub explore: Exploration,
    /// Per-version serving figures (`/v1/stats`), shared with `events`,
    /// which counts the impressions it drops there.
    pub serving: Arc<Serving>,
}

pub fn router(state: AppState) -> Router {
    let body_limit = state.limits.max_body_bytes;
    Router::new()
        .route("/v1/search", post(search))
        .route("/v1/images/{id}", get(image))
        .route("/v1/feedback/click", post(click))
        .route("/v1/feedback/rating", post(rating))
        .route("/v1/stats", get(stats))
        .route("/openapi.json", get(openapi))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state)
}

/// An error answer: a status and `{"error": message}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }

    fn bad(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(status = %self.status, message = %self.message, "request failed");
        }
        (
            self.status,
            Json(serde_json::json!({ "error": self.message })),
        )
            .into_response()
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        ApiError::new(rejection.status(), rejection.body_text())
    }
}

impl From<FeedbackError> for ApiError {
    fn from(error: FeedbackError) -> Self {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, error.to_string())
    }
}

fn check_id(what: &str, value: &str, limits: &Limits) -> Result<(), ApiError> {
    if value.is_empty() || value.chars().count() > limits.max_id_chars {
        return Err(ApiError::bad(format!(
            "{what} must be 1 to {} characters",
            limits.max_id_chars
        )));
    }
    if value.chars().any(char::is_control) {
        return Err(ApiError::bad(format!(
            "{what} must not contain control characters"
        )));
    }
    Ok(())
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchRequest {
    pub query: String,
    #[serde(default = "default_k")]
    pub k: u32,
    #[serde(default)]
    pub session_id: Option<String>,
    #[serde(default)]
    pub user_id: Option<String>,
    /// Serve from this loaded model version, whatever its weight, instead
    /// of the routed one: an evaluation (the canary's judge, the console's
    /// comparison), so no impression is published and the page is neither
    /// interleaved nor explored.
    #[serde(default)]
    pub model_version: Option<String>,
}

fn default_k() -> u32 {
    10
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SearchHit {
    pub image_id: String,
    pub rank: u32,
    /// The score of the version that ranked it (on an interleaved page, the
    /// version whose team drafted it).
    pub score: f32,
    pub url: String,
    /// On an interleaved page only: the ranking that drafted this hit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub team: Option<Team>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SearchResponse {
    pub request_id: String,
    pub model_version: String,
    pub variant: String,
    pub results: Vec<SearchHit>,
}

struct HttpHeaders<'a>(&'a HeaderMap);

impl Extractor for HttpHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// The caller's trace context (`traceparent`), if it sent one.
fn caller_context(headers: &HeaderMap) -> opentelemetry::Context {
    opentelemetry::global::get_text_map_propagator(|p| p.extract(&HttpHeaders(headers)))
}

async fn search(
    State(app): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<SearchRequest>, JsonRejection>,
) -> Result<Json<SearchResponse>, ApiError> {
    let Json(request) = body?;
    let caller = caller_context(&headers);
    let span = tracing::info_span!(
        "search",
        k = request.k,
        model_version = tracing::field::Empty,
        variant = tracing::field::Empty,
        explore_swap = tracing::field::Empty,
        interleaved = tracing::field::Empty,
        pinned = request.model_version.is_some()
    );
    let _ = span.set_parent(caller.clone());
    // the context the impression carries: this request's span when traces
    // are recorded, else the caller's, so a trace still crosses into ingest
    let context = {
        let own = span.context();
        if own.span().span_context().is_valid() {
            own
        } else {
            caller
        }
    };
    let started = Instant::now();
    let metrics = app.metrics.clone();
    let answer = run_search(app, request, context, started)
        .instrument(span)
        .await;
    let status = match &answer {
        Ok(Json(answer)) => {
            let attributes = [
                opentelemetry::KeyValue::new("variant", answer.variant.clone()),
                opentelemetry::KeyValue::new("model_version", answer.model_version.clone()),
            ];
            metrics
                .duration
                .record(started.elapsed().as_secs_f64(), &attributes);
            StatusCode::OK
        }
        Err(error) => error.status,
    };
    metrics.requests.add(
        1,
        &[opentelemetry::KeyValue::new(
            "status",
            i64::from(status.as_u16()),
        )],
    );
    answer
}

async fn run_search(
    app: AppState,
    request: SearchRequest,
    context: opentelemetry::Context,
    started: Instant,
) -> Result<Json<SearchResponse>, ApiError> {
    let limits = &app.limits;
    let query = request.query.trim().to_owned();
    if query.is_empty() {
        return Err(ApiError::bad("query must not be empty"));
    }
    let chars = query.chars().count();
    if chars > limits.max_query_chars {
        return Err(ApiError::bad(format!(
            "query is {chars} characters, more than the {} allowed",
            limits.max_query_chars
        )));
    }
    if query.chars().any(char::is_control) {
        return Err(ApiError::bad("query must not contain control characters"));
    }
    if request.k == 0 || request.k > limits.max_k {
        return Err(ApiError::bad(format!(
            "k must be between 1 and {}",
            limits.max_k
        )));
    }
    if let Some(session) = &request.session_id {
        check_id("session_id", session, limits)?;
    }
    if let Some(user) = &request.user_id {
        check_id("user_id", user, limits)?;
    }
    if let Some(version) = &request.model_version {
        check_id("model_version", version, limits)?;
    }
    let request_id = Uuid::now_v7().to_string();
    let routing = app.live.current();
    let variant = match request.model_version.as_deref() {
        Some(version) => routing
            .variant_of(version)
            .ok_or_else(|| not_served(version, &routing))?,
        None => {
            let key = request
                .session_id
                .as_deref()
                .or(request.user_id.as_deref())
                .unwrap_or(&request_id);
            routing.assign(key).ok_or_else(|| {
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no model version is deployed: index one and `kalonctl deploy` it",
                )
            })?
        }
    };
    let pinned = request.model_version.is_some();
    // a pinned search is an evaluation: never interleaved
    let stable = if pinned {
        None
    } else {
        routing.interleave_with(variant, &request_id)
    };
    let span = tracing::Span::current();
    span.record("model_version", variant.served.version.as_str());
    span.record("variant", variant.name.as_str());
    span.record("interleaved", stable.is_some());

    let routed = Routed {
        variant,
        stable,
        pinned,
        request_id,
        query,
    };
    let answer = answer(&app, &request, routed, context).await;
    let outcome = match &answer {
        Ok(_) => Outcome::Ok {
            interleaved: stable.is_some(),
        },
        Err(error) if error.status.is_server_error() => Outcome::Failed,
        Err(_) => Outcome::Refused,
    };
    app.serving
        .record(&variant.served.version, outcome, started.elapsed());
    answer
}

/// The 404 of a pinned search for a version this replica has not loaded.
fn not_served(version: &str, routing: &Routing) -> ApiError {
    let served: Vec<&str> = routing
        .variants
        .iter()
        .map(|v| v.served.version.as_str())
        .collect();
    let served = if served.is_empty() {
        "none".to_owned()
    } else {
        served.join(", ")
    };
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("model version {version} is not served here (served: {served})"),
    )
}

/// A validated search and where it goes.
struct Routed<'a> {
    /// The variant that answers (and that the impression names).
    variant: &'a Variant,
    /// The promoted version whose ranking is interleaved with the
    /// variant's, for an interleaved request.
    stable: Option<&'a Variant>,
    pinned: bool,
    request_id: String,
    query: String,
}

/// A version's ranking of a query: `(image id, score)`, best first.
type Ranking = Vec<(String, f64)>;

/// The `k` catalog images nearest to `text` under `served`, or `None` when
/// its tokenizer reads no word of `text`.
async fn rank(served: Arc<Served>, text: String, k: usize) -> Result<Option<Ranking>, ApiError> {
    let embed_span = tracing::info_span!("embed", model_version = %served.version);
    let ann_span = tracing::info_span!("ann_search", k);
    let internal =
        |e: &dyn std::fmt::Display| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
    tokio::task::spawn_blocking(move || {
        let (mut ids, mut mask) = (Vec::new(), Vec::new());
        if served.text.tokenizer().push(&text, &mut ids, &mut mask) == 0 {
            return Ok(None);
        }
        let embedding = embed_span
            .in_scope(|| served.text.embed_texts(&[text]))
            .map_err(|e| internal(&e))?;
        let row = embedding.row(0);
        if !row.iter().all(|v| v.is_finite()) || row.iter().all(|v| *v == 0.0) {
            return Ok(None);
        }
        let hits = ann_span
            .in_scope(|| served.index.search(row, k))
            .map_err(|e| internal(&e))?;
        Ok(Some(
            hits.iter()
                .map(|hit| (served.ids[hit.row].clone(), f64::from(hit.score)))
                .collect(),
        ))
    })
    .await
    .map_err(|e| internal(&e))?
}

/// The page of a team-draft interleaving of the stable version's ranking
/// (team A) and the candidate's (team B), drawn with coins seeded by the
/// request id; each result keeps the score of the version that drafted it.
fn interleaved_page(
    stable: &Ranking,
    candidate: &Ranking,
    k: usize,
    request_id: &str,
) -> Vec<ResultItem> {
    let ids =
        |ranking: &Ranking| -> Vec<String> { ranking.iter().map(|(id, _)| id.clone()).collect() };
    let mut rng = StdRng::seed_from_u64(crate::routing::draft_seed(request_id));
    let page = interleave::team_draft(&ids(stable), &ids(candidate), k, &mut rng);
    page.into_iter()
        .enumerate()
        .map(|(i, (image_id, team))| {
            let drafted_from = match team {
                Team::A => stable,
                Team::B => candidate,
            };
            let score = drafted_from
                .iter()
                .find(|(id, _)| *id == image_id)
                .map_or(f64::NAN, |(_, score)| *score);
            ResultItem {
                image_id,
                rank: i as u32 + 1,
                score,
                model_rank: None,
                team: Some(team),
            }
        })
        .collect()
}

/// Ranks (and for an interleaved request, drafts) the page, then logs the
/// impression unless the search is pinned.
async fn answer(
    app: &AppState,
    request: &SearchRequest,
    routed: Routed<'_>,
    context: opentelemetry::Context,
) -> Result<Json<SearchResponse>, ApiError> {
    let Routed {
        variant,
        stable,
        pinned,
        request_id,
        query,
    } = routed;
    let k = request.k as usize;
    let own = rank(variant.served.clone(), query.clone(), k);
    let (own, theirs) = match stable {
        // both versions at once: the person waits for the slower, not the sum
        Some(stable) => {
            let theirs = rank(stable.served.clone(), query.clone(), k);
            let (own, theirs) = tokio::try_join!(own, theirs)?;
            (own, Some(theirs))
        }
        None => (own.await?, None),
    };
    let Some(own) = own else {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "the query has no words the model can read",
        ));
    };
    let shown = match theirs {
        // a stable version that reads no word of the query ranks nothing:
        // the candidate's results fill the page, credited to it
        Some(theirs) => interleaved_page(&theirs.unwrap_or_default(), &own, k, &request_id),
        None => {
            // the model's order, then (for the explored share, never a
            // pinned search) one adjacent swap: the person sees what the
            // impression records, each result keeping its own score
            let swap = if pinned {
                None
            } else {
                app.explore.swap_for(&request_id, own.len())
            };
            if let Some(k) = swap {
                tracing::Span::current().record("explore_swap", k);
            }
            explore::shown_items(own, swap)
        }
    };
    let results: Vec<SearchHit> = shown
        .iter()
        .map(|item| SearchHit {
            url: format!("{}/v1/images/{}", app.public_url, item.image_id),
            image_id: item.image_id.clone(),
            rank: item.rank,
            score: item.score as f32,
            team: item.team,
        })
        .collect();
    let served = &variant.served;
    if !pinned {
        let impression = Impression {
            event_id: Uuid::now_v7(),
            occurred_at: Utc::now(),
            request_id: request_id.clone(),
            session_id: request
                .session_id
                .clone()
                .unwrap_or_else(|| format!("anon-{request_id}")),
            user_id: request.user_id.clone(),
            query,
            model_version: served.version.clone(),
            variant: variant.name.clone(),
            results: shown,
        };
        tracing::info_span!("produce").in_scope(|| {
            let headers = kalon_kafka::inject_context(OwnedHeaders::new(), &context);
            app.events.impression(&impression, headers);
        });
    }
    Ok(Json(SearchResponse {
        request_id,
        model_version: served.version.clone(),
        variant: variant.name.clone(),
        results,
    }))
}

async fn image(State(app): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let valid = (1..=app.limits.max_id_chars).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !valid {
        return Err(ApiError::bad(
            "image id must be 1-128 characters of A-Z a-z 0-9 - _",
        ));
    }
    let Some(folder) = &app.images else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "this search instance serves no image files (start it with --images DIR)",
        ));
    };
    match tokio::fs::read(folder.join(format!("{id}.png"))).await {
        Ok(bytes) => Ok((
            [
                (header::CONTENT_TYPE, "image/png"),
                (header::CACHE_CONTROL, "public, max-age=86400, immutable"),
            ],
            bytes,
        )
            .into_response()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no image {id}"),
        )),
        Err(error) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("reading image {id}: {error}"),
        )),
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClickRequest {
    pub request_id: String,
    pub image_id: String,
    pub rank: u32,
    #[serde(default)]
    pub dwell_ms: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RatingRequest {
    #[serde(default)]
    pub request_id: Option<String>,
    pub query: String,
    pub image_id: String,
    pub stars: u8,
    pub aspect: Aspect,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Accepted {
    pub event_id: Uuid,
}

async fn publish(app: &AppState, event: Event) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    event.validate().map_err(ApiError::bad)?;
    let span = tracing::info_span!("feedback", kind = event.kind().topic());
    app.events.feedback(&event).instrument(span).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(Accepted {
            event_id: event.event_id(),
        }),
    ))
}

async fn click(
    State(app): State<AppState>,
    body: Result<Json<ClickRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    let Json(c) = body?;
    check_id("request_id", &c.request_id, &app.limits)?;
    check_id("image_id", &c.image_id, &app.limits)?;
    let event = Event::Click(Click {
        event_id: Uuid::now_v7(),
        occurred_at: Utc::now(),
        request_id: c.request_id,
        image_id: c.image_id,
        rank: c.rank,
        dwell_ms: c.dwell_ms,
    });
    publish(&app, event).await
}

async fn rating(
    State(app): State<AppState>,
    body: Result<Json<RatingRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    let Json(r) = body?;
    if let Some(request_id) = &r.request_id {
        check_id("request_id", request_id, &app.limits)?;
    }
    check_id("image_id", &r.image_id, &app.limits)?;
    let chars = r.query.trim().chars().count();
    if chars == 0 || chars > app.limits.max_query_chars {
        return Err(ApiError::bad(format!(
            "query must be 1 to {} characters",
            app.limits.max_query_chars
        )));
    }
    let event = Event::Rating(Rating {
        event_id: Uuid::now_v7(),
        occurred_at: Utc::now(),
        request_id: r.request_id,
        query: r.query,
        image_id: r.image_id,
        stars: r.stars,
        aspect: r.aspect,
    });
    publish(&app, event).await
}

/// Per-version serving figures since start; every loaded version appears.
async fn stats(State(app): State<AppState>) -> Json<ServingStats> {
    let routing = app.live.current();
    Json(
        app.serving
            .snapshot(routing.variants.iter().map(|v| v.served.version.as_str())),
    )
}

async fn openapi(State(app): State<AppState>) -> Json<serde_json::Value> {
    Json(crate::openapi::document(&app.limits))
}

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

async fn readyz(State(app): State<AppState>) -> (StatusCode, Json<serde_json::Value>) {
    let routing = app.live.current();
    let variants: Vec<serde_json::Value> = routing
        .variants
        .iter()
        .map(|v| {
            serde_json::json!({
                "variant": v.name,
                "model_version": v.served.version,
                "weight": v.weight,
                "state": v.state.as_str(),
                "interleave": v.interleave,
                "images": v.served.ids.len(),
            })
        })
        .collect();
    let (queued, delivered, dropped) = app.events.stats.snapshot();
    let status = if routing.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(serde_json::json!({
            "ready": routing.is_ready(),
            "variants": variants,
            "impressions": { "queued": queued, "delivered": delivered, "dropped": dropped },
        })),
    )
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no such endpoint; see /openapi.json")
}
