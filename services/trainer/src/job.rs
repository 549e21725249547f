//! One attempt at a trigger: plan, train, gate, upload, register, announce.

use std::time::Instant;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use kalon_align::pipeline::{self, PairsJob, Progress, TooFewPairs};
use kalon_events::{GateOutcome, ModelRegistered, TopicPayload};
use kalon_kafka::KafkaSettings;
use kalon_registry::lifecycle::{self, NewVersion, State};
use sqlx::PgPool;
use tokio::sync::watch;
use uuid::Uuid;

use crate::gate::{self, GateReport};
use crate::store::{self, Plan, Trigger};
use crate::Trainer;

/// How a run ended without an error.
enum Outcome {
    Registered { version: String, passed: bool },
    Skipped(String),
}

/// What the blocking part hands back.
struct Trained {
    gate: GateReport,
    dimension: usize,
    used: usize,
    skipped: usize,
    seconds: serde_json::Map<String, serde_json::Value>,
    last: Option<kalon_align::train::AlignStep>,
}

/// The device a run trains on: CUDA when built with it and a GPU answers
/// (or `KALON_TRAIN_DEVICE` asks for it), the CPU otherwise.
fn device() -> anyhow::Result<(candle_core::Device, String)> {
    let device = match kalon_model::train::training_device() {
        Ok(device) => device,
        Err(error) if std::env::var_os("KALON_TRAIN_DEVICE").is_none() => {
            tracing::warn!(%error, "no CUDA device: training on the CPU");
            candle_core::Device::Cpu
        }
        Err(error) => return Err(error),
    };
    let name = match &device {
        candle_core::Device::Cpu => "cpu".to_owned(),
        other => format!("{:?}", other.location()).to_lowercase(),
    };
    Ok((device, name))
}

fn secs(seconds: f64) -> serde_json::Value {
    ((seconds * 1000.0).round() / 1000.0).into()
}

impl Trainer {
    /// Starts the next attempt of `trigger` and runs it to its end.
    pub(crate) async fn attempt(&self, trigger: Trigger) -> anyhow::Result<()> {
        let Some(run) = store::start_run(
            &self.pool,
            &trigger,
            &self.instance,
            self.config.max_attempts,
        )
        .await?
        else {
            tracing::error!(trigger = %trigger.id, attempts = self.config.max_attempts, "trigger failed: every attempt was interrupted");
            self.metrics.run_ended("gave_up");
            return Ok(());
        };
        tracing::info!(%run, trigger = %trigger.id, kind = %trigger.kind, attempt = trigger.attempts + 1, "training run started");
        let cancel = Arc::new(AtomicBool::new(false));
        self.set_current(Some((run, cancel.clone())));
        let (progress_tx, progress_rx) = watch::channel(serde_json::Value::Null);
        // the heartbeat runs beside every phase (fetching the parent,
        // training, uploading); when the run is no longer ours it cancels it
        let heartbeat = spawn_heartbeat(
            self.pool.clone(),
            run,
            self.config.heartbeat(),
            progress_rx,
            cancel.clone(),
        );
        let out = self.config.work_dir.join("runs").join(run.to_string());
        let started = Instant::now();
        let result = self.train(run, &trigger, &out, &cancel, progress_tx).await;
        heartbeat.abort();
        let _ = std::fs::remove_dir_all(&out);
        self.set_current(None);
        let total = serde_json::json!({ "total": secs(started.elapsed().as_secs_f64()) });
        match result {
            Ok(Outcome::Registered { version, passed }) => {
                tracing::info!(%run, %version, gate_passed = passed, seconds = started.elapsed().as_secs_f64(), "version registered");
                self.metrics
                    .run_ended(if passed { "gate_passed" } else { "gate_failed" });
                if let Err(error) = announce_pending(&self.pool, &self.kafka).await {
                    tracing::warn!(
                        error = format!("{error:#}"),
                        "model.registered.v1 not announced yet; trying again on the next step"
                    );
                }
            }
            Ok(Outcome::Skipped(reason)) => {
                tracing::info!(%run, %reason, "training run skipped");
                store::end_run(&self.pool, run, "skipped", &reason, &total).await?;
                self.metrics.run_ended("skipped");
            }
            Err(error) => {
                let reason = format!("{error:#}");
                tracing::error!(%run, %reason, "training run failed");
                store::end_run(&self.pool, run, "failed", &reason, &total).await?;
                self.metrics.run_ended("failed");
            }
        }
        Ok(())
    }

    async fn train(
        &self,
        run: Uuid,
        trigger: &Trigger,
        out: &Path,
        cancel: &Arc<AtomicBool>,
        progress: watch::Sender<serde_json::Value>,
    ) -> anyhow::Result<Outcome> {
        let Some(parent) = lifecycle::promoted(&self.pool).await? else {
            return Ok(Outcome::Skipped(
                "no promoted version to train from: promote one with `kalonctl models promote VERSION`"
                    .into(),
            ));
        };
        // the window on the database's clock, which stamps the pairs
        let window_end = store::now(&self.pool).await?;
        let window_start = window_end - self.config.window();
        let (pairs, invalid) = store::pairs_in_window(&self.pool, window_start, window_end).await?;
        let mut counts = serde_json::to_value(store::counts_by_source(&pairs))?;
        counts["skipped_invalid"] = invalid.into();
        let (device, device_name) = device()?;
        let mut config = self.config.align_config();
        store::set_plan(
            &self.pool,
            run,
            &Plan {
                parent_version: Some(parent.version.clone()),
                window_start,
                window_end,
                pair_counts: counts.clone(),
                config: serde_json::json!({ "align": &config, "gate": &self.config.gate }),
                device: device_name,
            },
        )
        .await?;
        if pairs.len() < self.config.min_pairs {
            return Ok(Outcome::Skipped(format!(
                "{} pairs in the window {window_start} .. {window_end}, fewer than --min-pairs {}",
                pairs.len(),
                self.config.min_pairs
            )));
        }
        let loading = Instant::now();
        let parent_dir = kalon_registry::artifact::materialize(&parent, &self.cache)
            .await
            .map_err(|e| anyhow::anyhow!("the parent version {}: {e}", parent.version))?;
        let fetch_s = loading.elapsed().as_secs_f64();
        config.cancel = Some(cancel.clone());
        let blocking = {
            let dataset = self.config.dataset.clone();
            let gate = self.config.gate.clone();
            let min_pairs = self.config.min_pairs;
            let out = out.to_owned();
            let metrics = self.metrics.clone();
            let judge = self.judge.clone();
            let notes = serde_json::json!({
                "trainer": "kalon-trainer (Ranked DPO adapter on preference pairs)",
                "training_run_id": run.to_string(),
                "trigger": trigger.id,
                "parent_version": parent.version,
                "window_start": window_start,
                "window_end": window_end,
            });
            tokio::task::spawn_blocking(move || {
                train_and_gate(
                    &dataset,
                    &parent_dir,
                    &out,
                    &config,
                    &pairs,
                    &device,
                    notes,
                    min_pairs,
                    &gate,
                    &metrics,
                    &progress,
                    judge.as_ref(),
                )
            })
        };
        // the time budget is checked between steps; a step that hangs (a
        // GPU, a deadlock) is given up on after the budget and a margin for
        // loading and the gate
        let limit = Duration::from_secs(self.config.time_budget_s.saturating_add(1800));
        let trained = match tokio::time::timeout(limit, blocking).await {
            Ok(done) => done?,
            Err(_) => {
                cancel.store(true, Ordering::Relaxed);
                anyhow::bail!(
                    "the run did not finish within {} s (its time budget and 30 min to load and gate); given up, nothing registered",
                    limit.as_secs()
                );
            }
        };
        let mut trained = match trained {
            Ok(trained) => trained,
            Err(error) => {
                return match error.downcast::<TooFewPairs>() {
                    Ok(few) => Ok(Outcome::Skipped(format!(
                        "{few} (window {window_start} .. {window_end})"
                    ))),
                    Err(error) => Err(error),
                };
            }
        };
        trained.seconds.insert("fetch_parent".into(), secs(fetch_s));
        let uploading = Instant::now();
        let artifact = self.store.put_dir(out).await?;
        trained
            .seconds
            .insert("upload".into(), secs(uploading.elapsed().as_secs_f64()));
        self.metrics
            .phase("upload", uploading.elapsed().as_secs_f64());
        anyhow::ensure!(
            !cancel.load(Ordering::Relaxed),
            "the run was taken over or stopped before it registered; nothing registered"
        );
        counts["used"] = trained.used.into();
        counts["skipped_unknown_images"] = trained.skipped.into();
        let passed = trained.gate.passed;
        let version = register(&self.pool, run, &parent.version, artifact, trained, counts).await?;
        Ok(Outcome::Registered { version, passed })
    }
}

/// Beats for `run` every `every` with its latest progress until aborted;
/// when the run is no longer running (another leader marked it
/// interrupted) it sets `cancel` and stops.
fn spawn_heartbeat(
    pool: PgPool,
    run: Uuid,
    every: Duration,
    progress: watch::Receiver<serde_json::Value>,
    cancel: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            let latest = progress.borrow().clone();
            match store::heartbeat(&pool, run, &latest).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(%run, "the run is no longer running here (marked interrupted): cancelling it");
                    cancel.store(true, Ordering::Relaxed);
                    return;
                }
                Err(error) => {
                    tracing::warn!(%run, %error, "heartbeat not written; trying again");
                }
            }
        }
    })
}

/// Trains, exports and gates (on a blocking thread).
#[allow(clippy::too_many_arguments)]
fn train_and_gate(
    dataset: &std::path::Path,
    parent_dir: &std::path::Path,
    out: &std::path::Path,
    config: &kalon_align::train::AlignConfig,
    pairs: &[kalon_align::PreferencePair],
    device: &candle_core::Device,
    notes: serde_json::Value,
    min_pairs: usize,
    gate_config: &gate::GateConfig,
    metrics: &crate::metrics::Metrics,
    progress: &watch::Sender<serde_json::Value>,
    judge: Option<&kalon_llm::Judge>,
) -> anyhow::Result<Trained> {
    let serde_json::Value::Object(notes) = notes else {
        unreachable!("an object literal")
    };
    let job = PairsJob {
        dataset,
        parent: parent_dir,
        out,
        config,
        pairs,
        device,
        notes,
    };
    let mut last = None;
    let trained = pipeline::train_on_pairs(&job, min_pairs, &mut |p| {
        if let Progress::Step(step) = p {
            metrics.step(step.step as u64, f64::from(step.loss));
            let _ = progress.send(serde_json::to_value(step).unwrap_or_default());
            last = Some(*step);
        }
    })?;
    for (phase, seconds) in [
        ("load", trained.seconds.load),
        ("train", trained.seconds.train),
        ("export", trained.seconds.export),
    ] {
        metrics.phase(phase, seconds);
    }
    let gating = Instant::now();
    let candidate = kalon_encoder::Encoder::load(out, &kalon_encoder::EncoderOptions::from_env()?)
        .map_err(|e| anyhow::anyhow!("the exported candidate does not load: {e}"))?;
    let items = kalon_dataset::read_hpir(dataset)?;
    let report = gate::evaluate(
        &trained.parent,
        &candidate,
        &trained.data,
        &items,
        gate_config,
        judge,
        dataset,
    )?;
    let gate_s = gating.elapsed().as_secs_f64();
    metrics.phase("gate", gate_s);
    let mut seconds = serde_json::Map::new();
    seconds.insert("load".into(), secs(trained.seconds.load));
    seconds.insert("train".into(), secs(trained.seconds.train));
    seconds.insert("export".into(), secs(trained.seconds.export));
    seconds.insert("gate".into(), secs(gate_s));
    Ok(Trained {
        gate: report,
        dimension: candidate.manifest.embedding_dim,
        used: trained.used,
        skipped: trained.skipped,
        seconds,
        last: trained.last.or(last),
    })
}

/// Registers the run's version (`trained`, then gated) and ends the run as
/// succeeded, in one transaction: either all of it holds or none.
async fn register(
    pool: &PgPool,
    run: Uuid,
    parent: &str,
    artifact: kalon_registry::artifact::StoredArtifact,
    trained: Trained,
    pair_counts: serde_json::Value,
) -> anyhow::Result<String> {
    let gate = serde_json::to_value(&trained.gate)?;
    let mut tx = pool.begin().await?;
    let version = lifecycle::register_trained_in(
        &mut tx,
        NewVersion {
            parent: Some(parent.to_owned()),
            training_run_id: Some(run),
            artifact,
            dimension: trained.dimension,
            actor: "kalon-trainer".into(),
            reason: format!("training run {run}"),
        },
    )
    .await?;
    let (to, reason) = if trained.gate.passed {
        (State::GatedPassed, "the offline gate passed".to_owned())
    } else {
        (
            State::GatedFailed,
            format!("the offline gate failed: {}", trained.gate.failures()),
        )
    };
    lifecycle::transition_in(
        &mut tx,
        &version,
        to,
        "kalon-trainer gate",
        &reason,
        gate.clone(),
    )
    .await?;
    sqlx::query("UPDATE model_versions SET gate = $2 WHERE version = $1")
        .bind(&version)
        .bind(&gate)
        .execute(&mut *tx)
        .await?;
    let (trigger,): (String,) = sqlx::query_as(
        "UPDATE training_runs SET state = 'succeeded', model_version = $2, gate = $3,
           timings = $4, pair_counts = $5, progress = COALESCE($6, progress), finished_at = now()
         WHERE id = $1 AND state = 'running' RETURNING trigger_id",
    )
    .bind(run)
    .bind(&version)
    .bind(&gate)
    .bind(serde_json::Value::Object(trained.seconds))
    .bind(&pair_counts)
    .bind(trained.last.map(|s| serde_json::to_value(s).unwrap_or_default()))
    .fetch_optional(&mut *tx)
    .await?
    .ok_or_else(|| {
        anyhow::anyhow!("run {run} is no longer running (marked interrupted by another leader?); nothing registered")
    })?;
    sqlx::query("UPDATE training_triggers SET state = 'done', finished_at = now() WHERE id = $1")
        .bind(&trigger)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(version)
}

/// A registered run's version, not yet announced.
#[derive(sqlx::FromRow)]
struct Unannounced {
    run: Uuid,
    version: String,
    parent: Option<String>,
    uri: String,
    sha256: String,
    dimension: i32,
    passed: bool,
}

/// Publishes `model.registered.v1` for every registered, unannounced run.
pub(crate) async fn announce_pending(pool: &PgPool, kafka: &KafkaSettings) -> anyhow::Result<()> {
    let pending: Vec<Unannounced> = sqlx::query_as(
        "SELECT r.id AS run, v.version, v.parent, v.artifact_uri AS uri, v.artifact_sha256 AS sha256,
           v.embedding_dim AS dimension, COALESCE((v.gate->>'passed')::boolean, false) AS passed
         FROM training_runs r JOIN model_versions v ON v.training_run_id = r.id
         WHERE r.state = 'succeeded' AND r.announced_at IS NULL
         ORDER BY r.finished_at",
    )
    .fetch_all(pool)
    .await?;
    if pending.is_empty() {
        return Ok(());
    }
    let publisher =
        kalon_kafka::Publisher::new(kafka, "kalon-trainer", std::time::Duration::from_secs(30))?;
    for Unannounced {
        run,
        version,
        parent,
        uri,
        sha256,
        dimension,
        passed,
    } in pending
    {
        let event = ModelRegistered {
            // the run's id: a re-announcement is the same event to consumers
            event_id: run,
            occurred_at: Utc::now(),
            model_version: version.clone(),
            parent_version: parent,
            training_run_id: Some(run.to_string()),
            artifact_uri: uri,
            artifact_sha256: sha256,
            dimension: dimension as u32,
            gate: if passed {
                GateOutcome::Passed
            } else {
                GateOutcome::Failed
            },
        };
        if let Err(error) = event.validate() {
            // never blocks the others (nor training): left unannounced, said
            tracing::error!(%version, %run, %error, "model.registered.v1 for this version is invalid; not announced");
            continue;
        }
        publisher
            .publish(
                &kafka.topic(ModelRegistered::TOPIC),
                version.as_bytes(),
                &event.to_json(),
                kalon_kafka::headers_from(&[]),
            )
            .await?;
        sqlx::query("UPDATE training_runs SET announced_at = now() WHERE id = $1")
            .bind(run)
            .execute(pool)
            .await?;
        tracing::info!(%version, %run, gate = event.gate.as_str(), "announced on model.registered.v1");
    }
    Ok(())
}
