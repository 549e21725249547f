//! The canary controller (`kalon-canary`): takes each registered model
//! version whose gate passed, indexes it, rolls it out along a ladder of
//! traffic shares through the `deployments` table and `model.deployment.v1`,
//! and promotes or rolls it back on online evidence, with no person
//! involved. Every decision is stored with the figures behind it and
//! published on `canary.decision.v1`; operators override through the admin
//! API ([`admin`]) or `kalonctl canary`.
//!
//! - [`stats`]: anytime-valid sequential tests (look after every batch
//!   without inflating false decisions) and [`interleave`]'s team-draft
//!   pages; `docs/CANARY_STATISTICS.md` explains both.
//! - [`evidence`], [`guardrails`], [`lmm`]: the three kinds of evidence.
//! - [`rules`]: the decision rule, pure.
//! - [`store`] and [`rollout`]: decisions are written with the canary's new
//!   state in one transaction; [`rollout::reconcile`] then makes serving
//!   match, idempotently, so a controller killed anywhere resumes at the
//!   same step without repeating an action.
//! - Metrics (`kalon.canary.*`): decisions as published, the candidate's
//!   share, finished canaries, the LMM judge's verdicts and tokens.

pub mod admin;
pub mod cli;
pub mod config;
pub mod evidence;
pub mod guardrails;
pub mod lmm;
mod metrics;
pub mod ops;
pub mod rollout;
pub mod rules;
pub mod stats;
pub mod store;

/// Team-draft interleaving lives beside the impression it is recorded in
/// (search builds the pages); re-exported here, where its clicks are credited.
pub use kalon_events::interleave;

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use chrono::Utc;
use kalon_events::{CanaryAction, CanaryDecision, ModelRegistered, TopicPayload};
use kalon_kafka::consumer::{group_consumer, Consuming};
use kalon_kafka::{KafkaSettings, Publisher};
use kalon_registry::lifecycle::State;
use kalon_service::{LeaderGuard, LeaderLock};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::Serialize;
use sqlx::PgPool;
use tokio::sync::{watch, Notify};
use tracing::{debug, info, warn};

pub use config::CanaryConfig;
use config::Evidence;
use store::{Canary, NewDecision, Status};

/// The advisory lock the deciding replica holds.
pub const LEADER_LOCK: &str = "canary";

/// What `/readyz` shows besides the reader's health.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ControllerStatus {
    pub leader: bool,
    pub canary: Option<i64>,
    pub candidate: Option<String>,
    pub status: Option<String>,
    pub step: Option<u32>,
    pub last_action: Option<String>,
    pub last_error: Option<String>,
}

/// The shared state of the controller's tasks.
pub struct Shared {
    pub config: CanaryConfig,
    pub pool: PgPool,
    pub kafka: KafkaSettings,
    /// Wakes the deciding loop (an operator's override was written).
    pub poke: Notify,
    pub status: Mutex<ControllerStatus>,
}

pub struct Controller {
    shared: Arc<Shared>,
    consumer: StreamConsumer,
    consuming: Consuming,
    lmm: Option<lmm::LmmCanary>,
    publisher: Publisher,
    admin: tokio::net::TcpListener,
}

impl Controller {
    /// Connects to Postgres (migrating it) and the broker; `llm` is the LMM
    /// judge's endpoint (KALON_LLM_*) for `lmm` evidence.
    pub async fn build(
        config: CanaryConfig,
        llm: Option<kalon_llm::LlmConfig>,
    ) -> anyhow::Result<Controller> {
        config.validate()?;
        let lmm = if config.uses(Evidence::Lmm) {
            let llm = llm.context(
                "lmm evidence needs the judge's endpoint: set KALON_LLM_BASE_URL (or drop lmm from --evidence)",
            )?;
            let judge = kalon_llm::Judge::new(kalon_llm::LlmClient::new(llm)?);
            Some(lmm::LmmCanary::new(
                judge,
                config.search_url[0].clone(),
                config.dataset.as_ref().map(|d| d.join("images")),
                config.lmm_k,
                config.lmm_per_look,
                config.lmm_max_queries,
            ))
        } else {
            None
        };
        let pool = config.database.connect(6).await?;
        kalon_db::migrate(&pool)
            .await
            .context("failed to migrate")?;
        let kafka = config.kafka.settings();
        let consumer = group_consumer(&kafka, "kalon-canary", &config.consumer.group_id, None)?;
        let (consumer, consuming) = Consuming::start(
            consumer,
            &kafka,
            &config.consumer.group_id,
            vec![kafka.topic(ModelRegistered::TOPIC)],
            config.consumer.membership(),
            config.consumer.stall_after(),
        )
        .await
        .context("failed to take the model.registered.v1 partitions")?;
        let publisher = Publisher::new(&kafka, "kalon-canary", Duration::from_secs(10))?;
        let admin = admin::bind(config.admin_addr).await?;
        info!(group = %config.consumer.group_id, ladder = ?config.ladder, evidence = ?config.evidence, "canary controller ready");
        Ok(Controller {
            shared: Arc::new(Shared {
                config,
                pool,
                kafka,
                poke: Notify::new(),
                status: Mutex::new(ControllerStatus::default()),
            }),
            consumer,
            consuming,
            lmm,
            publisher,
            admin,
        })
    }

    /// Where the admin API listens (the bound port when 0 was asked for).
    pub fn admin_addr(&self) -> std::net::SocketAddr {
        self.admin
            .local_addr()
            .expect("a bound listener has an address")
    }

    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// Ready while the registration reader keeps up.
    pub fn readiness(&self) -> kalon_telemetry::health::Readiness {
        let shared = self.shared.clone();
        let consuming = self.consuming.readiness();
        Arc::new(move || {
            let (ready, reader) = consuming();
            let status = shared.status.lock().expect("status lock").clone();
            (
                ready,
                serde_json::json!({"reader": reader, "controller": status}),
            )
        })
    }

    /// Runs until `shutdown` resolves: the registration reader, the
    /// deciding loop (one leader among replicas) and the admin API.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let (stop, stopped) = watch::channel(false);
        let Controller {
            shared,
            consumer,
            consuming: _consuming,
            lmm,
            publisher,
            admin,
        } = self;
        let admin = admin::serve(admin, shared.clone())?;
        info!(addr = %admin, "admin API listening");
        let lead = tokio::spawn({
            let shared = shared.clone();
            let stopped = stopped.clone();
            async move { lead(shared, lmm, publisher, stopped).await }
        });
        let read = read_registrations(&shared.pool, &consumer, stopped);
        tokio::pin!(read);
        tokio::pin!(shutdown);
        tokio::select! {
            result = &mut read => { result?; }
            () = &mut shutdown => {
                let _ = stop.send(true);
                read.await?;
            }
        }
        let _ = stop.send(true);
        lead.await?;
        info!("canary controller stopped");
        Ok(())
    }
}

/// Queues every registered version whose gate passed; offsets move only
/// once the queue row is stored (a re-read queues nothing twice).
async fn read_registrations(
    pool: &PgPool,
    consumer: &StreamConsumer,
    mut stopped: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    loop {
        let message = tokio::select! {
            message = consumer.recv() => message,
            _ = stopped.wait_for(|s| *s) => break,
        };
        let message = match message {
            Ok(message) => message,
            Err(error) => {
                warn!(%error, "reading model.registered.v1 failed");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        match ModelRegistered::decode(message.payload().unwrap_or_default()) {
            Ok(event) if event.gate == kalon_events::GateOutcome::Passed => {
                let mut backoff = Duration::from_millis(100);
                loop {
                    match store::enqueue(pool, &event.model_version).await {
                        Ok(new) => {
                            if new {
                                info!(version = %event.model_version, "queued for a canary");
                            }
                            break;
                        }
                        Err(error) => {
                            warn!(%error, "queueing a canary failed; retrying");
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(30));
                        }
                    }
                }
            }
            Ok(event) => {
                debug!(version = %event.model_version, gate = event.gate.as_str(), "not canaried: its gate did not pass")
            }
            Err(error) => warn!(%error, "a model.registered.v1 message is not valid; skipped"),
        }
        let mut list = TopicPartitionList::new();
        list.add_partition_offset(
            message.topic(),
            message.partition(),
            Offset::Offset(message.offset() + 1),
        )?;
        if let Err(error) = consumer.commit(&list, CommitMode::Async) {
            debug!(%error, "offset commit failed; the message will be read again (harmless)");
        }
    }
    if let Ok(list) = consumer.position() {
        let _ = consumer.commit(&list, CommitMode::Sync);
    }
    Ok(())
}

/// The deciding loop: one replica at a time (advisory lock).
async fn lead(
    shared: Arc<Shared>,
    lmm: Option<lmm::LmmCanary>,
    publisher: Publisher,
    mut stopped: watch::Receiver<bool>,
) {
    let lock = LeaderLock::new(LEADER_LOCK);
    let mut leader: Option<LeaderGuard> = None;
    let mut looker = Looker {
        shared: shared.clone(),
        lmm,
        publisher,
        guardrails: guardrails::Guardrails::default(),
        announced: None,
        last_hold: None,
        metrics: metrics::Metrics::new(),
    };
    loop {
        if *stopped.borrow() {
            break;
        }
        match &mut leader {
            None => match lock.try_acquire(&shared.pool).await {
                Ok(Some(guard)) => {
                    info!("leading: this replica decides the canaries");
                    leader = Some(guard);
                    looker.announced = None;
                    shared.set_status(|s| s.leader = true);
                }
                Ok(None) => {}
                Err(error) => warn!(%error, "cannot reach the database to take the leader lock"),
            },
            Some(guard) => {
                if !guard.is_held().await {
                    warn!("leader lock lost: following");
                    leader = None;
                    shared.set_status(|s| s.leader = false);
                }
            }
        }
        if leader.is_some() {
            if let Err(error) = looker.tick().await {
                let error = format!("{error:#}");
                warn!(error, "canary look failed; trying again");
                shared.set_status(|s| s.last_error = Some(error));
            }
        }
        tokio::select! {
            _ = stopped.wait_for(|s| *s) => break,
            () = shared.poke.notified() => {}
            () = tokio::time::sleep(shared.config.tick()) => {}
        }
    }
    if let Some(guard) = leader {
        let _ = guard.release().await;
    }
}

impl Shared {
    pub fn set_status(&self, change: impl FnOnce(&mut ControllerStatus)) {
        change(&mut self.status.lock().expect("status lock"));
    }
}

struct Looker {
    shared: Arc<Shared>,
    lmm: Option<lmm::LmmCanary>,
    publisher: Publisher,
    guardrails: guardrails::Guardrails,
    /// The (canary, status, step) whose deployments were announced since
    /// this replica took the lead.
    announced: Option<(i64, Status, u32)>,
    /// When a hold was last recorded, per canary and step.
    last_hold: Option<(i64, u32, std::time::Instant)>,
    metrics: metrics::Metrics,
}

impl Looker {
    async fn tick(&mut self) -> anyhow::Result<()> {
        let pool = self.shared.pool.clone();
        // a canary that ended (automatically, by an operator, or superseded)
        // is applied until it holds, whatever happened in between
        for finished in store::unsettled(&pool).await? {
            self.settle(&finished).await;
        }
        let mut current = store::in_flight(&pool).await?;
        if current.is_none() {
            current = self.start_next().await?;
        } else if let Some(c) = &current {
            if let Some(newer) = self.superseding(c).await? {
                let share = 0.0;
                let decision = NewDecision {
                    action: CanaryAction::Supersede,
                    step_to: c.step,
                    share,
                    automatic: true,
                    actor: rollout::ACTOR.into(),
                    reason: format!("superseded by the newer candidate {}", newer.candidate),
                    evidence: Vec::new(),
                };
                self.record(c, c.stable.as_deref(), &decision).await?;
                // withdraw it (and mark it rolled back) before the next starts
                if let Some(old) = store::by_candidate(&pool, &c.candidate).await? {
                    self.settle(&old).await;
                }
                current = self.start_next().await?;
            }
        }
        if current.is_none() {
            // no candidate in flight: none takes any traffic
            self.metrics.share(0.0);
        }
        if let Some(canary) = &current {
            self.apply(canary).await?;
            if canary.status == Status::Running {
                self.look(canary).await?;
            }
        }
        self.publish().await?;
        Ok(())
    }

    /// Makes serving match the canary; announces everything once per
    /// state after taking the lead.
    async fn apply(&mut self, canary: &Canary) -> anyhow::Result<()> {
        let key = (canary.id, canary.status, canary.step);
        let announce_all = self.announced != Some(key);
        let shared = &self.shared;
        rollout::reconcile(
            &shared.pool,
            &shared.kafka,
            &shared.config,
            canary,
            announce_all,
        )
        .await?;
        self.announced = Some(key);
        let share = match rollout::target(&shared.config, canary) {
            Some(rollout::Target::Split { share, .. }) => share,
            Some(rollout::Target::Promoted) => 1.0,
            Some(rollout::Target::Withdrawn) | None => 0.0,
        };
        self.metrics.share(share);
        shared.set_status(|s| {
            s.canary = Some(canary.id);
            s.candidate = Some(canary.candidate.clone());
            s.status = Some(canary.status.as_str().into());
            s.step = Some(canary.step);
        });
        Ok(())
    }

    /// Applies a finished canary's end; marks it settled once it holds
    /// (a failure is logged and tried again at the next look).
    async fn settle(&mut self, canary: &Canary) {
        let applied = match self.apply(canary).await {
            Ok(()) => store::settle(&self.shared.pool, canary.id)
                .await
                .map_err(anyhow::Error::from),
            Err(error) => Err(error),
        };
        if let Ok(true) = applied {
            self.metrics.finished(canary.status.as_str());
        }
        if let Err(error) = applied {
            let error = format!("{error:#}");
            warn!(
                canary = canary.id,
                error, "applying the canary's end failed; trying again"
            );
            self.shared.set_status(|s| s.last_error = Some(error));
        }
    }

    /// A newer waiting candidate that replaces `running` (with
    /// `--on-newer supersede`).
    async fn superseding(&self, running: &Canary) -> anyhow::Result<Option<Canary>> {
        if self.shared.config.on_newer != config::OnNewer::Supersede {
            return Ok(None);
        }
        Ok(store::waiting(&self.shared.pool)
            .await?
            .into_iter()
            .rfind(|w| w.id > running.id))
    }

    /// Starts the oldest waiting candidate that can start.
    async fn start_next(&mut self) -> anyhow::Result<Option<Canary>> {
        let shared = self.shared.clone();
        let pool = &shared.pool;
        for waiting in store::waiting(pool).await? {
            let Some(version) = kalon_registry::store::version(pool, &waiting.candidate).await?
            else {
                continue;
            };
            if !matches!(
                version.state,
                State::GatedPassed | State::Indexed | State::Canary
            ) {
                let note = format!("{} is {}: not canaried", version.version, version.state);
                store::set_note(pool, waiting.id, Some(&note)).await?;
                continue;
            }
            let Some(stable) = kalon_registry::lifecycle::promoted(pool).await? else {
                store::set_note(pool, waiting.id, Some("no promoted version to compare with: promote one (kalonctl models promote)")).await?;
                return Ok(None);
            };
            if version.images_indexed == 0 {
                self.index(&waiting, &version).await?;
            }
            let decision = NewDecision {
                action: CanaryAction::Start,
                step_to: 0,
                share: self.shared.config.share(0),
                automatic: true,
                actor: rollout::ACTOR.into(),
                reason: format!(
                    "{} registered with a passed gate; compared with the promoted {}",
                    waiting.candidate, stable.version
                ),
                evidence: Vec::new(),
            };
            return match self
                .record(&waiting, Some(&stable.version), &decision)
                .await
            {
                Ok(()) => Ok(store::in_flight(pool).await?),
                Err(error) => Err(error),
            };
        }
        Ok(None)
    }

    /// Embeds the catalog under the candidate (an adapter version reuses
    /// its parent's embeddings).
    async fn index(
        &self,
        canary: &Canary,
        version: &kalon_registry::store::ModelVersion,
    ) -> anyhow::Result<()> {
        let pool = &self.shared.pool;
        let Some(dataset) = &self.shared.config.dataset else {
            let note = "not indexed, and no --dataset to index it with: run `kalonctl index` or set KALON_CANARY_DATASET";
            store::set_note(pool, canary.id, Some(note)).await?;
            anyhow::bail!("{} {note}", version.version);
        };
        store::set_note(pool, canary.id, Some("indexing")).await?;
        let cache = self
            .shared
            .config
            .model_cache
            .clone()
            .unwrap_or_else(kalon_registry::artifact::default_cache_dir);
        let dir = kalon_registry::artifact::materialize(version, &cache).await?;
        let images: PathBuf = dataset.join("images");
        let options = kalon_encoder::EncoderOptions::from_env()?;
        info!(version = %version.version, "indexing the candidate");
        let indexed = kalon_registry::indexer::index_version(
            pool,
            kalon_registry::indexer::IndexJob {
                version: &version.version,
                encoder_dir: &dir,
                images: &images,
                parent: None,
                force_tower: false,
                batch: 64,
                options: &options,
            },
            |_, _| {},
        )
        .await?;
        info!(version = %version.version, method = %indexed.method, images = indexed.images, seconds = indexed.seconds, "candidate indexed");
        store::set_note(pool, canary.id, None).await?;
        Ok(())
    }

    /// Stores a decision (one transaction with the canary's new state).
    async fn record(
        &mut self,
        seen: &Canary,
        stable: Option<&str>,
        decision: &NewDecision,
    ) -> anyhow::Result<()> {
        match store::decide(&self.shared.pool, seen, stable, decision).await {
            Ok(row) => {
                info!(
                    canary = seen.id,
                    candidate = %seen.candidate,
                    action = row.action.as_str(),
                    step = row.step_to,
                    share = row.share,
                    reason = %row.reason,
                    "decided"
                );
                self.shared
                    .set_status(|s| s.last_action = Some(row.action.as_str().into()));
                Ok(())
            }
            Err(store::DecideError::Stale(why)) => {
                debug!(
                    canary = seen.id,
                    why, "decision skipped: the canary moved on"
                );
                Ok(())
            }
            Err(error) => Err(error.into()),
        }
    }

    /// Gathers the evidence and decides.
    async fn look(&mut self, canary: &Canary) -> anyhow::Result<()> {
        let config = &self.shared.config;
        let pool = self.shared.pool.clone();
        let (Some(stable), Some(since)) = (canary.stable.clone(), canary.started_at) else {
            return Ok(());
        };
        let now = Utc::now();
        let window = evidence::Window {
            stable: stable.clone(),
            candidate: canary.candidate.clone(),
            since,
            until: now - chrono::Duration::seconds(config.settle_s as i64),
        };
        let mut look = rules::Look {
            step: canary.step,
            at_step: (now - canary.step_started_at.unwrap_or(since))
                .to_std()
                .unwrap_or_default(),
            elapsed: (now - since).to_std().unwrap_or_default(),
            ..Default::default()
        };
        // --alpha is the whole rule's budget of false rollbacks: split
        // evenly over the tests that can roll back (Bonferroni)
        let rollback_tests = usize::from(config.uses(Evidence::Ab))
            + usize::from(config.uses(Evidence::Interleaving))
            + if self.lmm.is_some() { 2 } else { 0 }
            + if config.search_url.is_empty() { 0 } else { 2 };
        let alpha = config.alpha / rollback_tests.max(1) as f64;
        if config.uses(Evidence::Ab) {
            let sums = evidence::ab_sums(&pool, &window).await?;
            look.candidate_sessions = sums.candidate_sessions();
            look.evidence.extend(evidence::ab_evidence(
                &sums,
                config.primary.metric(),
                config.margin,
                alpha,
                config.min_sessions,
            )?);
            look.acting.push(config.primary.metric().into());
        }
        if config.uses(Evidence::Interleaving) {
            let counts = evidence::interleaving_counts(&pool, &window).await?;
            look.evidence.push(evidence::interleaving_evidence(
                &counts,
                config.preference_margin,
                alpha,
                config.min_decisive,
            )?);
            look.acting.push("interleaving".into());
        }
        if let Some(lmm) = &self.lmm {
            if let Err(error) = lmm.look(&pool, canary.id, &window).await {
                warn!("LMM canary look failed (its verdicts so far still count): {error:#}");
            }
            let counts = lmm::counts(&pool, canary.id).await?;
            look.evidence.extend(lmm::lmm_evidence(
                &counts,
                config.preference_margin,
                alpha,
                config.min_decisive,
            )?);
            look.acting.push("lmm_aesthetic".into());
        }
        if !config.search_url.is_empty() {
            let stats = self.guardrails.read(canary.id, &config.search_url).await;
            look.evidence.extend(guardrails::evidence_for(
                &stats,
                &stable,
                &canary.candidate,
                guardrails::GuardrailRules {
                    alpha,
                    min_requests: config.min_requests,
                    p99_ratio: config.p99_ratio,
                    p99_slack_ms: config.p99_slack_ms,
                },
            )?);
        }
        let rules = rules::Rules {
            top_step: config.top_step(),
            min_step: Duration::from_secs(config.min_step_s),
            budget: Duration::from_secs(config.budget_s),
            budget_sessions: config.budget_sessions,
            at_budget: config.at_budget,
            promote_when: config.promote_when,
        };
        let (action, reason) = rules::decide(&rules, &look);
        let (step_to, share) = match action {
            CanaryAction::Advance => (canary.step + 1, config.share(canary.step + 1)),
            CanaryAction::Promote => (canary.step, 1.0),
            CanaryAction::Rollback => (canary.step, 0.0),
            _ => (canary.step, config.share(canary.step)),
        };
        if action == CanaryAction::Hold {
            let due = match self.last_hold {
                Some((id, step, at)) if id == canary.id && step == canary.step => {
                    at.elapsed() >= Duration::from_secs(config.hold_every_s)
                }
                _ => true,
            };
            if !due {
                return Ok(());
            }
            self.last_hold = Some((canary.id, canary.step, std::time::Instant::now()));
        }
        let decision = NewDecision {
            action,
            step_to,
            share,
            automatic: true,
            actor: rollout::ACTOR.into(),
            reason,
            evidence: look.evidence,
        };
        self.record(canary, Some(&stable), &decision).await?;
        if action != CanaryAction::Hold {
            // apply at once: a rollback reaches search within seconds
            if let Some(now) = store::by_candidate(&pool, &canary.candidate).await? {
                if now.status.finished() {
                    self.settle(&now).await;
                } else {
                    self.apply(&now).await?;
                }
            }
        }
        Ok(())
    }

    /// Publishes stored decisions not yet on the topic (the outbox).
    async fn publish(&self) -> anyhow::Result<()> {
        let pool = &self.shared.pool;
        loop {
            let rows = store::unpublished(pool, 100).await?;
            if rows.is_empty() {
                return Ok(());
            }
            let topic = self.shared.kafka.topic(CanaryDecision::TOPIC);
            let mut ids = Vec::with_capacity(rows.len());
            for row in &rows {
                let event = row.event();
                if let Err(why) = event.validate() {
                    warn!(
                        id = row.id,
                        why, "a stored decision is not a valid event; not published"
                    );
                } else {
                    self.publisher
                        .publish(
                            &topic,
                            row.candidate.as_bytes(),
                            &event.to_json(),
                            kalon_kafka::headers_from(&[]),
                        )
                        .await?;
                    self.metrics.decision(row.action.as_str(), row.automatic);
                }
                ids.push(row.id);
            }
            store::mark_published(pool, &ids).await?;
        }
    }
}
