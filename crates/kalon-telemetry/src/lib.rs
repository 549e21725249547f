//! One place that sets up Kalon's telemetry.
//!
//! - `tracing` with an `EnvFilter` (`RUST_LOG`, default `info`) and a human
//!   or JSON (`KALON_LOG_FORMAT=json`) formatter on stderr;
//! - when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, OTLP/HTTP export of traces
//!   and metrics to that collector (the standard `OTEL_*` variables apply);
//! - the W3C trace-context propagator, always, so `traceparent` headers are
//!   read and written across Kafka hops.
//!
//! [`init`] returns a guard; dropping it flushes and shuts the exporters down.
//! [`health`] serves `/healthz` and `/readyz` for services without an API.

pub mod health;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry::{global, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

pub use opentelemetry::metrics::Meter;

/// Flushes and shuts down the exporters when dropped.
#[must_use = "telemetry is flushed when the guard drops"]
pub struct TelemetryGuard {
    tracer: Option<SdkTracerProvider>,
    meter: Option<SdkMeterProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(tracer) = self.tracer.take() {
            if let Err(error) = tracer.shutdown() {
                eprintln!("telemetry: flushing traces failed: {error}");
            }
        }
        if let Some(meter) = self.meter.take() {
            if let Err(error) = meter.shutdown() {
                eprintln!("telemetry: flushing metrics failed: {error}");
            }
        }
    }
}

/// Sets up telemetry for `service`, exporting over OTLP when
/// `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
pub fn init(service: &'static str) -> anyhow::Result<TelemetryGuard> {
    let endpoint = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT")
        .ok()
        .filter(|e| !e.trim().is_empty());
    init_with(service, endpoint.as_deref())
}

/// Resolves on SIGTERM or SIGINT: every service's shutdown trigger.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("failed to install the SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutdown requested");
}

/// Installs rustls' process-wide crypto provider (ring) once. Kalon's HTTP
/// clients (the LLM client, the OTLP exporter) share one reqwest build with
/// rustls but no default provider, so every process calls this before
/// building one; calling it again is harmless.
pub fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Err means another provider is already installed: fine either way
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// Installs the W3C trace-context propagator (`traceparent`) process-wide,
/// so trace context is read from and written to HTTP and Kafka headers even
/// in a process that did not call [`init`] (a service embedded in tests).
pub fn install_propagator() {
    global::set_text_map_propagator(TraceContextPropagator::new());
}

/// As [`init`], with the OTLP endpoint (e.g. `http://127.0.0.1:4318`) given.
pub fn init_with(
    service: &'static str,
    otlp_endpoint: Option<&str>,
) -> anyhow::Result<TelemetryGuard> {
    install_crypto_provider();
    install_propagator();
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,ort=warn,hnsw_rs=warn,anndists=warn"));
    let json = std::env::var("KALON_LOG_FORMAT").is_ok_and(|f| f == "json");
    let fmt = if json {
        tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .boxed()
    };

    let mut guard = TelemetryGuard {
        tracer: None,
        meter: None,
    };
    let otel_layer = match otlp_endpoint {
        None => None,
        Some(endpoint) => {
            let resource = Resource::builder()
                .with_service_name(service)
                .with_attribute(KeyValue::new("service.namespace", "kalon"))
                .build();
            let endpoint = endpoint.trim_end_matches('/');
            let spans = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_endpoint(format!("{endpoint}/v1/traces"))
                .build()?;
            let tracer = SdkTracerProvider::builder()
                .with_batch_exporter(spans)
                .with_resource(resource.clone())
                .build();
            global::set_tracer_provider(tracer.clone());
            let metrics = opentelemetry_otlp::MetricExporter::builder()
                .with_http()
                .with_endpoint(format!("{endpoint}/v1/metrics"))
                .build()?;
            let meter = SdkMeterProvider::builder()
                .with_periodic_exporter(metrics)
                .with_resource(resource)
                .build();
            global::set_meter_provider(meter.clone());
            let layer = tracing_opentelemetry::layer().with_tracer(tracer.tracer(service));
            guard.tracer = Some(tracer);
            guard.meter = Some(meter);
            Some(layer)
        }
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel_layer)
        .try_init()?;
    if let Some(endpoint) = otlp_endpoint {
        tracing::info!(service, endpoint, "exporting traces and metrics over otlp");
    }
    Ok(guard)
}

/// The meter for Kalon's metrics (a no-op meter until OTLP is configured).
pub fn meter() -> Meter {
    global::meter("kalon")
}

/// Histogram boundaries, in seconds, for request-scale work (a search, a
/// batch commit): 1 ms to 10 s. The SDK's defaults (0, 5, 10, ... 10000)
/// would put every request in one bucket.
pub const REQUEST_SECONDS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 7.5, 10.0,
];

/// Histogram boundaries, in seconds, for remote calls that may take
/// minutes with their retries (an LLM call): 50 ms to 5 min.
pub const CALL_SECONDS: [f64; 13] = [
    0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
];

/// Histogram boundaries, in seconds, for long jobs (a training run's
/// phase): 1 s to 4 h.
pub const JOB_SECONDS: [f64; 12] = [
    1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0,
];
