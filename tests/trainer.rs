//! The trainer service against a real Postgres, a real broker and a real
//! object store on the local filesystem: the schedule and the sufficiency
//! trigger, the offline gate, bad input, and leader election with a killed
//! leader.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kalon_align::{PairSource, PreferencePair};
use kalon_events::{ModelRegistered, TopicPayload};
use kalon_registry::lifecycle;
use kalon_tests::search as fixture;
use kalon_tests::{read_topic, TestEnv};
use kalon_trainer::{store, Trainer, TrainerConfig};

const WORLD_SEED: u64 = 21;
const IMAGES: usize = 400;

/// A world, its random reference model registered and promoted as `base`.
async fn setup() -> (TestEnv, fixture::SearchWorld) {
    let env = TestEnv::new().await;
    let world = fixture::search_world(IMAGES);
    fixture::index(&env, &world, "base", world.parent.path(), false).await;
    lifecycle::promote(
        &env.pool,
        "base",
        "test",
        "the first model",
        serde_json::json!({}),
    )
    .await
    .unwrap();
    (env, world)
}

fn config(env: &TestEnv, world: &fixture::SearchWorld, work: &Path) -> TrainerConfig {
    let mut config = TrainerConfig::new(
        &env.database_url,
        &env.kafka.brokers,
        &env.kafka.topic_prefix,
        &world.world.path().display().to_string(),
    );
    config.work_dir = work.to_owned();
    config.artifact_store = Some(format!("file://{}", work.join("store").display()));
    config.poll_ms = 200;
    config.steps = 60;
    config.min_pairs = 100;
    // a schedule that does not tick during a test unless it sets one
    config.schedule = "0 0 0 1 1 *".into();
    config
}

/// `n` pairs of training queries whose winner the world's people find
/// more beautiful than the loser (the other way round with `inverted`),
/// plus `unknown` pairs naming an image the catalog does not have.
fn oracle_pairs(n: usize, inverted: bool, unknown: usize, seed: u64) -> Vec<PreferencePair> {
    let mut pairs: Vec<PreferencePair> =
        kalon_world::oracle_pairs(WORLD_SEED, IMAGES, n, 0.1, seed)
            .into_iter()
            .enumerate()
            .map(|(i, p)| {
                let (winner, loser) = if inverted {
                    (p.worse, p.better)
                } else {
                    (p.better, p.worse)
                };
                PreferencePair {
                    query: p.query,
                    winner,
                    loser,
                    source: if i % 3 == 0 {
                        PairSource::Click
                    } else {
                        PairSource::Rating
                    },
                    weight: 1.0,
                    provenance: serde_json::json!({ "test": true }),
                }
            })
            .collect();
    let first = pairs[0].clone();
    for i in 0..unknown {
        pairs.push(PreferencePair {
            query: first.query.clone(),
            winner: format!("no-such-image-{i}"),
            loser: first.loser.clone(),
            source: PairSource::Judgment,
            weight: 1.0,
            provenance: serde_json::json!({}),
        });
    }
    pairs
}

async fn insert_pairs(env: &TestEnv, pairs: &[PreferencePair]) {
    store::insert_pairs(&env.pool, pairs).await.unwrap();
}

async fn count(env: &TestEnv, sql: &str) -> i64 {
    let (n,): (i64,) = sqlx::query_as(sql).fetch_one(&env.pool).await.unwrap();
    n
}

/// A trainer in this process until the returned sender fires.
fn start(
    config: TrainerConfig,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    start_judged(config, None)
}

/// [`start`] with an LMM judge in the gate.
fn start_judged(
    config: TrainerConfig,
    llm: Option<kalon_llm::LlmConfig>,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let mut trainer = Trainer::build(config).await.expect("trainer builds");
        if let Some(llm) = llm {
            trainer = trainer.with_judge(llm).expect("judge");
        }
        trainer
            .run(async {
                let _ = stopped.await;
            })
            .await
            .expect("trainer runs");
    });
    (stop, task)
}

async fn wait_trigger(env: &TestEnv, id: &str, timeout: Duration) -> String {
    let start = Instant::now();
    loop {
        if let Some((state, _)) = store::trigger_state(&env.pool, id).await.unwrap() {
            if state != "pending" {
                for run in store::runs_of(&env.pool, id).await.unwrap() {
                    eprintln!("{id}: run {} {}: {:?}", run.attempt, run.state, run.reason);
                }
                return state;
            }
        }
        assert!(
            start.elapsed() < timeout,
            "trigger {id} still pending after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn registered_events(env: &TestEnv, count: usize) -> Vec<ModelRegistered> {
    read_topic(
        &env.kafka,
        &env.kafka.topic(ModelRegistered::TOPIC),
        count,
        Duration::from_secs(20),
    )
    .into_iter()
    .map(|m| ModelRegistered::decode(&m.payload).expect("a valid model.registered.v1"))
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_scheduled_tick_trains_only_when_enough_new_pairs_arrived() {
    let (env, world) = setup().await;
    let work = tempfile::tempdir().unwrap();
    let mut config = config(&env, &world, work.path());
    config.schedule = "*/2 * * * * *".into();
    config.min_new_pairs = 300;
    let (stop, task) = start(config);

    // ticks pass with no pairs: nothing is triggered
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        count(&env, "SELECT count(*) FROM training_triggers").await,
        0
    );

    insert_pairs(&env, &oracle_pairs(400, false, 7, 1)).await;
    let start = Instant::now();
    let trigger = loop {
        let ids: Vec<(String,)> = sqlx::query_as("SELECT id FROM training_triggers")
            .fetch_all(&env.pool)
            .await
            .unwrap();
        if let Some((id,)) = ids.into_iter().next() {
            break id;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no tick triggered training"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(trigger.starts_with("cron:"), "{trigger}");
    assert_eq!(
        wait_trigger(&env, &trigger, Duration::from_secs(180)).await,
        "done"
    );
    let runs = store::runs_of(&env.pool, &trigger).await.unwrap();
    assert_eq!(runs.len(), 1);
    let run = &runs[0];
    assert_eq!(run.state, "succeeded", "{:?}", run.reason);
    assert_eq!(run.parent_version.as_deref(), Some("base"));
    assert_eq!(run.device.as_deref(), Some("cpu"));
    // the 7 unknown ones, and those naming a held-out image
    let (used, skipped) = (
        run.pair_counts["used"].as_u64().unwrap(),
        run.pair_counts["skipped_unknown_images"].as_u64().unwrap(),
    );
    assert!(skipped >= 7, "{}", run.pair_counts);
    assert_eq!(used + skipped, 407, "{}", run.pair_counts);
    assert_eq!(run.pair_counts["judgment"], 7);
    for phase in ["load", "train", "export", "gate", "upload"] {
        assert!(
            run.timings[phase].as_f64().is_some(),
            "{phase} in {}",
            run.timings
        );
    }
    assert_eq!(run.progress["step"], 60);
    eprintln!("gate: {:#}", run.gate.clone().unwrap());
    let version = run.model_version.clone().expect("a version");
    let row = kalon_registry::store::version(&env.pool, &version)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.parent.as_deref(), Some("base"));
    let history = lifecycle::history(&env.pool, &version).await.unwrap();
    assert_eq!(history.len(), 2, "{history:?}");
    let events = registered_events(&env, 1);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].model_version, version);
    assert_eq!(events[0].parent_version.as_deref(), Some("base"));
    assert_eq!(events[0].training_run_id, Some(run.id.to_string()));

    // more ticks, no new pairs: no new trigger; then fewer than 300 new: none either
    tokio::time::sleep(Duration::from_secs(5)).await;
    insert_pairs(&env, &oracle_pairs(100, false, 0, 2)).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        count(&env, "SELECT count(*) FROM training_triggers").await,
        1
    );
    assert_eq!(count(&env, "SELECT count(*) FROM training_runs").await, 1);

    let _ = stop.send(());
    task.await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_candidate_trained_on_inverted_pairs_fails_the_gate_and_is_never_deployable() {
    let (env, world) = setup().await;
    let work = tempfile::tempdir().unwrap();
    let mut config = config(&env, &world, work.path());
    config.steps = 300;
    // a gate with no slack, so the test's small world decides with it
    config.gate.aesthetic_tolerance = 0.0;
    config.gate.z = 1.0;
    // the world's simulated LMM judges the rows too
    let mut sim = kalon_sim_llm::SimConfig::new(WORLD_SEED, IMAGES);
    sim.world_dir = Some(world.world.path().to_owned());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sim = kalon_sim_llm::SimServer::start(sim, listener)
        .await
        .unwrap();
    let llm = kalon_llm::LlmConfig::new(sim.base_url(), "kalon-sim-1");
    let (stop, task) = start_judged(config, Some(llm));

    // the same gate passes a candidate trained on the people's preferences
    insert_pairs(&env, &oracle_pairs(3000, false, 0, 3)).await;
    let good = store::request_manual(&env.pool, "test", "the people's pairs")
        .await
        .unwrap();
    assert_eq!(
        wait_trigger(&env, &good, Duration::from_secs(180)).await,
        "done"
    );
    let run = store::runs_of(&env.pool, &good).await.unwrap().remove(0);
    let gate = run.gate.clone().expect("gate figures");
    assert_eq!(gate["passed"], true, "{gate:#}");
    let judged = &gate["judge"];
    assert_eq!(judged["queries"], 40, "{gate:#}");
    for aspect in ["relevance", "aesthetic"] {
        let n: u64 = ["win", "similar", "loss"]
            .iter()
            .map(|k| judged[aspect][k].as_u64().unwrap())
            .sum();
        assert_eq!(n, 40, "{gate:#}");
    }
    // the judge, shown both rows in both orders, prefers the candidate's
    assert!(
        judged["aesthetic"]["win"].as_u64() > judged["aesthetic"]["loss"].as_u64(),
        "{gate:#}"
    );
    let passed = run.model_version.clone().unwrap();

    // and fails one trained on the same pairs inverted
    sqlx::query("DELETE FROM preference_pairs")
        .execute(&env.pool)
        .await
        .unwrap();
    insert_pairs(&env, &oracle_pairs(3000, true, 0, 3)).await;
    let trigger = store::request_manual(&env.pool, "test", "inverted pairs")
        .await
        .unwrap();
    assert_eq!(
        wait_trigger(&env, &trigger, Duration::from_secs(180)).await,
        "done"
    );
    let run = store::runs_of(&env.pool, &trigger).await.unwrap().remove(0);
    let version = run.model_version.clone().expect("registered");
    let gate = run.gate.clone().expect("gate figures");
    assert_eq!(gate["passed"], false, "{gate:#}");
    let aesthetic = gate["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["metric"] == "hpir_aesthetic")
        .unwrap();
    assert_eq!(aesthetic["passed"], false, "{gate:#}");
    assert!(aesthetic["change"].as_f64().unwrap() < -0.01, "{gate:#}");
    // and the judge prefers the parent's rows to the inverted candidate's
    let judged = &gate["judge"]["aesthetic"];
    assert!(judged["loss"].as_u64() > judged["win"].as_u64(), "{gate:#}");
    let judge_check = gate["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["metric"] == "judge_aesthetic_net_win")
        .unwrap();
    assert_eq!(judge_check["passed"], false, "{gate:#}");
    let row = kalon_registry::store::version(&env.pool, &version)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.state, lifecycle::State::GatedFailed);
    let events = registered_events(&env, 2);
    let gates: Vec<(&str, kalon_events::GateOutcome)> = events
        .iter()
        .map(|e| (e.model_version.as_str(), e.gate))
        .collect();
    assert_eq!(
        gates,
        vec![
            (passed.as_str(), kalon_events::GateOutcome::Passed),
            (version.as_str(), kalon_events::GateOutcome::Failed)
        ]
    );
    let refused = kalon_registry::store::set_deployment(&env.pool, &version, "canary", 1.0).await;
    assert!(refused.is_err(), "a gated_failed version was deployed");
    let _ = stop.send(());
    task.await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn too_little_data_skips_with_a_reason_and_a_run_past_its_time_budget_registers_nothing() {
    let (env, world) = setup().await;
    let work = tempfile::tempdir().unwrap();
    let mut config = config(&env, &world, work.path());
    config.time_budget_s = 0;
    insert_pairs(&env, &oracle_pairs(30, false, 0, 4)).await;
    let small = store::request_manual(&env.pool, "test", "too little")
        .await
        .unwrap();
    let (stop, task) = start(config);
    assert_eq!(
        wait_trigger(&env, &small, Duration::from_secs(60)).await,
        "skipped"
    );
    let runs = store::runs_of(&env.pool, &small).await.unwrap();
    assert_eq!(runs.len(), 1, "a skipped trigger is not attempted again");
    let reason = runs[0].reason.clone().unwrap();
    assert!(
        reason.contains("30 pairs") && reason.contains("--min-pairs 100"),
        "{reason}"
    );

    insert_pairs(&env, &oracle_pairs(400, false, 0, 5)).await;
    let diverging = store::request_manual(&env.pool, "test", "no time to train")
        .await
        .unwrap();
    assert_eq!(
        wait_trigger(&env, &diverging, Duration::from_secs(120)).await,
        "failed"
    );
    let runs = store::runs_of(&env.pool, &diverging).await.unwrap();
    assert_eq!(runs.len(), 1, "a failed trigger is not a failure loop");
    let reason = runs[0].reason.clone().unwrap();
    assert!(
        reason.contains("time budget of 0 s") && reason.contains("nothing is exported"),
        "{reason}"
    );
    assert_eq!(
        count(
            &env,
            "SELECT count(*) FROM model_versions WHERE training_run_id IS NOT NULL"
        )
        .await,
        0
    );
    let _ = stop.send(());
    task.await.unwrap();
    env.cleanup().await;
}

struct Replica {
    name: &'static str,
    child: std::process::Child,
}

fn spawn_replica(
    binary: &Path,
    name: &'static str,
    env: &TestEnv,
    world: &fixture::SearchWorld,
    work: &Path,
) -> Replica {
    let child = std::process::Command::new(binary)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", std::env::var("HOME").unwrap_or_default())
        .envs(std::env::var("KALON_CACHE_DIR").map(|d| ("KALON_CACHE_DIR", d)))
        .envs(std::env::var("ORT_DYLIB_PATH").map(|d| ("ORT_DYLIB_PATH", d)))
        .env("RUST_LOG", "info")
        .args([
            "--database-url",
            &env.database_url,
            "--brokers",
            &env.kafka.brokers,
            "--topic-prefix",
            &env.kafka.topic_prefix,
            "--dataset",
            &world.world.path().display().to_string(),
            "--work-dir",
            &work.join(name).display().to_string(),
            "--artifact-store",
            &format!("file://{}", work.join("store").display()),
            "--schedule",
            "0 0 0 1 1 *",
            "--min-pairs",
            "100",
            "--steps",
            "3000",
            "--poll-ms",
            "200",
            "--stale-after-s",
            "3",
            "--instance-id",
            name,
            "--health-addr",
            &format!("127.0.0.1:{}", kalon_tests::free_port()),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(work.join(format!("{name}.log"))).unwrap())
        .spawn()
        .expect("start kalon-trainer");
    Replica { name, child }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_train_a_trigger_once_even_when_the_leader_is_killed_mid_run() {
    let binary: PathBuf = kalon_tests::workspace_binary("kalon-trainer");
    let (env, world) = setup().await;
    let work = tempfile::tempdir().unwrap();
    insert_pairs(&env, &oracle_pairs(400, false, 0, 6)).await;
    let mut replicas = vec![
        spawn_replica(&binary, "replica-a", &env, &world, work.path()),
        spawn_replica(&binary, "replica-b", &env, &world, work.path()),
    ];
    let trigger = store::request_manual(&env.pool, "test", "kill the leader")
        .await
        .unwrap();

    // wait until the leader is training (a heartbeat with a step)
    let start = Instant::now();
    let leader = loop {
        let runs = store::runs_of(&env.pool, &trigger).await.unwrap();
        if let Some(run) = runs.iter().find(|r| r.progress["step"].as_u64() > Some(0)) {
            break run.owner.clone();
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no replica started training: {}",
            std::fs::read_to_string(work.path().join("replica-a.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let killed = replicas.iter().position(|r| r.name == leader).unwrap();
    replicas[killed].child.kill().unwrap(); // SIGKILL
    replicas[killed].child.wait().unwrap();

    assert_eq!(
        wait_trigger(&env, &trigger, Duration::from_secs(300)).await,
        "done"
    );
    let runs = store::runs_of(&env.pool, &trigger).await.unwrap();
    let states: Vec<(&str, &str)> = runs
        .iter()
        .map(|r| (r.state.as_str(), r.owner.as_str()))
        .collect();
    let survivor = replicas[1 - killed].name;
    assert_eq!(
        states,
        vec![("interrupted", leader.as_str()), ("succeeded", survivor)],
        "{runs:#?}"
    );
    assert!(runs[0].reason.as_deref().unwrap().contains("stopped"));
    assert_eq!(
        count(
            &env,
            "SELECT count(*) FROM model_versions WHERE training_run_id IS NOT NULL"
        )
        .await,
        1,
        "the trigger was trained more than once"
    );
    for mut replica in replicas {
        let _ = replica.child.kill();
        let _ = replica.child.wait();
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_generation_trains_from_the_promoted_artifact_and_a_tampered_parent_fails_the_run()
{
    let (env, world) = setup().await;
    let work = tempfile::tempdir().unwrap();
    let config = config(&env, &world, work.path());
    insert_pairs(&env, &oracle_pairs(400, false, 0, 8)).await;
    let (stop, task) = start(config);
    let first = store::request_manual(&env.pool, "test", "generation 1")
        .await
        .unwrap();
    assert_eq!(
        wait_trigger(&env, &first, Duration::from_secs(120)).await,
        "done"
    );
    let gen1 = store::runs_of(&env.pool, &first).await.unwrap()[0]
        .model_version
        .clone()
        .unwrap();
    // what the canary controller will do: index it, promote it
    for (to, why) in [
        (lifecycle::State::Indexed, "indexed"),
        (lifecycle::State::Promoted, "won its canary"),
    ] {
        lifecycle::transition(&env.pool, &gen1, to, "test", why, serde_json::json!({}))
            .await
            .unwrap();
    }
    let second = store::request_manual(&env.pool, "test", "generation 2")
        .await
        .unwrap();
    assert_eq!(
        wait_trigger(&env, &second, Duration::from_secs(120)).await,
        "done"
    );
    let run2 = store::runs_of(&env.pool, &second).await.unwrap().remove(0);
    assert_eq!(run2.parent_version.as_deref(), Some(gen1.as_str()));
    let gen2 = run2.model_version.clone().unwrap();
    let lineage = kalon_registry::lineage::why(&env.pool, &gen2)
        .await
        .unwrap();
    let chain = serde_json::to_value(&lineage).unwrap();
    let names: Vec<&str> = chain["generations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["version"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        vec![gen2.as_str(), gen1.as_str(), "base"],
        "{chain:#}"
    );

    // gen 2 promoted; its artifact tampered in the store: the next run
    // fails on the parent, naming its hash, and registers nothing
    for (to, why) in [
        (lifecycle::State::Indexed, "indexed"),
        (lifecycle::State::Promoted, "won its canary"),
    ] {
        lifecycle::transition(&env.pool, &gen2, to, "test", why, serde_json::json!({}))
            .await
            .unwrap();
    }
    let row = kalon_registry::store::version(&env.pool, &gen2)
        .await
        .unwrap()
        .unwrap();
    let sha = row.artifact_sha256.clone().unwrap();
    let stored = work.path().join("store/encoders").join(&sha);
    let manifest = stored.join(kalon_encoder::MANIFEST_FILE);
    let mut text = std::fs::read_to_string(&manifest).unwrap();
    text.push(' ');
    std::fs::write(&manifest, text).unwrap();
    // the trainer's cache holds a verified copy: that copy is fine, so
    // remove it to make the trainer fetch the tampered one
    let _ = std::fs::remove_dir_all(kalon_registry::artifact::default_cache_dir().join(&sha));
    let third = store::request_manual(&env.pool, "test", "generation 3")
        .await
        .unwrap();
    assert_eq!(
        wait_trigger(&env, &third, Duration::from_secs(120)).await,
        "failed"
    );
    let reason = store::runs_of(&env.pool, &third).await.unwrap()[0]
        .reason
        .clone()
        .unwrap();
    assert!(reason.contains(&gen2) && reason.contains(&sha), "{reason}");
    let _ = stop.send(());
    task.await.unwrap();
    env.cleanup().await;
}
