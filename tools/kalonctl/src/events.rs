//! Generating events onto the bus, and watching them land in Postgres.

use std::time::{Duration, Instant};

use clap::Args;
use kalon_events::generate::Generator;
use kalon_events::EventKind;
use kalon_kafka::{KafkaSettings, Outgoing};
use sqlx::PgPool;
use uuid::Uuid;

use crate::Endpoints;

#[derive(Args)]
pub struct ProduceArgs {
    /// How many valid events.
    #[arg(long, default_value_t = 10_000)]
    pub events: u64,
    /// How many malformed payloads to mix in (they must reach the dead-letter topic).
    #[arg(long, default_value_t = 0)]
    pub malformed: u64,
    /// Generator seed [default: from the clock].
    #[arg(long)]
    pub seed: Option<u64>,
}

/// Events generated for one run, with the ids of the valid ones per kind.
pub struct Generated {
    pub messages: Vec<Outgoing>,
    pub ids: [Vec<Uuid>; 3],
}

/// `events` valid events of the usual mix with `malformed` bad payloads
/// spread evenly among them.
pub fn generate(kafka: &KafkaSettings, events: u64, malformed: u64, seed: u64) -> Generated {
    let mut generator = Generator::new(seed);
    let mut out = Generated {
        messages: Vec::with_capacity((events + malformed) as usize),
        ids: Default::default(),
    };
    let every = events.checked_div(malformed).unwrap_or(u64::MAX).max(1);
    let mut bad_left = malformed;
    for i in 0..events {
        let event = generator.next_event();
        out.ids[event.kind().index()].push(event.event_id());
        out.messages.push(Outgoing::event(kafka, &event));
        if bad_left > 0 && i % every == 0 {
            let (kind, payload, _) = generator.malformed();
            out.messages.push(Outgoing {
                topic: kafka.topic(kind.topic()),
                key: None,
                payload,
                headers: None,
            });
            bad_left -= 1;
        }
    }
    out
}

/// Produces all messages with a progress bar; returns how many the broker acknowledged.
pub async fn send(kafka: &KafkaSettings, messages: Vec<Outgoing>) -> anyhow::Result<u64> {
    let kafka = kafka.clone();
    let progress = crate::progress_bar(messages.len() as u64, "produce");
    let shown = progress.clone();
    let sent = tokio::task::spawn_blocking(move || {
        kalon_kafka::produce_all(&kafka, messages, |n| shown.set_position(n))
    })
    .await??;
    progress.finish();
    Ok(sent)
}

pub async fn produce(endpoints: &Endpoints, args: &ProduceArgs) -> anyhow::Result<()> {
    let seed = args.seed.unwrap_or_else(clock_seed);
    let generated = generate(&endpoints.kafka, args.events, args.malformed, seed);
    let sent = send(&endpoints.kafka, generated.messages).await?;
    eprintln!(
        "produced {sent} messages ({} malformed), seed {seed}",
        args.malformed
    );
    Ok(())
}

pub fn clock_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
}

/// How many of `ids` are in each event table.
pub async fn count_landed(pool: &PgPool, ids: &[Vec<Uuid>; 3]) -> anyhow::Result<[u64; 3]> {
    let mut counts = [0u64; 3];
    for kind in EventKind::ALL {
        let sql = format!(
            "SELECT count(*) FROM {} WHERE event_id = ANY($1)",
            kind.table()
        );
        let (n,): (i64,) = sqlx::query_as(&sql)
            .bind(&ids[kind.index()])
            .fetch_one(pool)
            .await?;
        counts[kind.index()] = n as u64;
    }
    Ok(counts)
}

/// Rows per event table.
pub async fn count_all(pool: &PgPool) -> anyhow::Result<[u64; 3]> {
    Ok(kalon_db::event_counts(pool).await?.map(|n| n as u64))
}

/// Waits until `landed()` reaches `expected`, showing progress; fails after `timeout`.
pub async fn wait_landed<F, Fut>(
    expected: u64,
    timeout: Duration,
    mut landed: F,
) -> anyhow::Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<u64>>,
{
    let start = Instant::now();
    let progress = crate::progress_bar(expected, "ingest");
    loop {
        let n = landed().await?;
        progress.set_position(n);
        if n >= expected {
            progress.finish();
            return Ok(start.elapsed());
        }
        if start.elapsed() > timeout {
            progress.abandon();
            anyhow::bail!("only {n} of {expected} events landed within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
