//! Deterministic generators of events, good and bad, for the demo, the
//! benchmark and the tests. The simulated world will replace the content
//! with its own users; the shapes stay.

use chrono::{DateTime, Duration, SubsecRound as _, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use uuid::Uuid;

use crate::{Aspect, Click, Event, EventKind, Impression, Rating, ResultItem, MAX_EVENT_BYTES};

const SUBJECTS: &[&str] = &[
    "cat", "mountain", "city", "flower", "car", "beach", "forest", "portrait", "bird", "bridge",
];
const STYLES: &[&str] = &[
    "", "minimal", "vintage", "neon", "pastel", "moody", "sunset",
];

/// A seeded stream of plausible events: impressions, clicks on earlier
/// impressions, occasional ratings.
pub struct Generator {
    rng: StdRng,
    clock: DateTime<Utc>,
    recent: Vec<(String, String, Vec<ResultItem>)>,
    serial: u64,
}

impl Generator {
    pub fn new(seed: u64) -> Self {
        Self::starting_at(seed, Utc::now())
    }

    /// A generator whose events start at `clock` (truncated to the
    /// millisecond, finer than Postgres keeps) and advance a millisecond each.
    pub fn starting_at(seed: u64, clock: DateTime<Utc>) -> Self {
        Generator {
            rng: StdRng::seed_from_u64(seed),
            clock: clock.trunc_subsecs(3),
            recent: Vec::new(),
            serial: 0,
        }
    }

    /// A UUIDv7 from the event clock and the seeded generator, as real
    /// producers should make them (time-ordered ids keep the key index hot).
    fn id(&mut self) -> Uuid {
        let millis = self.clock.timestamp_millis() as u64;
        uuid::Builder::from_unix_timestamp_millis(millis, &self.rng.random()).into_uuid()
    }

    fn tick(&mut self) -> DateTime<Utc> {
        self.clock += Duration::milliseconds(1);
        self.clock
    }

    fn query(&mut self) -> String {
        let subject = SUBJECTS[self.rng.random_range(0..SUBJECTS.len())];
        let style = STYLES[self.rng.random_range(0..STYLES.len())];
        if style.is_empty() {
            format!("a photo of a {subject}")
        } else {
            format!("{style} {subject}")
        }
    }

    /// An impression of `k` results.
    pub fn impression(&mut self, k: usize) -> Impression {
        self.serial += 1;
        let request_id = format!("req-{}", self.id().simple());
        let query = self.query();
        let mut score = 1.0;
        let results: Vec<ResultItem> = (1..=k as u32)
            .map(|rank| {
                score -= self.rng.random_range(0.0..0.05);
                ResultItem {
                    image_id: format!("img-{:06}", self.rng.random_range(0..100_000)),
                    rank,
                    score: (score * 10_000.0_f64).round() / 10_000.0,
                    model_rank: None,
                    team: None,
                }
            })
            .collect();
        let session = self.rng.random_range(0..5_000u32);
        let impression = Impression {
            event_id: self.id(),
            occurred_at: self.tick(),
            request_id: request_id.clone(),
            session_id: format!("s-{session}"),
            user_id: (session % 3 != 0)
                .then(|| format!("u-{:x}", u64::from(session).wrapping_mul(2_654_435_761))),
            query: query.clone(),
            model_version: "ref-v1".into(),
            variant: if self.rng.random_bool(0.1) {
                "canary"
            } else {
                "stable"
            }
            .into(),
            results: results.clone(),
        };
        if self.recent.len() >= 256 {
            let slot = self.rng.random_range(0..self.recent.len());
            self.recent[slot] = (request_id, query, results);
        } else {
            self.recent.push((request_id, query, results));
        }
        impression
    }

    fn click(&mut self) -> Event {
        let (request_id, _, results) =
            self.recent[self.rng.random_range(0..self.recent.len())].clone();
        let item = &results[self.rng.random_range(0..results.len().clamp(1, 5))];
        Event::Click(Click {
            event_id: self.id(),
            occurred_at: self.tick(),
            request_id,
            image_id: item.image_id.clone(),
            rank: item.rank,
            dwell_ms: self
                .rng
                .random_bool(0.7)
                .then(|| self.rng.random_range(200..60_000)),
        })
    }

    fn rating(&mut self) -> Event {
        let (request_id, query, results) =
            self.recent[self.rng.random_range(0..self.recent.len())].clone();
        let item = &results[self.rng.random_range(0..results.len().max(1))];
        Event::Rating(Rating {
            event_id: self.id(),
            occurred_at: self.tick(),
            request_id: self.rng.random_bool(0.8).then_some(request_id),
            query,
            image_id: item.image_id.clone(),
            stars: self.rng.random_range(1..=5),
            aspect: if self.rng.random_bool(0.5) {
                Aspect::Aesthetic
            } else {
                Aspect::Relevance
            },
        })
    }

    /// The next event of the mix: about 60% impressions, 35% clicks, 5% ratings.
    pub fn next_event(&mut self) -> Event {
        let roll = self.rng.random_range(0..100);
        if self.recent.is_empty() || roll < 60 {
            Event::Impression(self.impression(10))
        } else if roll < 95 {
            self.click()
        } else {
            self.rating()
        }
    }

    /// The next event of the given kind.
    pub fn event_of(&mut self, kind: EventKind) -> Event {
        if self.recent.is_empty() || kind == EventKind::Impression {
            let impression = self.impression(10);
            if kind == EventKind::Impression {
                return Event::Impression(impression);
            }
        }
        match kind {
            EventKind::Impression => unreachable!("handled above"),
            EventKind::Click => self.click(),
            EventKind::Rating => self.rating(),
        }
    }

    /// A payload that ingest must refuse, with the reason it must give.
    pub fn malformed(&mut self) -> (EventKind, Vec<u8>, &'static str) {
        let kind = EventKind::ALL[self.rng.random_range(0..3)];
        let good = self.event_of(kind).to_json();
        match self.rng.random_range(0..6) {
            0 => {
                let cut = self.rng.random_range(1..good.len() - 1);
                (kind, good[..cut].to_vec(), "bad_json")
            }
            1 => (kind, b"\xff\xfe not even utf-8".to_vec(), "bad_json"),
            2 => {
                let mut value: serde_json::Value = serde_json::from_slice(&good).unwrap();
                value.as_object_mut().unwrap().remove("event_id");
                (
                    kind,
                    serde_json::to_vec(&value).unwrap(),
                    "schema_violation",
                )
            }
            3 => {
                let mut value: serde_json::Value = serde_json::from_slice(&good).unwrap();
                value["unexpected"] = serde_json::json!(true);
                (
                    kind,
                    serde_json::to_vec(&value).unwrap(),
                    "schema_violation",
                )
            }
            4 => {
                let mut value: serde_json::Value = serde_json::from_slice(&good).unwrap();
                let field = match kind {
                    EventKind::Rating => "stars",
                    _ => "request_id",
                };
                value[field] = match kind {
                    EventKind::Rating => serde_json::json!(9),
                    _ => serde_json::json!(""),
                };
                (
                    kind,
                    serde_json::to_vec(&value).unwrap(),
                    "schema_violation",
                )
            }
            _ => {
                let mut value: serde_json::Value = serde_json::from_slice(&good).unwrap();
                value["query"] = serde_json::json!("x".repeat(MAX_EVENT_BYTES));
                (kind, serde_json::to_vec(&value).unwrap(), "oversized")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_events() {
        let t0 = Utc::now();
        let mut a = Generator::starting_at(7, t0);
        let mut b = Generator::starting_at(7, t0);
        for _ in 0..200 {
            assert_eq!(a.next_event(), b.next_event());
        }
        let mut c = Generator::starting_at(8, t0);
        assert_ne!(a.next_event(), c.next_event());
    }

    #[test]
    fn generated_events_decode_and_malformed_ones_do_not() {
        let mut g = Generator::new(1);
        let mut kinds = std::collections::HashMap::new();
        for _ in 0..2_000 {
            let event = g.next_event();
            *kinds.entry(event.kind()).or_insert(0) += 1;
            let back = Event::decode(event.kind(), &event.to_json()).unwrap();
            assert_eq!(back, event);
        }
        assert_eq!(kinds.len(), 3, "the mix has every kind: {kinds:?}");
        for _ in 0..300 {
            let (kind, payload, reason) = g.malformed();
            let error = Event::decode(kind, &payload).unwrap_err();
            assert_eq!(error.reason(), reason, "{error}");
        }
    }
}
