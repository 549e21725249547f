//! The Postgres side of ingest: one transaction per batch, multi-row
//! `INSERT ... SELECT FROM UNNEST(...)` per event table, duplicates ignored.

use chrono::{DateTime, Utc};
use kalon_events::{Click, Event, Impression, Rating};
use sqlx::PgPool;
use uuid::Uuid;

/// A batch of accepted events in column form, ready for `UNNEST`.
#[derive(Default)]
pub struct Rows {
    impressions: ImpressionColumns,
    clicks: ClickColumns,
    ratings: RatingColumns,
    /// Events per kind (impression, click, rating).
    counts: [u64; 3],
}

#[derive(Default)]
struct ImpressionColumns {
    event_id: Vec<Uuid>,
    occurred_at: Vec<DateTime<Utc>>,
    request_id: Vec<String>,
    session_id: Vec<String>,
    user_id: Vec<Option<String>>,
    query: Vec<String>,
    model_version: Vec<String>,
    variant: Vec<String>,
    /// Each impression's results as JSON text, stored verbatim in a `json` column.
    results: Vec<String>,
}

#[derive(Default)]
struct ClickColumns {
    event_id: Vec<Uuid>,
    occurred_at: Vec<DateTime<Utc>>,
    request_id: Vec<String>,
    image_id: Vec<String>,
    rank: Vec<i32>,
    dwell_ms: Vec<Option<i64>>,
}

#[derive(Default)]
struct RatingColumns {
    event_id: Vec<Uuid>,
    occurred_at: Vec<DateTime<Utc>>,
    request_id: Vec<Option<String>>,
    query: Vec<String>,
    image_id: Vec<String>,
    stars: Vec<i16>,
    aspect: Vec<&'static str>,
}

/// What one write did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    /// Rows inserted, per kind (impression, click, rating).
    pub inserted: [u64; 3],
    /// Events already present (redeliveries).
    pub duplicates: u64,
}

impl Written {
    pub fn total(&self) -> u64 {
        self.inserted.iter().sum()
    }
}

impl Rows {
    pub fn len(&self) -> usize {
        self.counts.iter().sum::<u64>() as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Events per kind, in the order of `EventKind::ALL`.
    pub fn counts(&self) -> [u64; 3] {
        self.counts
    }

    /// Adds an event, moving its fields into the columns.
    pub fn push(&mut self, event: Event) {
        self.counts[event.kind().index()] += 1;
        match event {
            Event::Impression(e) => self.impressions.push(e),
            Event::Click(e) => self.clicks.push(e),
            Event::Rating(e) => self.ratings.push(e),
        }
    }

    /// Writes every row in one transaction. Duplicate event ids (already in
    /// the table, or twice in the batch) are skipped.
    pub async fn write(&self, pool: &PgPool) -> Result<Written, sqlx::Error> {
        let mut tx = pool.begin().await?;
        let mut written = Written::default();
        if !self.impressions.event_id.is_empty() {
            let c = &self.impressions;
            written.inserted[0] = sqlx::query(
                "INSERT INTO impressions (event_id, occurred_at, request_id, session_id, user_id, \
                 query, model_version, variant, results) \
                 SELECT * FROM UNNEST($1::uuid[], $2::timestamptz[], $3::text[], $4::text[], \
                 $5::text[], $6::text[], $7::text[], $8::text[], $9::text[]::json[]) \
                 ON CONFLICT DO NOTHING",
            )
            .bind(&c.event_id)
            .bind(&c.occurred_at)
            .bind(&c.request_id)
            .bind(&c.session_id)
            .bind(&c.user_id)
            .bind(&c.query)
            .bind(&c.model_version)
            .bind(&c.variant)
            .bind(&c.results)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        }
        if !self.clicks.event_id.is_empty() {
            let c = &self.clicks;
            written.inserted[1] = sqlx::query(
                "INSERT INTO clicks (event_id, occurred_at, request_id, image_id, rank, dwell_ms) \
                 SELECT * FROM UNNEST($1::uuid[], $2::timestamptz[], $3::text[], $4::text[], \
                 $5::int4[], $6::int8[]) \
                 ON CONFLICT DO NOTHING",
            )
            .bind(&c.event_id)
            .bind(&c.occurred_at)
            .bind(&c.request_id)
            .bind(&c.image_id)
            .bind(&c.rank)
            .bind(&c.dwell_ms)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        }
        if !self.ratings.event_id.is_empty() {
            let c = &self.ratings;
            written.inserted[2] = sqlx::query(
                "INSERT INTO ratings (event_id, occurred_at, request_id, query, image_id, stars, aspect) \
                 SELECT * FROM UNNEST($1::uuid[], $2::timestamptz[], $3::text[], $4::text[], \
                 $5::text[], $6::int2[], $7::text[]) \
                 ON CONFLICT DO NOTHING",
            )
            .bind(&c.event_id)
            .bind(&c.occurred_at)
            .bind(&c.request_id)
            .bind(&c.query)
            .bind(&c.image_id)
            .bind(&c.stars)
            .bind(&c.aspect)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        }
        tx.commit().await?;
        written.duplicates = self.len() as u64 - written.total();
        Ok(written)
    }
}

impl ImpressionColumns {
    fn push(&mut self, e: Impression) {
        self.event_id.push(e.event_id);
        self.occurred_at.push(e.occurred_at);
        self.request_id.push(e.request_id);
        self.session_id.push(e.session_id);
        self.user_id.push(e.user_id);
        self.query.push(e.query);
        self.model_version.push(e.model_version);
        self.variant.push(e.variant);
        self.results
            .push(serde_json::to_string(&e.results).expect("results serialize"));
    }
}

impl ClickColumns {
    fn push(&mut self, e: Click) {
        self.event_id.push(e.event_id);
        self.occurred_at.push(e.occurred_at);
        self.request_id.push(e.request_id);
        self.image_id.push(e.image_id);
        self.rank.push(e.rank as i32);
        self.dwell_ms.push(e.dwell_ms.map(|ms| ms as i64));
    }
}

impl RatingColumns {
    fn push(&mut self, e: Rating) {
        self.event_id.push(e.event_id);
        self.occurred_at.push(e.occurred_at);
        self.request_id.push(e.request_id);
        self.query.push(e.query);
        self.image_id.push(e.image_id);
        self.stars.push(e.stars as i16);
        self.aspect.push(e.aspect.as_str());
    }
}

/// Whether a failed write may succeed if retried unchanged (the database or
/// the network was down) or the data itself was refused (it never will).
pub fn is_transient(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            // 08: connection exception, 40: transaction rollback (serialization,
            // deadlock), 53: insufficient resources, 57: operator intervention
            // (shutdown, crash recovery), 58: system error
            ["08", "40", "53", "57", "58"]
                .iter()
                .any(|class| code.starts_with(class))
        }
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => true,
        _ => false,
    }
}
