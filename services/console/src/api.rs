//! The console's HTTP surface: the page (`/`, `/app.js`, `/app.css`), its
//! JSON API under `/api/`, images proxied from search (`/images/{id}`),
//! `/openapi.json` and `/healthz`.
//!
//! Reading is open to anyone who can reach the console. The two calls that
//! change or spend something need the operator's token
//! (`Authorization: Bearer <token>`, the canary's `KALON_CANARY_ADMIN_TOKEN`):
//! a canary action (checked here, then passed on with the same token to
//! the canary's admin API, which checks it again and records the override),
//! and asking the LMM judge (it costs tokens).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use kalon_canary::lmm::LmmCanary;
use kalon_events::CanaryAction;
use kalon_registry::lineage::{self, LineageError};
use kalon_service::auth::{self, Refusal};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::{data, Shared};

const INDEX_HTML: &str = include_str!("../assets/index.html");
const APP_JS: &str = include_str!("../assets/app.js");
const APP_CSS: &str = include_str!("../assets/app.css");

/// The most results a comparison shows per version.
pub const MAX_K: u32 = 50;
/// The longest query the console passes on.
pub const MAX_QUERY_CHARS: usize = 512;

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/app.js", get(app_js))
        .route("/app.css", get(app_css))
        .route("/api/config", get(config))
        .route("/api/overview", get(overview))
        .route("/api/canaries", get(canaries))
        .route("/api/canary/{action}", post(canary_action))
        .route("/api/models", get(models))
        .route("/api/models/{version}/lineage", get(lineage_of))
        .route("/api/runs", get(runs))
        .route("/api/compare", get(compare))
        .route("/api/judge", post(judge))
        .route("/images/{id}", get(image))
        .route("/openapi.json", get(openapi))
        .route("/healthz", get(healthz))
        .fallback(not_found)
        .with_state(shared)
}

/// An error answer: a status and `{"error": message}`.
pub struct ApiError {
    status: StatusCode,
    message: String,
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

    /// The database failed: logged, and said without its details.
    fn db(error: impl std::fmt::Display) -> Self {
        tracing::warn!(%error, "console: the database failed");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the loop's database did not answer; try again",
        )
    }

    /// Another service did not answer.
    fn upstream(what: &str, error: impl std::fmt::Display) -> Self {
        tracing::warn!(%error, "console: {what} did not answer");
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            format!("{what} did not answer: {error}"),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({ "error": self.message }))).into_response()
    }
}

type ApiResult = Result<Response, ApiError>;

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

async fn app_js() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}

async fn app_css() -> Response {
    asset("text/css; charset=utf-8", APP_CSS)
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no such page or API call")
}

async fn healthz() -> &'static str {
    "ok"
}

/// What the page needs to know about this console.
async fn config(State(shared): State<Arc<Shared>>) -> Json<Value> {
    Json(json!({
        "refresh_ms": shared.config.refresh_ms,
        "judge": shared.judge.is_some(),
        "actions": shared.config.admin_token.is_some(),
        "max_k": MAX_K,
    }))
}

async fn overview(State(shared): State<Arc<Shared>>) -> ApiResult {
    let overview = data::overview(&shared.pool).await.map_err(ApiError::db)?;
    Ok(Json(overview).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitParams {
    limit: Option<i64>,
}

fn limit(params: Result<Query<LimitParams>, QueryRejection>) -> Result<i64, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::bad(e.body_text()))?;
    let limit = params.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(ApiError::bad(format!("limit {limit} is not in 1..=100")));
    }
    Ok(limit)
}

/// The latest canaries, newest first, each with every decision (holds
/// included: they carry the evidence over time the charts draw).
async fn canaries(
    State(shared): State<Arc<Shared>>,
    params: Result<Query<LimitParams>, QueryRejection>,
) -> ApiResult {
    let limit = limit(params)?;
    let reports = kalon_canary::ops::history(&shared.pool, limit, true)
        .await
        .map_err(ApiError::db)?;
    Ok(Json(json!({ "canaries": reports })).into_response())
}

async fn models(State(shared): State<Arc<Shared>>) -> ApiResult {
    let models = data::models(&shared.pool).await.map_err(ApiError::db)?;
    Ok(Json(json!({ "models": models })).into_response())
}

async fn lineage_of(State(shared): State<Arc<Shared>>, Path(version): Path<String>) -> ApiResult {
    match lineage::why(&shared.pool, &version).await {
        Ok(lineage) => Ok(Json(lineage).into_response()),
        Err(LineageError::Unknown(v)) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("model version {v:?} is not registered"),
        )),
        Err(LineageError::Db(e)) => Err(ApiError::db(e)),
        Err(e @ LineageError::Cycle(_)) => Err(ApiError::new(StatusCode::CONFLICT, e.to_string())),
    }
}

async fn runs(
    State(shared): State<Arc<Shared>>,
    params: Result<Query<LimitParams>, QueryRejection>,
) -> ApiResult {
    let limit = limit(params)?;
    let runs = data::runs(&shared.pool, limit)
        .await
        .map_err(ApiError::db)?;
    Ok(Json(json!({ "runs": runs })).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CompareParams {
    query: String,
    /// Default: the promoted version.
    a: Option<String>,
    /// Default: the canary's candidate in flight, else another deployed
    /// version.
    b: Option<String>,
    k: Option<u32>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Hit {
    image_id: String,
    rank: u32,
    score: f32,
    #[serde(default)]
    url: Option<String>,
}

#[derive(Debug, Deserialize)]
struct SearchAnswer {
    results: Vec<Hit>,
}

fn valid_version(name: &str) -> bool {
    kalon_registry::store::valid_name(name)
}

fn check_query(query: &str) -> Result<&str, ApiError> {
    let query = query.trim();
    if query.is_empty() {
        return Err(ApiError::bad("type a query"));
    }
    if query.chars().count() > MAX_QUERY_CHARS {
        return Err(ApiError::bad(format!(
            "the query is longer than {MAX_QUERY_CHARS} characters"
        )));
    }
    Ok(query)
}

/// The two versions to compare: the given ones, else the promoted one and
/// the candidate in flight (else another deployed version).
async fn pair_of(
    shared: &Shared,
    a: Option<String>,
    b: Option<String>,
) -> Result<(String, String), ApiError> {
    for name in a.iter().chain(b.iter()) {
        if !valid_version(name) {
            return Err(ApiError::bad(format!(
                "{name:?} is not a version name (1-64 of A-Z a-z 0-9 . _ -)"
            )));
        }
    }
    let overview_needed = a.is_none() || b.is_none();
    let (promoted, candidate, deployed) = if overview_needed {
        let promoted = kalon_registry::lifecycle::promoted(&shared.pool)
            .await
            .map_err(ApiError::db)?
            .map(|v| v.version);
        let candidate = kalon_canary::ops::status(&shared.pool)
            .await
            .map_err(ApiError::db)?
            .filter(|r| !r.canary.status.finished())
            .map(|r| r.canary.candidate);
        let deployed: Vec<String> = kalon_registry::store::deployments(&shared.pool)
            .await
            .map_err(ApiError::db)?
            .into_iter()
            .map(|d| d.model_version)
            .collect();
        (promoted, candidate, deployed)
    } else {
        (None, None, Vec::new())
    };
    let a = match a {
        Some(a) => a,
        None => promoted
            .clone()
            .or_else(|| deployed.first().cloned())
            .ok_or_else(|| ApiError::bad("no version is promoted or deployed: name `a`"))?,
    };
    let b = match b {
        Some(b) => b,
        None => candidate
            .filter(|c| *c != a)
            .or_else(|| deployed.iter().find(|v| **v != a).cloned())
            .ok_or_else(|| {
                ApiError::bad(format!(
                    "no canary in flight and no other deployed version to compare {a} with: name `b`"
                ))
            })?,
    };
    Ok((a, b))
}

/// One version's top-k from search, pinned to it (no impression).
async fn pinned(shared: &Shared, query: &str, version: &str, k: u32) -> Result<Vec<Hit>, ApiError> {
    let search = shared.config.search_url.trim_end_matches('/');
    let body = json!({ "query": query, "k": k, "model_version": version });
    let response = shared
        .http
        .post(format!("{search}/v1/search"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(body.to_string())
        .send()
        .await
        .map_err(|e| ApiError::upstream("search", e))?;
    let status = response.status();
    let bytes = response
        .bytes()
        .await
        .map_err(|e| ApiError::upstream("search", e))?;
    if status.is_client_error() {
        // search's own explanation (a version it does not serve, a query it refuses)
        let said = serde_json::from_slice::<Value>(&bytes)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
        return Err(ApiError::new(
            StatusCode::from_u16(status.as_u16()).unwrap_or(StatusCode::BAD_REQUEST),
            format!("search refused {version}: {said}"),
        ));
    }
    if !status.is_success() {
        return Err(ApiError::upstream(
            "search",
            format!("{status} for {version}"),
        ));
    }
    let answer: SearchAnswer =
        serde_json::from_slice(&bytes).map_err(|e| ApiError::upstream("search", e))?;
    Ok(answer
        .results
        .into_iter()
        .map(|hit| Hit {
            url: Some(format!("/images/{}", hit.image_id)),
            ..hit
        })
        .collect())
}

async fn compare(
    State(shared): State<Arc<Shared>>,
    params: Result<Query<CompareParams>, QueryRejection>,
) -> ApiResult {
    let Query(params) = params.map_err(|e| ApiError::bad(e.body_text()))?;
    let query = check_query(&params.query)?.to_owned();
    let k = params.k.unwrap_or(10);
    if !(1..=MAX_K).contains(&k) {
        return Err(ApiError::bad(format!("k {k} is not in 1..={MAX_K}")));
    }
    let (a, b) = pair_of(&shared, params.a, params.b).await?;
    let (row_a, row_b) = tokio::try_join!(
        pinned(&shared, &query, &a, k),
        pinned(&shared, &query, &b, k)
    )?;
    let overlap = row_a
        .iter()
        .filter(|h| row_b.iter().any(|o| o.image_id == h.image_id))
        .count();
    Ok(Json(json!({
        "query": query,
        "k": k,
        "a": { "version": a, "results": row_a },
        "b": { "version": b, "results": row_b },
        "overlap": overlap,
    }))
    .into_response())
}

/// Checks the operator's token; the refusal explains itself.
fn authorise(shared: &Shared, headers: &HeaderMap, what: &str) -> Result<(), ApiError> {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    auth::check(given, shared.config.admin_token.as_ref()).map_err(|refusal| match refusal {
        Refusal::Missing => ApiError::new(
            StatusCode::UNAUTHORIZED,
            format!("{what}: enter the operator's token (sent as `Authorization: Bearer <token>`)"),
        ),
        Refusal::NotConfigured => ApiError::new(
            StatusCode::FORBIDDEN,
            "this console has no operator token configured (KALON_CANARY_ADMIN_TOKEN), so it refuses every action",
        ),
        Refusal::Wrong => ApiError::new(StatusCode::FORBIDDEN, "the token is not the operator's token"),
    })
}

fn with_challenge(error: ApiError) -> Response {
    let unauthorised = error.status == StatusCode::UNAUTHORIZED;
    let mut response = error.into_response();
    if unauthorised {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"kalon-console\""),
        );
    }
    response
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ActionBody {
    reason: String,
    /// Who (default `console`).
    actor: Option<String>,
    /// The candidate the operator saw; the canary refuses the action when
    /// another one is in flight.
    candidate: Option<String>,
}

/// A canary action: checked here, then the canary's admin API, with the
/// same token, which records it as a decision with who and why.
async fn canary_action(
    State(shared): State<Arc<Shared>>,
    Path(action): Path<String>,
    headers: HeaderMap,
    body: Result<Json<ActionBody>, JsonRejection>,
) -> Response {
    match CanaryAction::parse(&action) {
        Some(
            CanaryAction::Promote
            | CanaryAction::Rollback
            | CanaryAction::Pause
            | CanaryAction::Resume,
        ) => {}
        _ => {
            return ApiError::new(
                StatusCode::NOT_FOUND,
                format!("no action {action:?}: promote, rollback, pause or resume"),
            )
            .into_response()
        }
    }
    if let Err(refused) = authorise(&shared, &headers, "this changes the canary") {
        return with_challenge(refused);
    }
    let body = match body {
        Ok(Json(body)) => body,
        Err(e) => return ApiError::bad(e.body_text()).into_response(),
    };
    let forwarded = json!({
        "reason": body.reason,
        "actor": body.actor.unwrap_or_else(|| "console".into()),
        "candidate": body.candidate,
    });
    let canary = shared.config.canary_url.trim_end_matches('/');
    let token = headers
        .get(header::AUTHORIZATION)
        .cloned()
        .expect("authorised, so present");
    let response = match shared
        .http
        .post(format!("{canary}/v1/canary/{action}"))
        .header(header::AUTHORIZATION, token)
        .header(header::CONTENT_TYPE, "application/json")
        .body(forwarded.to_string())
        .send()
        .await
    {
        Ok(r) => r,
        Err(e) => {
            return ApiError::upstream("the canary controller's admin API", e).into_response()
        }
    };
    let status =
        StatusCode::from_u16(response.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    match response.bytes().await {
        // the canary's answer as it gave it (its refusals explain themselves)
        Ok(bytes) if !status.is_server_error() => Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(bytes))
            .expect("a response"),
        Ok(bytes) => ApiError::upstream(
            "the canary controller's admin API",
            format!("{status}: {}", String::from_utf8_lossy(&bytes)),
        )
        .into_response(),
        Err(e) => ApiError::upstream("the canary controller's admin API", e).into_response(),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JudgeBody {
    query: String,
    a: String,
    b: String,
    k: Option<u32>,
}

/// The order-consistent LMM judge on two versions' rows for a query.
async fn judge(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Result<Json<JudgeBody>, JsonRejection>,
) -> Response {
    if let Err(refused) = authorise(&shared, &headers, "asking the judge costs tokens") {
        return with_challenge(refused);
    }
    let Json(body) = match body {
        Ok(b) => b,
        Err(e) => return ApiError::bad(e.body_text()).into_response(),
    };
    match judge_rows(&shared, body).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

async fn judge_rows(shared: &Shared, body: JudgeBody) -> ApiResult {
    let query = check_query(&body.query)?.to_owned();
    let k = body.k.unwrap_or(10);
    if !(1..=MAX_K).contains(&k) {
        return Err(ApiError::bad(format!("k {k} is not in 1..={MAX_K}")));
    }
    let (a, b) = pair_of(shared, Some(body.a), Some(body.b)).await?;
    let Some(judge) = shared.judge.clone() else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "no LMM judge: start the console with KALON_LLM_BASE_URL (and KALON_LLM_MODEL, KALON_LLM_API_KEY) set",
        ));
    };
    // both rows must exist before anything is spent
    tokio::try_join!(pinned(shared, &query, &a, k), pinned(shared, &query, &b, k))?;
    let lmm = LmmCanary::new(judge, shared.config.search_url.clone(), None, k, 1, 1);
    let verdicts = lmm
        .judge_query(&query, &a, &b)
        .await
        .map_err(|e| ApiError::upstream("the LMM judge", format!("{e:#}")))?;
    let verdicts: Vec<Value> = verdicts
        .into_iter()
        .map(|(aspect, preference, tokens)| {
            json!({
                "aspect": aspect.as_str(),
                "preferred": match preference { 1 => b.as_str(), -1 => a.as_str(), _ => "neither" },
                "verdict": match preference { 1 => "b", -1 => "a", _ => "similar" },
                "tokens": tokens,
            })
        })
        .collect();
    Ok(
        Json(json!({ "query": query, "a": a, "b": b, "k": k, "verdicts": verdicts }))
            .into_response(),
    )
}

/// An image, from search.
async fn image(State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> ApiResult {
    if !valid_version(&id) {
        return Err(ApiError::new(StatusCode::NOT_FOUND, "no such image"));
    }
    let search = shared.config.search_url.trim_end_matches('/');
    let response = shared
        .http
        .get(format!("{search}/v1/images/{id}"))
        .send()
        .await
        .map_err(|e| ApiError::upstream("search", e))?;
    let status = response.status();
    if status.as_u16() == 404 {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no image {id}"),
        ));
    }
    if !status.is_success() {
        return Err(ApiError::upstream(
            "search",
            format!("{status} for image {id}"),
        ));
    }
    let content_type = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("image/png")
        .to_owned();
    let bytes = response
        .bytes()
        .await
        .map_err(|e| ApiError::upstream("search", e))?;
    Ok((
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "max-age=3600".to_owned()),
        ],
        bytes,
    )
        .into_response())
}

async fn openapi() -> Json<Value> {
    Json(document())
}

/// The console API's OpenAPI 3.0 description.
pub fn document() -> Value {
    let error = json!({
        "description": "An error, explained",
        "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } }
    });
    let object = |description: &str| json!({ "description": description, "content": { "application/json": { "schema": { "type": "object" } } } });
    let limit = json!({ "name": "limit", "in": "query", "schema": { "type": "integer", "minimum": 1, "maximum": 100, "default": 20 } });
    let version = json!({ "type": "string", "pattern": "^[A-Za-z0-9._-]{1,64}$" });
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "Kalon console API",
            "version": "1",
            "description": "What the console's pages show. Canary actions and the judge need `Authorization: Bearer <token>` (the operator's KALON_CANARY_ADMIN_TOKEN)."
        },
        "paths": {
            "/api/config": { "get": { "summary": "The console's settings the page needs", "responses": { "200": object("Settings") } } },
            "/api/overview": { "get": { "summary": "The loop's stages with live figures",
                "responses": { "200": object("Overview"), "500": error.clone() } } },
            "/api/canaries": { "get": { "summary": "The latest canaries with every decision and its evidence",
                "parameters": [limit.clone()],
                "responses": { "200": object("Canaries"), "400": error.clone(), "500": error.clone() } } },
            "/api/canary/{action}": { "post": {
                "summary": "An operator's canary action, passed to the canary controller's admin API",
                "security": [ { "bearer": [] } ],
                "parameters": [ { "name": "action", "in": "path", "required": true, "schema": { "type": "string", "enum": ["promote", "rollback", "pause", "resume"] } } ],
                "requestBody": { "required": true, "content": { "application/json": { "schema": {
                    "type": "object", "additionalProperties": false, "required": ["reason"],
                    "properties": {
                        "reason": { "type": "string", "minLength": 1, "maxLength": 4000 },
                        "actor": { "type": "string", "minLength": 1, "maxLength": 128, "default": "console" },
                        "candidate": { "type": "string" }
                    } } } } },
                "responses": { "200": object("The decision stored"), "400": error.clone(), "401": error.clone(),
                               "403": error.clone(), "404": error.clone(), "409": error.clone(), "502": error.clone() } } },
            "/api/models": { "get": { "summary": "The registry: every version with state, gate, deployment and pairs",
                "responses": { "200": object("Models"), "500": error.clone() } } },
            "/api/models/{version}/lineage": { "get": { "summary": "Why a version exists: it and its ancestors, their runs and transitions",
                "parameters": [ { "name": "version", "in": "path", "required": true, "schema": { "type": "string" } } ],
                "responses": { "200": object("Lineage"), "404": error.clone(), "500": error.clone() } } },
            "/api/runs": { "get": { "summary": "The latest training runs",
                "parameters": [limit],
                "responses": { "200": object("Runs"), "400": error.clone(), "500": error.clone() } } },
            "/api/compare": { "get": { "summary": "A query's top-k from two versions, pinned (no impression)",
                "parameters": [
                    { "name": "query", "in": "query", "required": true, "schema": { "type": "string", "minLength": 1, "maxLength": MAX_QUERY_CHARS } },
                    { "name": "a", "in": "query", "schema": version.clone() },
                    { "name": "b", "in": "query", "schema": version.clone() },
                    { "name": "k", "in": "query", "schema": { "type": "integer", "minimum": 1, "maximum": MAX_K, "default": 10 } }
                ],
                "responses": { "200": object("Both rows"), "400": error.clone(), "404": error.clone(), "502": error.clone() } } },
            "/api/judge": { "post": {
                "summary": "The order-consistent LMM judge on two versions' rows for a query (costs tokens)",
                "security": [ { "bearer": [] } ],
                "requestBody": { "required": true, "content": { "application/json": { "schema": {
                    "type": "object", "additionalProperties": false, "required": ["query", "a", "b"],
                    "properties": {
                        "query": { "type": "string", "minLength": 1, "maxLength": MAX_QUERY_CHARS },
                        "a": version.clone(), "b": version,
                        "k": { "type": "integer", "minimum": 1, "maximum": MAX_K, "default": 10 }
                    } } } } },
                "responses": { "200": object("Verdicts per aspect"), "400": error.clone(), "401": error.clone(),
                               "403": error.clone(), "404": error.clone(), "409": error.clone(), "502": error.clone() } } },
            "/images/{id}": { "get": { "summary": "An image, from search",
                "parameters": [ { "name": "id", "in": "path", "required": true, "schema": { "type": "string" } } ],
                "responses": { "200": { "description": "The image" }, "404": error.clone(), "502": error.clone() } } },
            "/healthz": { "get": { "summary": "Alive", "responses": { "200": { "description": "ok" } } } }
        },
        "components": {
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer" } },
            "schemas": { "Error": { "type": "object", "required": ["error"], "properties": { "error": { "type": "string" } } } }
        }
    })
}
