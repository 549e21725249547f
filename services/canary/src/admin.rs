//! The admin HTTP API, for the console and for automation: status and
//! history to anyone who can reach it, overrides (promote, roll back,
//! pause, resume) only with the operator's bearer token
//! (`KALON_CANARY_ADMIN_TOKEN`). Missing token: 401; wrong token, or none
//! configured: 403. The comparison is constant-time (both sides hashed,
//! then compared without an early exit), and no token is ever logged.
//! Described in OpenAPI at `/openapi.json`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use kalon_events::CanaryAction;
use kalon_service::auth::{self, Refusal};
use serde::Deserialize;
use serde_json::{json, Value};
use tracing::{info, warn};

use crate::ops::{self, OverrideError};
use crate::Shared;

/// Binds the configured address (`--admin-addr`).
pub async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("the admin API cannot listen on {addr}: {e}"))
}

/// Serves the admin API on `listener` in the background; returns its
/// address.
pub fn serve(listener: tokio::net::TcpListener, shared: Arc<Shared>) -> anyhow::Result<SocketAddr> {
    let addr = listener.local_addr()?;
    if shared.config.admin_token.is_none() {
        warn!("no KALON_CANARY_ADMIN_TOKEN: the admin API refuses every override");
    }
    let app = router(shared);
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            warn!(%error, "admin API stopped");
        }
    });
    Ok(addr)
}

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/canary", get(status))
        .route("/v1/canary/history", get(history))
        .route("/v1/canary/{action}", post(act))
        .route("/openapi.json", get(openapi))
        .with_state(shared)
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

fn internal(e: impl std::fmt::Display) -> Response {
    warn!(error = %e, "admin API request failed");
    error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "the canary's database did not answer; try again",
    )
}

async fn status(State(shared): State<Arc<Shared>>) -> Response {
    match ops::status(&shared.pool).await {
        Ok(report) => {
            Json(json!({ "canary": report, "ladder": shared.config.ladder })).into_response()
        }
        Err(e) => internal(e),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryParams {
    limit: Option<i64>,
    holds: Option<bool>,
}

async fn history(
    State(shared): State<Arc<Shared>>,
    params: Result<Query<HistoryParams>, QueryRejection>,
) -> Response {
    let Query(params) = match params {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let limit = params.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return error(
            StatusCode::BAD_REQUEST,
            format!("limit {limit} is not in 1..=100"),
        );
    }
    match ops::history(&shared.pool, limit, params.holds.unwrap_or(false)).await {
        Ok(reports) => Json(json!({ "canaries": reports })).into_response(),
        Err(e) => internal(e),
    }
}

/// An override's body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OverrideBody {
    /// Why (recorded with the decision).
    reason: String,
    /// Who (default `admin-api`).
    actor: Option<String>,
    /// The candidate the operator means; refused when another is in flight.
    candidate: Option<String>,
}

/// `None` when authorised, else the refusal.
fn authorise(shared: &Shared, headers: &HeaderMap) -> Option<Response> {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let refusal = auth::check(given, shared.config.admin_token.as_ref()).err()?;
    Some(match refusal {
        Refusal::Missing => {
            let mut response = error(
                StatusCode::UNAUTHORIZED,
                "this call changes the canary: send the operator's token as `Authorization: Bearer <token>`",
            );
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer realm=\"kalon-canary\""),
            );
            response
        }
        Refusal::NotConfigured => error(
            StatusCode::FORBIDDEN,
            "this controller has no admin token configured (KALON_CANARY_ADMIN_TOKEN), so it refuses every override",
        ),
        Refusal::Wrong => error(StatusCode::FORBIDDEN, "the token is not the operator's token"),
    })
}

async fn act(
    State(shared): State<Arc<Shared>>,
    Path(action): Path<String>,
    headers: HeaderMap,
    body: Result<Json<OverrideBody>, JsonRejection>,
) -> Response {
    let action = match CanaryAction::parse(&action) {
        Some(
            a @ (CanaryAction::Promote
            | CanaryAction::Rollback
            | CanaryAction::Pause
            | CanaryAction::Resume),
        ) => a,
        _ => {
            return error(
                StatusCode::NOT_FOUND,
                format!("no action {action:?}: promote, rollback, pause or resume"),
            )
        }
    };
    if let Some(refused) = authorise(&shared, &headers) {
        return refused;
    }
    let Json(body) = match body {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let actor = body.actor.unwrap_or_else(|| "admin-api".into());
    let result = ops::override_canary(
        &shared.pool,
        action,
        body.candidate.as_deref(),
        &actor,
        &body.reason,
    )
    .await;
    match result {
        Ok(row) => {
            info!(canary = row.canary_id, candidate = %row.candidate, action = action.as_str(), actor = %row.actor, "operator override");
            shared.poke.notify_one();
            (StatusCode::OK, Json(json!({ "decision": row }))).into_response()
        }
        Err(OverrideError::Db(e)) => internal(e),
        Err(
            e
            @ (OverrideError::NoReason | OverrideError::NoActor | OverrideError::NotAnOverride(_)),
        ) => error(StatusCode::BAD_REQUEST, e.to_string()),
        Err(e) => error(StatusCode::CONFLICT, e.to_string()),
    }
}

async fn openapi() -> Json<Value> {
    Json(document())
}

/// The admin API's OpenAPI 3.0 description.
pub fn document() -> Value {
    let error = json!({
        "description": "An error, explained",
        "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } }
    });
    let report = json!({ "type": "object", "description": "A canary (its row), the candidate's share now, its latest decision and its decisions (holds only when asked for). Decisions carry canary.decision.v1's fields and evidence." });
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "Kalon canary controller admin API",
            "version": "1",
            "description": "Status and history of the canaries; operator overrides need `Authorization: Bearer <token>` (KALON_CANARY_ADMIN_TOKEN)."
        },
        "paths": {
            "/v1/canary": { "get": {
                "summary": "The canary in flight, else the latest one",
                "responses": {
                    "200": { "description": "Status", "content": { "application/json": { "schema": {
                        "type": "object",
                        "required": ["canary", "ladder"],
                        "properties": {
                            "canary": { "oneOf": [report.clone(), { "type": "object", "nullable": true }] },
                            "ladder": { "type": "array", "items": { "type": "number" } }
                        }
                    } } } },
                    "500": error.clone()
                }
            } },
            "/v1/canary/history": { "get": {
                "summary": "The latest canaries, newest first, with their decisions",
                "parameters": [
                    { "name": "limit", "in": "query", "schema": { "type": "integer", "minimum": 1, "maximum": 100, "default": 20 } },
                    { "name": "holds", "in": "query", "schema": { "type": "boolean", "default": false } }
                ],
                "responses": {
                    "200": { "description": "History", "content": { "application/json": { "schema": {
                        "type": "object", "required": ["canaries"],
                        "properties": { "canaries": { "type": "array", "items": report } }
                    } } } },
                    "400": error.clone(),
                    "500": error.clone()
                }
            } },
            "/v1/canary/{action}": { "post": {
                "summary": "An operator's override of the canary in flight, recorded with who and why",
                "security": [ { "bearer": [] } ],
                "parameters": [
                    { "name": "action", "in": "path", "required": true, "schema": { "type": "string", "enum": ["promote", "rollback", "pause", "resume"] } }
                ],
                "requestBody": { "required": true, "content": { "application/json": { "schema": {
                    "type": "object", "additionalProperties": false, "required": ["reason"],
                    "properties": {
                        "reason": { "type": "string", "minLength": 1, "maxLength": 4000 },
                        "actor": { "type": "string", "minLength": 1, "maxLength": 128, "default": "admin-api" },
                        "candidate": { "type": "string", "description": "The candidate meant; refused (409) when another is in flight" }
                    }
                } } } },
                "responses": {
                    "200": { "description": "The decision stored; the controller applies it within a tick",
                             "content": { "application/json": { "schema": { "type": "object", "required": ["decision"], "properties": { "decision": { "type": "object" } } } } } },
                    "400": error.clone(),
                    "401": error.clone(),
                    "403": error.clone(),
                    "404": error.clone(),
                    "409": error.clone(),
                    "500": error
                }
            } }
        },
        "components": {
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer" } },
            "schemas": {
                "Error": { "type": "object", "required": ["error"], "properties": { "error": { "type": "string" } } }
            }
        }
    })
}
