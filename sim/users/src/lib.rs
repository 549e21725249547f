//! Simulated people for the loop (`kalon-sim-users`).
//!
//! A population of pseudonymous users (`user-<n>`) of one simulated world.
//! Each session draws a query from the world's TRAINING queries (evaluation
//! queries stay held out), calls search's `POST /v1/search` over HTTP,
//! examines the answer with the world's position-biased model
//! ([`kalon_world::Users::browse`]: a rank is examined with probability
//! `1 / rank^bias`, an examined image clicked by its relevance and the hidden
//! oracle's beauty), sometimes rates what it clicked, and posts each click
//! and rating through search's feedback API, or produces them straight to
//! their Kafka topics ([`FeedbackRoute`]), as a client that talks to Kafka
//! would.
//!
//! Every random draw of session `s` comes from its own stream of the seed,
//! so the same seed gives the same people making the same choices whatever
//! the concurrency: a report differs only when search answers differently.
//! The report says what people saw, per variant: click-through and the
//! oracle's mean beauty and relevance of the results shown.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use chrono::Utc;
use futures::StreamExt;
use kalon_events::{Aspect, Click, Event, Rating};
use kalon_world::text::Split;
use kalon_world::{Catalog, ImageMeta, Oracle, Query, QuerySet, Users};
use rand::Rng;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// How people's clicks and ratings reach Kalon.
#[derive(Debug, Clone, Default)]
pub enum FeedbackRoute {
    /// Search's feedback API (`POST /v1/feedback/click`, `/rating`).
    #[default]
    Api,
    /// Produced to `search.click.v1` / `search.rating.v1` directly.
    Kafka(kalon_kafka::KafkaSettings),
}

/// Who the people are and how much they search.
#[derive(Debug, Clone)]
pub struct UsersConfig {
    /// Search's base URL (`http://127.0.0.1:8080`).
    pub search_url: String,
    /// The world search serves: its seed and catalog size.
    pub world_seed: u64,
    pub images: usize,
    /// The people's seed: the same seed gives the same people.
    pub seed: u64,
    /// Distinct users; session `s` belongs to `user-<s mod users>`.
    pub users: usize,
    /// Sessions to run (each: one search, its clicks and ratings).
    pub sessions: usize,
    /// The first session's number: a population run in parts continues the
    /// numbering (and so the session ids search routes by).
    pub first_session: u64,
    /// Stop starting sessions after this long, if set.
    pub duration: Option<Duration>,
    /// Sessions started per second at most (None: as fast as they finish).
    pub rate_per_s: Option<f64>,
    /// Sessions in flight at once.
    pub concurrency: usize,
    /// Results asked for per search.
    pub k: u32,
    /// How people examine and click.
    pub behaviour: Users,
    pub feedback: FeedbackRoute,
}

impl UsersConfig {
    pub fn new(search_url: &str, world_seed: u64, images: usize) -> Self {
        UsersConfig {
            search_url: search_url.trim_end_matches('/').to_owned(),
            world_seed,
            images,
            seed: 1,
            users: 200,
            sessions: 1_000,
            first_session: 0,
            duration: None,
            rate_per_s: None,
            concurrency: 8,
            k: 10,
            behaviour: Users::default(),
            feedback: FeedbackRoute::Api,
        }
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.users >= 1, "--users must be at least 1");
        anyhow::ensure!(self.concurrency >= 1, "--concurrency must be at least 1");
        anyhow::ensure!(self.k >= 1, "--k must be at least 1");
        anyhow::ensure!(self.images >= 1, "--images must be at least 1");
        if let Some(rate) = self.rate_per_s {
            anyhow::ensure!(rate > 0.0, "--rate must be positive");
        }
        Ok(())
    }
}

/// What people saw and did under one variant.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VariantFigures {
    pub searches: u64,
    /// Results shown (summed over searches).
    pub shown: u64,
    pub clicks: u64,
    pub ratings: u64,
    /// Clicks per search.
    pub ctr: f64,
    /// The oracle's mean beauty and relevance of the results shown.
    pub mean_beauty: f64,
    pub mean_relevance: f64,
    #[serde(skip)]
    beauty_sum: f64,
    #[serde(skip)]
    relevance_sum: f64,
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub sessions: u64,
    /// Sessions whose search or feedback failed (counted, not retried).
    pub failed: u64,
    /// Per variant name, as search reported it.
    pub variants: BTreeMap<String, VariantFigures>,
    /// Result ids search answered that the world does not know.
    pub unknown_images: u64,
}

/// One finished session, for progress and for tests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionOutcome {
    pub session: u64,
    pub user_id: String,
    pub query: String,
    pub request_id: String,
    pub variant: String,
    pub model_version: String,
    /// Image ids shown, in rank order.
    pub shown: Vec<String>,
    /// On an interleaved page (a canary's), the team that drafted each
    /// shown result (`stable` / `candidate`), in rank order; empty otherwise.
    pub teams: Vec<String>,
    /// (rank, image id) clicked, and (rank, image id, stars) rated.
    pub clicks: Vec<(u32, String)>,
    pub ratings: Vec<(u32, String, u8)>,
    /// The event ids search acknowledged for the clicks and ratings.
    pub feedback_event_ids: Vec<String>,
    /// The oracle's beauty and relevance of the shown results, summed.
    pub beauty: f64,
    pub relevance: f64,
}

#[derive(Deserialize)]
struct Answer {
    request_id: String,
    model_version: String,
    variant: String,
    results: Vec<Hit>,
}

#[derive(Deserialize)]
struct Hit {
    image_id: String,
    rank: u32,
    #[serde(default)]
    team: Option<String>,
}

#[derive(Deserialize)]
struct Accepted {
    event_id: String,
}

/// The people of one world.
pub struct Population {
    config: UsersConfig,
    catalog: HashMap<String, ImageMeta>,
    queries: Vec<Query>,
    oracle: Oracle,
    http: reqwest::Client,
    /// Set when feedback goes to Kafka.
    publisher: Option<(kalon_kafka::KafkaSettings, kalon_kafka::Publisher)>,
}

impl Population {
    pub fn new(config: UsersConfig) -> anyhow::Result<Population> {
        config.validate()?;
        let catalog = Catalog::generate(config.world_seed, config.images)
            .images
            .into_iter()
            .map(|m| (m.id.clone(), m))
            .collect();
        let queries: Vec<Query> = QuerySet::generate(config.world_seed, 160)
            .queries
            .into_iter()
            .filter(|q| q.split == Split::Train)
            .collect();
        anyhow::ensure!(!queries.is_empty(), "the world has no training queries");
        kalon_telemetry::install_crypto_provider();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()?;
        let publisher = match &config.feedback {
            FeedbackRoute::Api => None,
            FeedbackRoute::Kafka(kafka) => Some((
                kafka.clone(),
                kalon_kafka::Publisher::new(kafka, "kalon-sim-users", Duration::from_secs(10))?,
            )),
        };
        Ok(Population {
            config,
            catalog,
            queries,
            oracle: Oracle::default(),
            http,
            publisher,
        })
    }

    /// Runs the sessions (at the configured rate and concurrency) and
    /// reports; `on_session` sees each finished one.
    pub async fn run(&self, mut on_session: impl FnMut(&SessionOutcome)) -> Report {
        let started = Instant::now();
        let duration = self.config.duration;
        // one pacer shared by the sessions: none starts before its tick
        let pacer = tokio::sync::Mutex::new(
            self.config
                .rate_per_s
                .map(|rate| tokio::time::interval(Duration::from_secs_f64(1.0 / rate))),
        );
        let pacer = &pacer;
        let first = self.config.first_session;
        let outcomes = futures::stream::iter(first..first + self.config.sessions as u64)
            .take_while(|_| futures::future::ready(duration.is_none_or(|d| started.elapsed() < d)))
            .map(|s| async move {
                if let Some(ticks) = pacer.lock().await.as_mut() {
                    ticks.tick().await;
                }
                self.session(s).await
            })
            .buffer_unordered(self.config.concurrency);
        let mut outcomes = std::pin::pin!(outcomes);
        let mut report = Report::default();
        while let Some(outcome) = outcomes.next().await {
            report.sessions += 1;
            match outcome {
                Ok((outcome, unknown)) => {
                    report.unknown_images += unknown;
                    let figures = report.variants.entry(outcome.variant.clone()).or_default();
                    figures.searches += 1;
                    figures.shown += outcome.shown.len() as u64;
                    figures.clicks += outcome.clicks.len() as u64;
                    figures.ratings += outcome.ratings.len() as u64;
                    figures.beauty_sum += outcome.beauty;
                    figures.relevance_sum += outcome.relevance;
                    on_session(&outcome);
                }
                Err(error) => {
                    report.failed += 1;
                    if report.failed <= 3 {
                        eprintln!("a session failed: {error:#}");
                    }
                }
            }
        }
        for figures in report.variants.values_mut() {
            let shown = figures.shown.max(1) as f64;
            figures.ctr = figures.clicks as f64 / figures.searches.max(1) as f64;
            figures.mean_beauty = figures.beauty_sum / shown;
            figures.mean_relevance = figures.relevance_sum / shown;
        }
        report
    }

    /// Session `s`: its user, its query, the search, the clicks and ratings
    /// posted. Returns the outcome and how many results were unknown.
    async fn session(&self, s: u64) -> anyhow::Result<(SessionOutcome, u64)> {
        let user = s % self.config.users as u64;
        let user_id = format!("user-{user}");
        let mut rng = kalon_world::stream(self.config.seed, &format!("session-{s}"));
        let query = &self.queries[rng.random_range(0..self.queries.len())];
        let answer: Answer = self
            .post(
                "/v1/search",
                serde_json::json!({
                    "query": query.text,
                    "k": self.config.k,
                    "session_id": format!("{user_id}-session-{s}"),
                    "user_id": user_id,
                }),
            )
            .await?;
        let known: Vec<&ImageMeta> = answer
            .results
            .iter()
            .filter_map(|hit| self.catalog.get(&hit.image_id))
            .collect();
        let unknown = (answer.results.len() - known.len()) as u64;
        let browsed = self
            .config
            .behaviour
            .browse(query, &known, &self.oracle, &mut rng);
        let mut outcome = SessionOutcome {
            session: s,
            user_id,
            query: query.text.clone(),
            request_id: answer.request_id.clone(),
            variant: answer.variant,
            model_version: answer.model_version,
            shown: answer.results.iter().map(|h| h.image_id.clone()).collect(),
            teams: if answer.results.iter().any(|h| h.team.is_some()) {
                answer
                    .results
                    .iter()
                    .map(|h| h.team.clone().unwrap_or_default())
                    .collect()
            } else {
                Vec::new()
            },
            clicks: Vec::new(),
            ratings: Vec::new(),
            feedback_event_ids: Vec::new(),
            beauty: known.iter().map(|m| self.oracle.aesthetic(query, m)).sum(),
            relevance: known.iter().map(|m| query.relevance(m)).sum(),
        };
        // browse's ranks count the known results; back to search's ranks
        let known_hits: Vec<&Hit> = answer
            .results
            .iter()
            .filter(|h| self.catalog.contains_key(&h.image_id))
            .collect();
        // every draw before any request: the choices never depend on timing
        let mut feedback = Vec::new();
        let mut events = Vec::new();
        for rank in browsed.clicks {
            let h = known_hits[rank as usize - 1];
            outcome.clicks.push((h.rank, h.image_id.clone()));
            let dwell_ms = rng.random_range(500..20_000u64);
            events.push(Event::Click(Click {
                event_id: Uuid::now_v7(),
                occurred_at: Utc::now(),
                request_id: answer.request_id.clone(),
                image_id: h.image_id.clone(),
                rank: h.rank,
                dwell_ms: Some(dwell_ms),
            }));
            let body = serde_json::json!({
                "request_id": answer.request_id,
                "image_id": h.image_id,
                "rank": h.rank,
                "dwell_ms": dwell_ms,
            });
            feedback.push(("/v1/feedback/click", body));
        }
        for (rank, stars) in browsed.ratings {
            let h = known_hits[rank as usize - 1];
            outcome.ratings.push((h.rank, h.image_id.clone(), stars));
            events.push(Event::Rating(Rating {
                event_id: Uuid::now_v7(),
                occurred_at: Utc::now(),
                request_id: Some(answer.request_id.clone()),
                query: query.text.clone(),
                image_id: h.image_id.clone(),
                stars,
                aspect: Aspect::Aesthetic,
            }));
            let body = serde_json::json!({
                "request_id": answer.request_id,
                "query": query.text,
                "image_id": h.image_id,
                "stars": stars,
                "aspect": "aesthetic",
            });
            feedback.push(("/v1/feedback/rating", body));
        }
        match &self.publisher {
            None => {
                for (path, body) in feedback {
                    let accepted: Accepted = self.post(path, body).await?;
                    outcome.feedback_event_ids.push(accepted.event_id);
                }
            }
            Some((kafka, publisher)) => {
                for event in events {
                    let id = event.event_id();
                    publisher
                        .publish(
                            &kafka.topic(event.kind().topic()),
                            id.as_bytes(),
                            &event.to_json(),
                            Default::default(),
                        )
                        .await?;
                    outcome.feedback_event_ids.push(id.to_string());
                }
            }
        }
        Ok((outcome, unknown))
    }

    async fn post<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: serde_json::Value,
    ) -> anyhow::Result<T> {
        let url = format!("{}{path}", self.config.search_url);
        let response = self
            .http
            .post(&url)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("POST {url}: {e}"))?;
        let status = response.status();
        let bytes = response.bytes().await?;
        anyhow::ensure!(
            status.is_success(),
            "POST {url}: {status}: {}",
            String::from_utf8_lossy(&bytes)
        );
        Ok(serde_json::from_slice(&bytes)?)
    }
}
