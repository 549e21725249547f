//! Liveness and readiness over HTTP for services without an API of their
//! own (ingest, enricher): `GET /healthz` answers 200 while the process
//! runs, `GET /readyz` 200 or 503 with the figures behind the answer.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};

/// Whether the service is ready, and what to show about it.
pub type Readiness = Arc<dyn Fn() -> (bool, serde_json::Value) + Send + Sync>;

/// Binds `addr` and serves the two endpoints until the process ends.
/// Binding fails loudly (a port taken is a configuration error).
pub async fn serve(addr: SocketAddr, readiness: Readiness) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen for health checks on {addr}: {e}"))?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route(
            "/healthz",
            get(|| async { Json(serde_json::json!({"status": "ok"})) }),
        )
        .route("/readyz", get(readyz))
        .with_state(readiness);
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            tracing::warn!(%error, "health endpoint stopped");
        }
    });
    tracing::info!(addr = %bound, "health endpoints: /healthz, /readyz");
    Ok(bound)
}

async fn readyz(State(readiness): State<Readiness>) -> (StatusCode, Json<serde_json::Value>) {
    let (ready, body) = readiness();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body))
}
