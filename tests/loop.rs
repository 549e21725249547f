//! The closed loop with every service as its own process (`kalonctl serve
//! <service>` under kalonctl's supervisor, as `kalonctl up` runs them):
//! simulated people search over HTTP and click, their feedback becomes
//! pairs, the trainer trains, the gate and the canary judge, and a trained
//! version is promoted while an injected bad one is rolled back, with no
//! person involved. Then the same under chaos: every service SIGKILLed in
//! turn, the broker and Postgres restarted, while the people keep searching.
//! Real Postgres, a real Kafka-API broker (tansu), real HTTP.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kalon_canary::store as canary_store;
use kalon_events::CanaryAction;
use kalon_registry::lifecycle::State;
use kalon_registry::store;
use kalon_stack::{Broker, PgCluster, Storage};
use kalon_tests::{free_port, fresh_database, tag, workspace_binary, TestEnv};
use kalonctl::demo::{close_the_loop, Closed, LoopOptions};
use kalonctl::supervisor::{Chaos, Happening, InfraRestart};
use kalonctl::up::{self, LoopSite, Pace, Ports};
use kalonctl::Endpoints;
use sqlx::PgPool;

const IMAGES: usize = 1_000;

/// The world and the reference model pretrained on it, made once per
/// target directory and shared by the loop tests (pretraining takes minutes
/// in a debug build), linked into `dir` where the bootstrap looks for them.
fn shared_world(dir: &Path) {
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("loop-world-1-{IMAGES}"));
    let (world, model) = (cache.join("world"), cache.join("models").join("ref-1"));
    if !world.join("world.json").exists() {
        kalonctl::sim::generate(1, IMAGES, 64, &world).unwrap();
    }
    if !model.join(kalon_encoder::MANIFEST_FILE).exists() {
        let mut pretrain = kalonctl::model::PretrainArgs::defaults();
        pretrain.init_seed = Some(1);
        kalonctl::model::pretrain(&world, &model, &pretrain).unwrap();
    }
    std::fs::create_dir_all(dir.join("models")).unwrap();
    std::os::unix::fs::symlink(&world, dir.join("world")).unwrap();
    std::os::unix::fs::symlink(&model, dir.join("models").join("ref-1")).unwrap();
}

fn site(database_url: &str, kafka: &kalon_kafka::KafkaSettings, dir: &Path) -> LoopSite {
    shared_world(dir);
    LoopSite {
        endpoints_db: database_url.to_owned(),
        brokers: kafka.brokers.clone(),
        topic_prefix: kafka.topic_prefix.clone(),
        dir: dir.to_owned(),
        ports: Ports::free(),
        pace: Pace::Demo,
        llm_base_url: None,
        admin_token: Some(format!("token-{}", tag())),
        group_prefix: kafka.topic_prefix.clone(),
        world_seed: 1,
        program: workspace_binary("kalonctl"),
    }
}

fn options(seed: u64) -> LoopOptions {
    LoopOptions {
        images: IMAGES,
        rate: 15.0,
        users_seed: seed,
        timeout: Duration::from_secs(14 * 60),
        inject_after: Duration::from_secs(6 * 60),
        need_promotion: true,
        linger: Duration::ZERO,
    }
}

/// What the registry and the canary's decisions must say after the loop
/// closed: the trained version promoted on evidence, from pairs the
/// people's clicks made; the bad version rolled back on evidence.
async fn assert_closed(pool: &PgPool, closed: &Closed) {
    assert_promoted(pool, closed).await;
    assert_rolled_back(pool, closed).await;
    let canary = canary_store::by_candidate(pool, &closed.bad)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(canary.stable.as_deref(), Some(closed.promoted.as_str()));
}

/// A version the trainer made from the people's clicks.
async fn assert_trained_on_clicks(pool: &PgPool, version: &str) {
    let row = store::version(pool, version).await.unwrap().unwrap();
    let run = row
        .training_run_id
        .expect("the promoted version was trained by the trainer");
    let (run_state, pair_counts, gate): (String, serde_json::Value, serde_json::Value) =
        sqlx::query_as("SELECT state, pair_counts, gate FROM training_runs WHERE id = $1")
            .bind(run)
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(run_state, "succeeded");
    assert!(gate.get("passed").is_some(), "gate figures stored: {gate}");
    assert!(
        pair_counts["click"].as_u64().unwrap_or(0) > 0,
        "the run trained on click pairs: {pair_counts}"
    );
    // those clicks were the simulated people's, on what search served them
    let (click_pairs,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM preference_pairs p JOIN impressions i
           ON i.request_id = p.provenance->>'request_id'
         WHERE p.source = 'click' AND i.user_id LIKE 'user-%'",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert!(click_pairs > 0);
}

async fn assert_promoted(pool: &PgPool, closed: &Closed) {
    assert_trained_on_clicks(pool, &closed.promoted).await;
    let promoted = store::version(pool, &closed.promoted)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(promoted.state, State::Promoted);
    assert_eq!(promoted.gate.as_ref().unwrap()["passed"], true);
    // the previous stable retired; the promoted one serves everything
    let before = store::version(pool, &closed.stable_before)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(before.state, State::Retired);
    let deployments = store::deployments(pool).await.unwrap();
    let serving: Vec<(&str, f64)> = deployments
        .iter()
        .filter(|d| d.weight > 0.0)
        .map(|d| (d.model_version.as_str(), d.weight))
        .collect();
    assert!(
        serving
            .iter()
            .any(|&(v, w)| v == closed.promoted && w > 0.4),
        "{serving:?}"
    );

    // every move automatic; the promotion on evidence with enough data
    let canary = canary_store::by_candidate(pool, &closed.promoted)
        .await
        .unwrap()
        .unwrap();
    let moves = canary_store::decisions(pool, canary.id, true)
        .await
        .unwrap();
    let actions: Vec<CanaryAction> = moves.iter().map(|d| d.action).collect();
    assert_eq!(
        actions,
        [
            CanaryAction::Start,
            CanaryAction::Advance,
            CanaryAction::Promote
        ],
        "{moves:#?}"
    );
    assert!(moves
        .iter()
        .all(|d| d.automatic && d.actor == "kalon-canary"));
    let promote = moves.last().unwrap();
    assert!(
        promote.evidence.iter().any(|e| e.enough_data
            && matches!(e.decision.as_str(), "non_inferior" | "significantly_better")),
        "promoted without an acting signal: {:#?}",
        promote.evidence
    );
}

/// The bad version rolled back automatically, on significant evidence,
/// and serving nothing.
async fn assert_rolled_back(pool: &PgPool, closed: &Closed) {
    let deployments = store::deployments(pool).await.unwrap();
    assert!(
        !deployments
            .iter()
            .any(|d| d.model_version == closed.bad && d.weight > 0.0),
        "{deployments:?}"
    );
    let bad = store::version(pool, &closed.bad).await.unwrap().unwrap();
    assert_eq!(bad.state, State::RolledBack);
    let canary = canary_store::by_candidate(pool, &closed.bad)
        .await
        .unwrap()
        .unwrap();
    let moves = canary_store::decisions(pool, canary.id, true)
        .await
        .unwrap();
    let rollback = moves
        .iter()
        .find(|d| d.action == CanaryAction::Rollback)
        .expect("a rollback decision");
    assert!(rollback.automatic);
    assert!(
        rollback
            .evidence
            .iter()
            .any(|e| e.enough_data && e.decision == "significantly_worse"),
        "rolled back without significant evidence: {} {:#?}",
        rollback.reason,
        rollback.evidence
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_loop_promotes_a_model_trained_on_the_peoples_clicks_and_rolls_back_a_bad_one() {
    let env = TestEnv::new().await;
    let dir = tempfile::tempdir().unwrap();
    let site = site(&env.database_url, &env.kafka, dir.path());
    let running = up::start(
        Endpoints {
            database_url: env.database_url.clone(),
            kafka: env.kafka.clone(),
        },
        site,
        IMAGES,
    )
    .await
    .unwrap();
    let closed = close_the_loop(&running, &options(11)).await;
    if let Ok(closed) = &closed {
        // the console the supervisor runs, in a browser, before it stops
        look_at_the_console(&running.site, closed).await;
    }
    running.supervisor.stop().await;
    let closed = closed.unwrap();
    assert_closed(&env.pool, &closed).await;
    // no service needed a restart
    assert!(
        running.supervisor.restarts().values().all(|&n| n == 0),
        "{:?}",
        running.supervisor.restarts()
    );
    env.cleanup().await;
}

/// The console (`kalonctl serve console` under the supervisor) in headless
/// chromium after the loop closed: the overview serves the promoted
/// version to everyone and shows pairs and a training run; the canary page
/// lists the promotion and the rollback; the promoted version's lineage
/// names the run that made it and goes back to the version it replaced.
/// Screenshots in `$CARGO_TARGET_TMPDIR/console-screenshots/loop-*.png`.
async fn look_at_the_console(site: &LoopSite, closed: &Closed) {
    let wait = Duration::from_secs(60);
    let url = site.console_url();
    let shots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("console-screenshots");
    let browser = kalon_tests::webdriver::Browser::start().await;
    browser.goto(&format!("{url}/#overview")).await;
    browser
        .wait_until(
            &format!(
                "(document.querySelector('#serving tr[data-version=\"{}\"]') || {{}}).textContent?.includes('100%') \
                 && !document.querySelector('#stage-pairs').textContent.includes('none yet') \
                 && !document.querySelector('#stage-trainer').textContent.includes('no run yet')",
                closed.promoted
            ),
            wait,
            "the overview serves the promoted version to everyone, with pairs and a run",
        )
        .await;
    browser.screenshot(&shots.join("loop-overview.png")).await;
    browser.goto(&format!("{url}/#canary")).await;
    browser
        .wait_until(
            &format!(
                "(document.querySelector('#canary-list tr[data-candidate=\"{}\"]') || {{}}).textContent?.includes('promoted') \
                 && (document.querySelector('#canary-list tr[data-candidate=\"{}\"]') || {{}}).textContent?.includes('rolled back')",
                closed.promoted, closed.bad
            ),
            wait,
            "the canary page lists the promotion and the rollback",
        )
        .await;
    browser.screenshot(&shots.join("loop-canary.png")).await;
    browser.goto(&format!("{url}/#models")).await;
    let row = format!("#models tr[data-version=\"{}\"]", closed.promoted);
    browser
        .wait_until(
            &format!("document.querySelector('{row}')"),
            wait,
            "the registry lists the promoted version",
        )
        .await;
    browser.click(&row).await;
    browser
        .wait_until(
            &format!(
                "(document.querySelector('#lineage .generation[data-version=\"{}\"]') || {{}}).textContent?.includes(' run by ') \
                 && document.querySelector('#lineage .generation[data-version=\"{}\"]')",
                closed.promoted, closed.stable_before
            ),
            wait,
            "the promoted version's lineage: its run, back to the version it replaced",
        )
        .await;
    browser.screenshot(&shots.join("loop-models.png")).await;
    browser.close().await;
}

/// Postgres and a tansu broker of this test's own, which it can restart.
struct Restartable {
    cluster: Arc<PgCluster>,
    broker: Arc<Mutex<Broker>>,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

fn restartable() -> Restartable {
    let pg_dir = tempfile::tempdir().unwrap();
    let cluster = PgCluster::open(&pg_dir.path().join("pg"), free_port())
        .unwrap()
        .stop_on_drop();
    cluster.start().unwrap();
    let broker_dir = tempfile::tempdir().unwrap();
    let binary = kalon_stack::tools::find_tansu().unwrap();
    let broker = Broker::start(
        &binary,
        free_port(),
        Storage::Sqlite("tansu.db".into()),
        broker_dir.path(),
    )
    .unwrap();
    Restartable {
        cluster: Arc::new(cluster),
        broker: Arc::new(Mutex::new(broker)),
        _dirs: (pg_dir, broker_dir),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_chaos_the_loop_loses_and_duplicates_nothing_and_still_closes() {
    let parts = restartable();
    let (database_url, pool) = fresh_database(&parts.cluster.url("postgres")).await;
    let brokers = parts.broker.lock().unwrap().address();
    let kafka = kalon_kafka::KafkaSettings::new(brokers, format!("t{}.", tag()));
    kalon_kafka::create_topics(&kafka).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let site = site(&database_url, &kafka, dir.path());
    let running = up::start(
        Endpoints {
            database_url: database_url.clone(),
            kafka: kafka.clone(),
        },
        site,
        IMAGES,
    )
    .await
    .unwrap();
    let services: BTreeSet<String> = running
        .supervisor
        .status()
        .into_iter()
        .map(|s| s.name)
        .filter(|n| n != "sim-llm")
        .collect();
    let (broker, cluster) = (parts.broker.clone(), parts.cluster.clone());
    let infra: Vec<InfraRestart> = vec![
        (
            "the broker".into(),
            Arc::new(move || broker.lock().unwrap().restart()),
        ),
        (
            "postgres".into(),
            Arc::new(move || {
                cluster.stop()?;
                cluster.start()
            }),
        ),
    ];
    let chaos_started = Instant::now();
    running.supervisor.start_chaos(Chaos {
        every: Duration::from_secs(15),
        seed: 5,
        infra,
        spare: vec!["sim-llm".into()],
        max_kills: Some(services.len()),
    });
    // the bad model at once, so that its canary runs while the services
    // are killed; the loop ends once it is rolled back, a run trained on
    // the people's pairs, and every service was killed
    let options = LoopOptions {
        inject_after: Duration::ZERO,
        need_promotion: false,
        ..options(12)
    };
    // and the canary controller killed once more in the middle of a canary
    let (closed, mid_canary) = tokio::join!(
        close_the_loop(&running, &options),
        kill_mid_canary(&pool, &running.supervisor)
    );
    let happenings = running.supervisor.happenings_since(chaos_started);
    running.supervisor.stop().await;
    let closed = closed.unwrap();

    // every service was killed, both infra parts restarted
    let killed: BTreeSet<String> = happenings
        .iter()
        .filter_map(|h| match h {
            Happening::ChaosKill { service, .. } => Some(service.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(killed, services, "{happenings:#?}");
    let restarted: BTreeSet<&str> = happenings
        .iter()
        .filter_map(|h| match h {
            Happening::InfraRestarted { part, .. } => Some(part.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(
        restarted,
        BTreeSet::from(["the broker", "postgres"]),
        "{happenings:#?}"
    );

    assert_rolled_back(&pool, &closed).await;
    assert_trained_on_clicks(&pool, &closed.promoted).await;
    // the canary killed mid-way went on from where it was, and ended
    let (id, step) = mid_canary.expect("a canary ran while the test could kill its controller");
    let canary = canary_store::recent(&pool, 100)
        .await
        .unwrap()
        .into_iter()
        .find(|c| c.id == id)
        .unwrap();
    assert!(canary.status.finished(), "{canary:?}");
    assert!(canary.step >= step, "{canary:?} was at step {step}");
    assert_exactly_once(&pool, &closed).await;
    pool.close().await;
}

/// Kills the canary controller once, after a running canary's first hold
/// (mid-canary); returns that canary and its step then.
async fn kill_mid_canary(
    pool: &PgPool,
    supervisor: &kalonctl::supervisor::Supervisor,
) -> Option<(i64, u32)> {
    let deadline = Instant::now() + Duration::from_secs(10 * 60);
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let Ok(Some(canary)) = canary_store::in_flight(pool).await else {
            continue;
        };
        let Ok(decisions) = canary_store::decisions(pool, canary.id, false).await else {
            continue;
        };
        if decisions.iter().any(|d| d.action == CanaryAction::Hold) {
            supervisor.kill("canary").ok()?;
            return Some((canary.id, canary.step));
        }
    }
    None
}

/// Every search a person got an answer to has exactly one impression, and
/// every click and rating search acknowledged exactly one row; no request
/// logged twice; no click pair made twice; no trigger trained twice; each
/// canary started once and moved forward only.
async fn assert_exactly_once(pool: &PgPool, closed: &Closed) {
    let requests: Vec<String> = closed.answered.iter().map(|(r, _)| r.clone()).collect();
    let feedback: Vec<uuid::Uuid> = closed
        .answered
        .iter()
        .flat_map(|(_, ids)| ids.iter().map(|id| id.parse().unwrap()))
        .collect();
    assert!(!requests.is_empty() && !feedback.is_empty());
    // ingest may still be draining what the last sessions sent
    let deadline = Instant::now() + Duration::from_secs(120);
    let (impressions, feedback_rows) = loop {
        let impressions: Vec<(String, i64)> = sqlx::query_as(
            "SELECT request_id, count(*) FROM impressions WHERE request_id = ANY($1) GROUP BY request_id",
        )
        .bind(&requests)
        .fetch_all(pool)
        .await
        .unwrap();
        let feedback_rows: Vec<(uuid::Uuid, i64)> = sqlx::query_as(
            "SELECT event_id, count(*) FROM (
               SELECT event_id FROM clicks WHERE event_id = ANY($1)
               UNION ALL SELECT event_id FROM ratings WHERE event_id = ANY($1)) f
             GROUP BY event_id",
        )
        .bind(&feedback)
        .fetch_all(pool)
        .await
        .unwrap();
        let done = impressions.len() == requests.len() && feedback_rows.len() == feedback.len();
        if done || Instant::now() > deadline {
            break (impressions, feedback_rows);
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    let impressions: HashMap<String, i64> = impressions.into_iter().collect();
    let missing = requests
        .iter()
        .filter(|r| !impressions.contains_key(*r))
        .count();
    assert_eq!(missing, 0, "{missing} answered searches have no impression");
    assert!(impressions.values().all(|&n| n == 1));
    let feedback_rows: HashMap<uuid::Uuid, i64> = feedback_rows.into_iter().collect();
    let lost = feedback
        .iter()
        .filter(|id| !feedback_rows.contains_key(id))
        .count();
    assert_eq!(lost, 0, "{lost} acknowledged clicks/ratings never landed");
    assert!(feedback_rows.values().all(|&n| n == 1));

    let doubled: Vec<(String,)> = sqlx::query_as(
        "SELECT request_id FROM impressions GROUP BY request_id HAVING count(*) > 1",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert!(doubled.is_empty(), "impressions logged twice: {doubled:?}");
    let doubled: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT c.request_id, c.image_id, count(*)::text FROM clicks c
         GROUP BY c.request_id, c.image_id HAVING count(*) > 1",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert!(
        doubled.is_empty(),
        "a person's click logged twice: {doubled:?}"
    );
    let doubled: Vec<(Option<String>, String, String)> = sqlx::query_as(
        "SELECT provenance->>'request_id', winner, loser FROM preference_pairs
         WHERE source = 'click' GROUP BY 1, 2, 3 HAVING count(*) > 1",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert!(doubled.is_empty(), "click pairs made twice: {doubled:?}");
    let twice: Vec<(String,)> = sqlx::query_as(
        "SELECT r.trigger_id FROM model_versions v JOIN training_runs r ON r.id = v.training_run_id
         GROUP BY r.trigger_id HAVING count(*) > 1",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert!(twice.is_empty(), "triggers trained twice: {twice:?}");

    for canary in canary_store::recent(pool, 100).await.unwrap() {
        let moves = canary_store::decisions(pool, canary.id, true)
            .await
            .unwrap();
        let starts = moves
            .iter()
            .filter(|d| d.action == CanaryAction::Start)
            .count();
        assert!(starts <= 1, "canary {} started {starts} times", canary.id);
        let steps: Vec<u32> = moves.iter().map(|d| d.step_to).collect();
        assert!(
            steps.windows(2).all(|w| w[0] <= w[1]),
            "canary {} went back a step: {moves:#?}",
            canary.id
        );
    }
}
