//! Kalon's trainer: turns the preference pairs in Postgres into a new
//! encoder version, with no person involved.
//!
//! - Replicas elect one leader by a Postgres advisory lock; only the leader
//!   creates triggers and trains.
//! - Triggers: a cron tick with at least `--min-new-pairs` new pairs since
//!   the last successful run, or `kalonctl train now`. A trigger's id names
//!   it, so racing replicas create one.
//! - A run: the adapter trained with Ranked DPO from the promoted version on
//!   the pairs in its window (every source, confidence-weighted), exported,
//!   gated offline against its parent ([`gate`]), uploaded to the object
//!   store, registered (`trained` -> `gated_passed|gated_failed`, with its
//!   lineage) and announced on `model.registered.v1` (from an outbox, so a
//!   broker outage delays the event and never loses it).
//! - A leader killed mid-run leaves its run `running` with a heartbeat that
//!   goes stale; the next leader marks it `interrupted` and attempts the
//!   trigger again. At most one attempt of a trigger succeeds (a unique
//!   index), and the registration commits with the run's success.

pub mod cli;
pub mod config;
pub mod gate;
mod job;
mod metrics;
pub mod schedule;
pub mod store;

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use kalon_kafka::KafkaSettings;
use kalon_registry::artifact::ArtifactStore;
use kalon_service::{LeaderGuard, LeaderLock};
use sqlx::PgPool;

pub use config::TrainerConfig;
use schedule::Schedule;

/// The advisory lock's name: one leader per database.
pub const LEADER_LOCK: &str = "trainer";

/// What `/readyz` reports.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Status {
    pub leader: bool,
    pub instance: String,
    pub schedule: String,
    pub next_tick: Option<DateTime<Utc>>,
    /// The run this replica is training, if any.
    pub running: Option<String>,
    /// Why the last due tick did not train, if it did not.
    pub last_skip: Option<String>,
}

/// A trainer replica.
pub struct Trainer {
    config: TrainerConfig,
    schedule: Schedule,
    pool: PgPool,
    kafka: KafkaSettings,
    store: ArtifactStore,
    cache: PathBuf,
    instance: String,
    status: Arc<Mutex<Status>>,
    /// The run this replica trains, and the flag that stops it.
    current: Mutex<Option<(uuid::Uuid, Arc<std::sync::atomic::AtomicBool>)>>,
    /// The offline gate's LMM judge, when an endpoint is configured.
    judge: Option<kalon_llm::Judge>,
    metrics: metrics::Metrics,
}

impl Trainer {
    /// Checks the settings, connects, migrates, opens the artifact store.
    pub async fn build(config: TrainerConfig) -> anyhow::Result<Trainer> {
        let schedule = config.validate()?;
        let pool = config.database.connect(4).await?;
        kalon_db::migrate(&pool).await?;
        let store = ArtifactStore::from_url(&config.artifact_store_url()?)?;
        let instance = config.instance();
        let status = Status {
            instance: instance.clone(),
            schedule: schedule.expression().to_owned(),
            next_tick: schedule.next(Utc::now()),
            ..Default::default()
        };
        Ok(Trainer {
            kafka: config.kafka.settings(),
            cache: kalon_registry::artifact::default_cache_dir(),
            schedule,
            pool,
            store,
            instance,
            status: Arc::new(Mutex::new(status)),
            current: Mutex::new(None),
            judge: None,
            metrics: metrics::Metrics::new(),
            config,
        })
    }

    /// The offline gate also asks this LLM/LMM endpoint to compare the
    /// candidate's rows with the parent's (`--judge-queries` held-out queries).
    pub fn with_judge(mut self, llm: kalon_llm::LlmConfig) -> anyhow::Result<Trainer> {
        self.judge = Some(kalon_llm::Judge::new(kalon_llm::LlmClient::new(llm)?));
        Ok(self)
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// `/readyz`'s answer: always ready (a follower is a healthy replica),
    /// with the status.
    pub fn readiness(&self) -> kalon_telemetry::health::Readiness {
        let status = self.status.clone();
        Arc::new(move || {
            let status = status.lock().expect("status lock").clone();
            (true, serde_json::to_value(status).unwrap_or_default())
        })
    }

    fn set_status(&self, change: impl FnOnce(&mut Status)) {
        change(&mut self.status.lock().expect("status lock"));
    }

    fn set_current(&self, run: Option<(uuid::Uuid, Arc<std::sync::atomic::AtomicBool>)>) {
        self.set_status(|s| s.running = run.as_ref().map(|(id, _)| id.to_string()));
        *self.current.lock().expect("current run lock") = run;
    }

    /// Runs until `shutdown`: follows, or leads (ticks, triggers, runs). A
    /// run cut short by `shutdown` is marked interrupted, to be tried again.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        tokio::pin!(shutdown);
        let lock = LeaderLock::new(LEADER_LOCK);
        let mut leader: Option<LeaderGuard> = None;
        let mut last_tick: Option<DateTime<Utc>> = None;
        let mut first = true;
        loop {
            if !first {
                tokio::select! {
                    () = &mut shutdown => break,
                    () = tokio::time::sleep(self.config.poll()) => {}
                }
            }
            first = false;
            match &mut leader {
                None => match lock.try_acquire(&self.pool).await {
                    Ok(Some(guard)) => {
                        tracing::info!(instance = %self.instance, "leading: this replica trains");
                        leader = Some(guard);
                        self.set_status(|s| s.leader = true);
                    }
                    Ok(None) => continue,
                    Err(error) => {
                        tracing::warn!(%error, "cannot reach the database to take the leader lock");
                        continue;
                    }
                },
                Some(guard) => {
                    if !guard.is_held().await {
                        tracing::warn!("leader lock lost: following");
                        leader = None;
                        // a later leadership starts from the ticks handled then
                        last_tick = None;
                        self.set_status(|s| s.leader = false);
                        continue;
                    }
                }
            }
            let lead = self.lead(&mut last_tick);
            tokio::select! {
                () = &mut shutdown => {
                    self.abandon().await;
                    break;
                }
                result = lead => if let Err(error) = result {
                    tracing::error!(error = format!("{error:#}"), "trainer step failed; trying again");
                }
            }
        }
        if let Some(guard) = leader {
            let _ = guard.release().await;
        }
        Ok(())
    }

    /// One leader step: recover, announce, tick, train what is pending.
    async fn lead(&self, last_tick: &mut Option<DateTime<Utc>>) -> anyhow::Result<()> {
        let stale = std::time::Duration::from_secs(self.config.stale_after_s);
        for (run, trigger, owner) in store::interrupt_stale(&self.pool, stale).await? {
            tracing::warn!(%run, %trigger, %owner, "a run's trainer is gone: run marked interrupted, its trigger will be attempted again");
            self.metrics.run_ended("interrupted");
        }
        // a broker outage delays announcements, never training
        if let Err(error) = job::announce_pending(&self.pool, &self.kafka).await {
            tracing::warn!(
                error = format!("{error:#}"),
                "model.registered.v1 not announced yet; trying again on the next step"
            );
        }
        self.tick(last_tick).await?;
        if let Some((run, owner)) = store::running(&self.pool).await? {
            tracing::debug!(%run, %owner, "a run is in progress elsewhere; waiting for it or its heartbeat to go stale");
            return Ok(());
        }
        if let Some(trigger) = store::next_pending(&self.pool).await? {
            self.attempt(trigger).await?;
        }
        Ok(())
    }

    /// Creates a trigger for a due cron tick when enough new pairs arrived.
    async fn tick(&self, last_tick: &mut Option<DateTime<Utc>>) -> anyhow::Result<()> {
        let now = Utc::now();
        let after = match *last_tick {
            Some(tick) => tick,
            // a new leader picks up after the last tick any trainer handled,
            // or from now
            None => store::last_cron_tick(&self.pool).await?.unwrap_or(now),
        };
        *last_tick = Some(after);
        self.set_status(|s| s.next_tick = self.schedule.next(now));
        let Some(tick) = self.schedule.due(after, now) else {
            return Ok(());
        };
        if store::busy(&self.pool).await? {
            // a trigger waits or a run runs: the new pairs are theirs
            tracing::info!(%tick, "tick while a trigger waits or a run runs; not adding another");
            *last_tick = Some(tick);
            return Ok(());
        }
        if self.config.wait_for_canary {
            if let Some(pending) = store::pending_candidate(&self.pool).await? {
                let why = format!(
                    "tick {tick}: {pending} still awaits its canary's verdict (--wait-for-canary)"
                );
                tracing::info!("{why}; not training");
                self.set_status(|s| s.last_skip = Some(why));
                *last_tick = Some(tick);
                return Ok(());
            }
        }
        let new = store::new_pairs(&self.pool).await?;
        if new < self.config.min_new_pairs as i64 {
            let why = format!(
                "tick {tick}: {new} new pairs since the last run, fewer than --min-new-pairs {}",
                self.config.min_new_pairs
            );
            tracing::info!("{why}; not training");
            self.set_status(|s| s.last_skip = Some(why));
            *last_tick = Some(tick);
            return Ok(());
        }
        let id = store::cron_trigger_id(tick);
        let reason = format!("{new} new pairs since the last run");
        let requested_by = format!("schedule {}", self.schedule.expression());
        if store::create_trigger(&self.pool, &id, "cron", &requested_by, &reason).await? {
            tracing::info!(trigger = %id, %reason, "training triggered");
        }
        // only now: a database error before this leaves the tick due
        *last_tick = Some(tick);
        self.set_status(|s| s.last_skip = None);
        Ok(())
    }

    /// Stops this replica's run (shutdown mid-run): training stops at its
    /// next step, and the run is marked interrupted so the next leader
    /// attempts its trigger again (the attempt counts toward
    /// `--max-attempts`).
    async fn abandon(&self) {
        let current = self.current.lock().expect("current run lock").clone();
        if let Some((run, cancel)) = current {
            cancel.store(true, std::sync::atomic::Ordering::Relaxed);
            let done = sqlx::query(
                "UPDATE training_runs SET state = 'interrupted', finished_at = now(),
                   reason = 'the trainer was stopped mid-run' WHERE id = $1 AND state = 'running'",
            )
            .bind(run)
            .execute(&self.pool)
            .await;
            tracing::warn!(%run, ok = done.is_ok(), "stopped mid-run: the run is marked interrupted and its trigger will be attempted again");
        }
    }
}
