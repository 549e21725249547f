//! One trace crosses produce -> consume: a producer span's context, injected
//! into a message's headers as W3C `traceparent` by `kalon_kafka::inject_trace`,
//! is continued by an `ingest.event` span in the producer's trace,
//! exported over OTLP/HTTP; ingest's metrics are exported too. The collector
//! is a real HTTP server in this test speaking OTLP/HTTP protobuf.
//!
//! Telemetry is process-global, so this binary holds this one test.

use std::time::Duration;

use kalon_events::generate::Generator;
use kalon_ingest::Ingest;
use kalon_kafka::Outgoing;
use kalon_tests::otlp::{collector, hex};
use kalon_tests::TestEnv;
use opentelemetry::trace::TraceContextExt;
use rdkafka::message::OwnedHeaders;
use tracing_opentelemetry::OpenTelemetrySpanExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_crosses_kafka_into_ingest_and_metrics_are_exported() {
    let (endpoint, received) = collector().await;
    let telemetry = kalon_telemetry::init_with("kalon-ingest", Some(&endpoint)).unwrap();

    let env = TestEnv::new().await;
    // the producer side: a span of its own, its context injected into headers
    let producer = tracing::info_span!("search.produce");
    let traced_headers = producer.in_scope(|| kalon_kafka::inject_trace(OwnedHeaders::new()));
    let producer_context = producer.context().span().span_context().clone();
    assert!(producer_context.is_valid(), "the producer span has a trace");
    let trace_id = producer_context.trace_id().to_string();
    let parent_span = producer_context.span_id().to_string();
    drop(producer);
    let mut generator = Generator::new(9);
    let events: Vec<_> = (0..20).map(|_| generator.next_event()).collect();
    let messages = events
        .iter()
        .enumerate()
        .map(|(i, event)| Outgoing {
            // only the first carries the producer's trace
            headers: (i == 0).then(|| traced_headers.clone()),
            ..Outgoing::event(&env.kafka, event)
        })
        .collect();
    env.send(messages).await;

    let ingest = Ingest::build(env.ingest_config()).await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(ingest.run(async {
        let _ = stopped.await;
    }));
    env.wait_for_rows(events.len() as i64, Duration::from_secs(60))
        .await;
    stop.send(()).unwrap();
    running.await.unwrap().unwrap();
    // flush both exporters
    tokio::task::spawn_blocking(move || drop(telemetry))
        .await
        .unwrap();

    {
        let received = received.lock().unwrap();
        let spans: Vec<_> = received
            .traces
            .iter()
            .flat_map(|r| &r.resource_spans)
            .flat_map(|r| &r.scope_spans)
            .flat_map(|s| &s.spans)
            .filter(|s| s.name == "ingest.event")
            .collect();
        assert_eq!(
            spans.len(),
            1,
            "one ingest.event span, for the one traced message"
        );
        let span = spans[0];
        assert_eq!(
            hex(&span.trace_id),
            trace_id,
            "the span continues the producer's trace"
        );
        assert_eq!(
            hex(&span.parent_span_id),
            parent_span,
            "its parent is the producer's span"
        );

        let metric_names: std::collections::BTreeSet<&str> = received
            .metrics
            .iter()
            .flat_map(|r| &r.resource_metrics)
            .flat_map(|r| &r.scope_metrics)
            .flat_map(|s| &s.metrics)
            .map(|m| m.name.as_str())
            .collect();
        for name in [
            "kalon.ingest.events",
            "kalon.ingest.batch.size",
            "kalon.ingest.commit.duration",
        ] {
            assert!(
                metric_names.contains(name),
                "{name} exported; got {metric_names:?}"
            );
        }
    }
    env.cleanup().await;
}
