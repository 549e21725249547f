//! The model registry against real Postgres and a real object store (the
//! local file system): the lifecycle's every move, artifacts stored by
//! content and verified on every load, lineage, and `kalonctl models`.
//! Nothing here needs Kafka.

use std::path::{Path, PathBuf};
use std::process::Command;

use kalon_registry::artifact::{self, ArtifactError, ArtifactStore, StoredArtifact};
use kalon_registry::lifecycle::{self, can_go, LifecycleError, NewVersion, State};
use kalon_registry::{lineage, store};
use kalon_tests::search::{search_world, SearchWorld};
use sqlx::PgPool;
use uuid::Uuid;

/// A fresh migrated database, dropped by [`Db::cleanup`].
struct Db {
    url: String,
    pool: PgPool,
}

impl Db {
    async fn new() -> Db {
        let (url, pool) = kalon_tests::fresh_database(&kalon_tests::server_url()).await;
        Db { url, pool }
    }

    async fn cleanup(self) {
        self.pool.close().await;
        let _ = kalon_db::drop_database(&self.url).await;
    }
}

/// Puts a directory version named `version` into `state` directly (test
/// setup only; the registry itself never writes `state` but through the
/// lifecycle).
async fn version_in(pool: &PgPool, version: &str, state: State, images: i32) {
    sqlx::query(
        "INSERT INTO model_versions (version, encoder_dir, embedding_dim, images_indexed, state)
         VALUES ($1, '/nowhere/encoder', 4, $2, $3)",
    )
    .bind(version)
    .bind(images)
    .bind(state.as_str())
    .execute(pool)
    .await
    .unwrap();
}

async fn state_of(pool: &PgPool, version: &str) -> String {
    sqlx::query_scalar("SELECT state FROM model_versions WHERE version = $1")
        .bind(version)
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn transitions_of(pool: &PgPool, version: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM model_transitions WHERE model_version = $1")
        .bind(version)
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn every_pair_of_states_is_accepted_exactly_when_legal() {
    let db = Db::new().await;
    let pool = &db.pool;
    let mut legal = 0;
    for (i, from) in State::ALL.into_iter().enumerate() {
        for (j, to) in State::ALL.into_iter().enumerate() {
            let version = format!("v-{i}-{j}");
            version_in(pool, &version, from, 0).await;
            let evidence = serde_json::json!({ "pair": [from, to] });
            let outcome = lifecycle::transition(
                pool,
                &version,
                to,
                "the test",
                "every pair",
                evidence.clone(),
            )
            .await;
            if can_go(from, to) {
                legal += 1;
                let t = outcome.unwrap_or_else(|e| panic!("{from} -> {to} refused: {e}"));
                assert_eq!(
                    (
                        t.from_state,
                        t.to_state,
                        t.actor.as_str(),
                        t.reason.as_str()
                    ),
                    (Some(from), to, "the test", "every pair")
                );
                assert_eq!(t.evidence, evidence);
                assert_eq!(state_of(pool, &version).await, to.as_str());
                let row: (Option<String>, String, String, String, serde_json::Value) =
                    sqlx::query_as(
                        "SELECT from_state, to_state, actor, reason, evidence
                         FROM model_transitions WHERE model_version = $1",
                    )
                    .bind(&version)
                    .fetch_one(pool)
                    .await
                    .unwrap();
                assert_eq!(
                    row,
                    (
                        Some(from.as_str().to_owned()),
                        to.as_str().to_owned(),
                        "the test".to_owned(),
                        "every pair".to_owned(),
                        evidence
                    )
                );
            } else {
                let error = outcome.expect_err(&format!("{from} -> {to} was accepted"));
                assert!(
                    matches!(error, LifecycleError::Illegal { .. }),
                    "{from} -> {to}: {error}"
                );
                let text = error.to_string();
                for name in [from.as_str(), to.as_str(), version.as_str()] {
                    assert!(text.contains(name), "{from} -> {to}: {text}");
                }
                assert_eq!(state_of(pool, &version).await, from.as_str());
                assert_eq!(transitions_of(pool, &version).await, 0);
            }
            // at most one version may be promoted: each pair goes away
            sqlx::query("DELETE FROM model_versions WHERE version = $1")
                .bind(&version)
                .execute(pool)
                .await
                .unwrap();
        }
    }
    assert_eq!(legal, 12);

    // the error lists where a version may go; an unknown version, an empty
    // actor or reason are refused too
    version_in(pool, "c", State::Canary, 0).await;
    let text = lifecycle::transition(pool, "c", State::Retired, "t", "r", serde_json::json!({}))
        .await
        .unwrap_err()
        .to_string();
    assert!(text.contains("promoted, rolled_back"), "{text}");
    for (actor, reason) in [("", "why"), ("who", " ")] {
        let error = lifecycle::transition(
            pool,
            "c",
            State::Promoted,
            actor,
            reason,
            serde_json::json!({}),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(
                error,
                LifecycleError::NoActor(_) | LifecycleError::NoReason(_)
            ),
            "{error}"
        );
    }
    assert_eq!(state_of(pool, "c").await, "canary");
    let error = lifecycle::transition(
        pool,
        "nope",
        State::Retired,
        "t",
        "r",
        serde_json::json!({}),
    )
    .await
    .unwrap_err();
    assert!(
        error.to_string().contains("nope is not registered"),
        "{error}"
    );
    db.cleanup().await;
}

#[tokio::test]
async fn promoting_retires_the_promoted_version_and_history_keeps_every_move() {
    let db = Db::new().await;
    let pool = &db.pool;
    // a person's versions enter as indexed, with their creating transition
    store::register_version(pool, "a", "/models/a", None, 4)
        .await
        .unwrap();
    store::register_version(pool, "b", "/models/b", Some("a"), 4)
        .await
        .unwrap();
    // re-pointing a directory version keeps its state and writes no move
    store::register_version(pool, "a", "/models/a2", None, 4)
        .await
        .unwrap();
    let a = store::version(pool, "a").await.unwrap().unwrap();
    assert_eq!(
        (a.state, a.encoder_dir.as_deref()),
        (State::Indexed, Some("/models/a2"))
    );
    let created = lifecycle::history(pool, "a").await.unwrap();
    assert_eq!(created.len(), 1);
    assert_eq!(
        (
            created[0].from_state,
            created[0].to_state,
            created[0].actor.as_str()
        ),
        (None, State::Indexed, "kalonctl index")
    );
    assert_eq!(
        created[0].reason,
        "registered by a person from an encoder directory"
    );

    assert!(lifecycle::promoted(pool).await.unwrap().is_none());
    let first = lifecycle::promote(pool, "a", "alice", "the first model", serde_json::json!({}))
        .await
        .unwrap();
    assert!(first.retired.is_empty());
    assert_eq!(
        lifecycle::promoted(pool).await.unwrap().unwrap().version,
        "a"
    );

    lifecycle::transition(
        pool,
        "b",
        State::Canary,
        "canary",
        "10% of traffic",
        serde_json::json!({"weight": 0.1}),
    )
    .await
    .unwrap();
    let evidence = serde_json::json!({ "ctr": [0.12, 0.10], "p": 0.003 });
    // a plain transition into promoted retires the one before, too
    let t = lifecycle::transition(
        pool,
        "b",
        State::Promoted,
        "canary",
        "won",
        evidence.clone(),
    )
    .await
    .unwrap();
    assert_eq!(
        (t.from_state, t.to_state),
        (Some(State::Canary), State::Promoted)
    );
    assert_eq!(
        lifecycle::promoted(pool).await.unwrap().unwrap().version,
        "b"
    );
    let a_moves: Vec<(Option<State>, State, String)> = lifecycle::history(pool, "a")
        .await
        .unwrap()
        .into_iter()
        .map(|t| (t.from_state, t.to_state, t.reason))
        .collect();
    assert_eq!(
        a_moves,
        [
            (
                None,
                State::Indexed,
                "registered by a person from an encoder directory".into()
            ),
            (
                Some(State::Indexed),
                State::Promoted,
                "the first model".into()
            ),
            (
                Some(State::Promoted),
                State::Retired,
                "superseded by b: won".into()
            ),
        ]
    );
    let b_history = lifecycle::history(pool, "b").await.unwrap();
    assert_eq!(b_history.last().unwrap().evidence, evidence);

    // the schema keeps one promoted version whatever path writes it
    version_in(pool, "c", State::Indexed, 0).await;
    let error = sqlx::query("UPDATE model_versions SET state = 'promoted' WHERE version = 'c'")
        .execute(pool)
        .await
        .unwrap_err();
    assert!(error.to_string().contains("one_promoted"), "{error}");
    db.cleanup().await;
}

#[tokio::test]
async fn a_version_that_may_not_serve_is_never_deployed() {
    let db = Db::new().await;
    let pool = &db.pool;
    for state in State::ALL {
        let version = format!("v-{state}");
        version_in(pool, &version, state, 10).await;
        let outcome = store::set_deployment(pool, &version, &format!("x-{state}"), 1.0).await;
        if matches!(
            state,
            State::Trained | State::GatedFailed | State::RolledBack | State::Retired
        ) {
            let error = outcome.unwrap_err();
            let text = error.to_string();
            assert!(
                matches!(error, store::DeployError::Refused { .. }),
                "{state}: {text}"
            );
            assert!(
                text.contains(state.as_str()) && text.contains("never offered to traffic"),
                "{text}"
            );
        } else {
            outcome.unwrap_or_else(|e| panic!("{state}: {e}"));
        }
    }
    let deployed: Vec<String> = store::deployments(pool)
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.model_version)
        .collect();
    assert_eq!(
        deployed,
        ["v-canary", "v-gated_passed", "v-indexed", "v-promoted"]
    );
    db.cleanup().await;
}

fn file_store(root: &Path) -> (ArtifactStore, PathBuf) {
    let dir = root.join("store");
    let store = ArtifactStore::from_url(&format!("file://{}", dir.display())).unwrap();
    (store, dir)
}

/// The stored object of `file` in an artifact under a file:// store.
fn object(store_dir: &Path, sha256: &str, file: &str) -> PathBuf {
    store_dir.join("encoders").join(sha256).join(file)
}

fn flip_a_byte(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x55;
    std::fs::write(path, bytes).unwrap();
}

fn partial_dirs(cache: &Path) -> Vec<String> {
    std::fs::read_dir(cache)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(".partial"))
                .collect()
        })
        .unwrap_or_default()
}

async fn trained(pool: &PgPool, parent: Option<&str>, artifact: &StoredArtifact) -> String {
    lifecycle::register_trained(
        pool,
        NewVersion {
            parent: parent.map(str::to_owned),
            training_run_id: None,
            artifact: artifact.clone(),
            dimension: artifact.embedding_dim,
            actor: "trainer".into(),
            reason: "a test run".into(),
        },
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn artifacts_are_stored_by_content_and_verified_on_every_load() {
    let db = Db::new().await;
    let pool = &db.pool;
    let world = search_world(24);
    let tmp = tempfile::tempdir().unwrap();
    let (store, store_dir) = file_store(tmp.path());
    let cache = tmp.path().join("cache");

    // stored under its content hash, the index last; again: the same
    let stored = store.put_dir(world.parent.path()).await.unwrap();
    assert_eq!(
        stored.sha256,
        artifact::dir_sha256(world.parent.path()).unwrap()
    );
    assert_eq!(stored.uri, store.uri_of(&stored.sha256));
    assert!(stored.uri.starts_with("file:///"));
    assert_eq!(stored.embedding_dim, 64);
    assert!(object(&store_dir, &stored.sha256, artifact::INDEX_FILE).is_file());
    assert_eq!(store.put_dir(world.parent.path()).await.unwrap(), stored);
    let listed = artifact::list_dir(world.parent.path()).unwrap();
    assert_eq!(listed.len(), stored.files);
    assert_eq!(listed.iter().map(|f| f.size).sum::<u64>(), stored.bytes);

    // registered by the system under a name of its making
    let name = trained(pool, None, &stored).await;
    assert!(
        name.starts_with("m-") && name.ends_with(&stored.sha256[..8]),
        "{name}"
    );
    assert!(store::valid_name(&name));
    let row = store::version(pool, &name).await.unwrap().unwrap();
    assert_eq!(row.state, State::Trained);
    assert_eq!(row.encoder_dir, None);
    assert_eq!(row.artifact_uri.as_deref(), Some(stored.uri.as_str()));
    let created = lifecycle::history(pool, &name).await.unwrap();
    assert_eq!(
        (
            created[0].from_state,
            created[0].to_state,
            created[0].actor.as_str()
        ),
        (None, State::Trained, "trainer")
    );
    assert_eq!(
        created[0].evidence["artifact_sha256"],
        stored.sha256.as_str()
    );
    // a person's `kalonctl index` may not re-point it
    let error = store::register_version(pool, &name, "/elsewhere", None, 64)
        .await
        .unwrap_err();
    assert!(
        error.to_string().contains("cannot be re-pointed"),
        "{error}"
    );

    // fetched, verified, cached; the cached copy is verified again
    let dir = artifact::materialize(&row, &cache).await.unwrap();
    assert_eq!(dir, cache.join(&stored.sha256));
    assert_eq!(artifact::dir_sha256(&dir).unwrap(), stored.sha256);
    kalon_encoder::Manifest::load(&dir).unwrap();
    assert_eq!(artifact::materialize(&row, &cache).await.unwrap(), dir);
    // the wrong dimension is refused
    let error = store
        .fetch(&stored.uri, &stored.sha256, 32, &cache)
        .await
        .unwrap_err();
    assert!(matches!(error, ArtifactError::Dimension { .. }), "{error}");

    // a tampered cached copy is refused (and dropped: the next load fetches
    // it again from the store)
    flip_a_byte(&dir.join("text.onnx"));
    let error = artifact::materialize(&row, &cache).await.unwrap_err();
    let text = error.to_string();
    assert!(
        matches!(error, ArtifactError::HashMismatch { .. }),
        "{text}"
    );
    assert!(
        text.contains(&stored.sha256) && text.contains(&name),
        "{text}"
    );
    assert!(!dir.exists());
    assert_eq!(artifact::materialize(&row, &cache).await.unwrap(), dir);
    // ...a truncated cached file too
    let vocab = dir.join("vocab.json");
    let length = std::fs::metadata(&vocab).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&vocab)
        .unwrap()
        .set_len(length / 2)
        .unwrap();
    let error = artifact::materialize(&row, &cache).await.unwrap_err();
    assert!(
        matches!(error, ArtifactError::HashMismatch { .. }),
        "{error}"
    );

    // a tampered object in the store is refused, nothing half-written is
    // left in the cache
    let onnx = object(&store_dir, &stored.sha256, "text.onnx");
    let original = std::fs::read(&onnx).unwrap();
    flip_a_byte(&onnx);
    let _ = std::fs::remove_dir_all(&cache);
    let error = artifact::materialize(&row, &cache).await.unwrap_err();
    let text = error.to_string();
    assert!(
        matches!(error, ArtifactError::HashMismatch { .. }),
        "{text}"
    );
    let (_, tampered) = artifact::file_sha256(&onnx).unwrap();
    let (_, expected) = artifact::file_sha256(&world.parent.path().join("text.onnx")).unwrap();
    assert!(
        text.contains(&stored.sha256) && text.contains(&expected) && text.contains(&tampered),
        "{text}"
    );
    assert!(!cache.join(&stored.sha256).exists());
    assert!(
        partial_dirs(&cache).is_empty(),
        "{:?}",
        partial_dirs(&cache)
    );

    // a truncated object: refused, naming the file
    std::fs::write(&onnx, &original[..original.len() / 3]).unwrap();
    let error = artifact::materialize(&row, &cache).await.unwrap_err();
    let text = error.to_string();
    assert!(
        matches!(error, ArtifactError::Incomplete { .. }) && text.contains("text.onnx"),
        "{text}"
    );
    // a missing one
    std::fs::remove_file(&onnx).unwrap();
    let error = artifact::materialize(&row, &cache).await.unwrap_err();
    assert!(
        error.to_string().contains("text.onnx is missing"),
        "{error}"
    );
    assert!(partial_dirs(&cache).is_empty());
    // restored, it loads again
    std::fs::write(&onnx, &original).unwrap();
    assert_eq!(artifact::materialize(&row, &cache).await.unwrap(), dir);

    // an index that lies about the files is refused
    let index_path = object(&store_dir, &stored.sha256, artifact::INDEX_FILE);
    let mut index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
    index["files"][0]["size"] = serde_json::json!(1);
    std::fs::write(&index_path, serde_json::to_vec(&index).unwrap()).unwrap();
    let _ = std::fs::remove_dir_all(&cache);
    let error = artifact::materialize(&row, &cache).await.unwrap_err();
    assert!(error.to_string().contains(&stored.sha256), "{error}");

    // only encoders get in
    let error = store.put_dir(world.world.path()).await.unwrap_err();
    assert!(
        matches!(error, ArtifactError::NotAnEncoder { .. }),
        "{error}"
    );
    let broken = tmp.path().join("broken");
    std::fs::create_dir(&broken).unwrap();
    for file in ["kalon-model.json", "image.onnx", "vocab.json"] {
        std::fs::copy(world.parent.path().join(file), broken.join(file)).unwrap();
    }
    let error = store.put_dir(&broken).await.unwrap_err().to_string();
    assert!(error.contains("text.onnx"), "{error}");
    assert!(!store_dir
        .join("encoders")
        .join(artifact::dir_sha256(&broken).unwrap())
        .exists());
    // a directory version still materializes as its directory
    store::register_version(
        pool,
        "dir-1",
        &world.parent.path().display().to_string(),
        None,
        64,
    )
    .await
    .unwrap();
    let dir_row = store::version(pool, "dir-1").await.unwrap().unwrap();
    assert_eq!(
        artifact::materialize(&dir_row, &cache).await.unwrap(),
        world.parent.path()
    );
    db.cleanup().await;
}

/// Unit embeddings for every catalog image, as if the tower had run.
async fn fake_index(pool: &PgPool, world: &SearchWorld, version: &str, dim: usize) {
    let files = kalon_registry::indexer::catalog_files(&world.images()).unwrap();
    let ids: Vec<String> = files.into_iter().map(|(id, _)| id).collect();
    let mut data = Vec::with_capacity(ids.len() * dim);
    for i in 0..ids.len() {
        let row: Vec<f32> = (0..dim)
            .map(|j| ((i * 7 + j * 3) % 11) as f32 - 5.0)
            .collect();
        let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-6);
        data.extend(row.iter().map(|x| x / norm));
    }
    store::store_embeddings(pool, version, &ids, &data, dim)
        .await
        .unwrap();
    store::finish_index(pool, version, &serde_json::json!({"method": "test"}))
        .await
        .unwrap();
}

async fn index_dir(
    pool: &PgPool,
    world: &SearchWorld,
    version: &str,
    dir: PathBuf,
) -> anyhow::Result<kalon_registry::indexer::Indexed> {
    kalon_registry::indexer::index_version(
        pool,
        kalon_registry::indexer::IndexJob {
            version,
            encoder_dir: &dir,
            images: &world.images(),
            parent: None,
            force_tower: false,
            batch: 64,
            options: &Default::default(),
        },
        |_, _| {},
    )
    .await
}

#[tokio::test]
async fn indexing_a_gated_artifact_version_moves_it_to_indexed() {
    let db = Db::new().await;
    let pool = &db.pool;
    let world = search_world(24);
    let tmp = tempfile::tempdir().unwrap();
    let (store, _) = file_store(tmp.path());
    let cache = tmp.path().join("cache");
    store::register_version(
        pool,
        "root",
        &world.parent.path().display().to_string(),
        None,
        64,
    )
    .await
    .unwrap();
    fake_index(pool, &world, "root", 64).await;
    let stored = store.put_dir(world.aligned.path()).await.unwrap();
    let name = trained(pool, Some("root"), &stored).await;
    let row = store::version(pool, &name).await.unwrap().unwrap();
    let dir = artifact::materialize(&row, &cache).await.unwrap();
    let index = |dir: PathBuf| index_dir(pool, &world, &name, dir);
    // not gated yet: refused
    let error = index(dir.clone()).await.unwrap_err();
    assert!(error.to_string().contains("is trained"), "{error}");
    lifecycle::gate(
        pool,
        &name,
        true,
        serde_json::json!({ "ndcg": 0.41, "baseline": 0.39 }),
        "trainer",
        "beats its parent",
    )
    .await
    .unwrap();
    // a directory that is not its artifact: refused
    let error = index(world.parent.path().to_owned()).await.unwrap_err();
    assert!(error.to_string().contains(&stored.sha256), "{error}");

    // the adapter on the parent's embeddings (no image tower needed)
    let outcome = index(dir.clone()).await.unwrap();
    assert_eq!(outcome.method, "adapter-reuse");
    assert_eq!(outcome.parent.as_deref(), Some("root"));
    let row = store::version(pool, &name).await.unwrap().unwrap();
    assert_eq!(row.state, State::Indexed);
    assert_eq!(row.images_indexed, 24);
    assert_eq!(row.gate.as_ref().unwrap()["ndcg"], 0.41);
    let moves: Vec<(State, String)> = lifecycle::history(pool, &name)
        .await
        .unwrap()
        .into_iter()
        .map(|t| (t.to_state, t.actor))
        .collect();
    assert_eq!(
        moves,
        [
            (State::Trained, "trainer".into()),
            (State::GatedPassed, "trainer".into()),
            (State::Indexed, "indexer".into()),
        ]
    );
    // indexing again keeps it indexed; it may now be deployed
    index(dir.clone()).await.unwrap();
    assert_eq!(lifecycle::history(pool, &name).await.unwrap().len(), 3);
    store::set_deployment(pool, &name, "canary", 0.1)
        .await
        .unwrap();
    let deployed = store::deployments(pool).await.unwrap();
    assert_eq!(
        deployed[0].source(),
        Some(artifact::EncoderSource::Artifact {
            uri: stored.uri.clone(),
            sha256: stored.sha256.clone()
        })
    );
    db.cleanup().await;
}

/// root (a person's directory) -> child (cron run, promoted through a
/// canary) -> grandchild (manual run, failed its gate).
async fn three_generations(
    pool: &PgPool,
    world: &SearchWorld,
    store: &ArtifactStore,
) -> [String; 3] {
    store::register_version(
        pool,
        "root",
        &world.parent.path().display().to_string(),
        None,
        64,
    )
    .await
    .unwrap();
    lifecycle::promote(
        pool,
        "root",
        "alice",
        "the first model",
        serde_json::json!({}),
    )
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO training_triggers (id, kind, requested_by, reason, state, attempts, finished_at)
         VALUES ('cron:2026-12-07T03:00', 'cron', 'trainer', '1200 new pairs since the last run', 'done', 2, now()),
                ('manual:7c1e', 'manual', 'bob', 'try the judgment pairs', 'done', 1, now())",
    )
    .execute(pool)
    .await
    .unwrap();
    let (child_run, grandchild_run) = (Uuid::new_v4(), Uuid::new_v4());
    for (run, trigger, parent, pairs, device) in [
        (
            child_run,
            "cron:2026-12-07T03:00",
            "root",
            serde_json::json!({ "click": 900, "rating": 250, "judgment": 50, "skipped": 7 }),
            "cuda:0",
        ),
        (
            grandchild_run,
            "manual:7c1e",
            "child",
            serde_json::json!({ "click": 300, "judgment": 410 }),
            "cpu",
        ),
    ] {
        sqlx::query(
            "INSERT INTO training_runs (id, trigger_id, attempt, state, parent_version,
                 window_start, window_end, pair_counts, config, device, timings, gate, owner, finished_at)
             VALUES ($1, $2, 1, 'succeeded', $3, now() - interval '7 days', now(), $4,
                 '{\"steps\": 400, \"lr\": 0.001}', $5, '{\"train\": 31.5, \"gate\": 2.0}',
                 '{\"passed\": true}', 'trainer-a', now())",
        )
        .bind(run)
        .bind(trigger)
        .bind(parent)
        .bind(pairs)
        .bind(device)
        .execute(pool)
        .await
        .unwrap();
    }
    let register = |artifact: StoredArtifact, parent: &str, run: Uuid| {
        let parent = parent.to_owned();
        async move {
            lifecycle::register_trained(
                pool,
                NewVersion {
                    parent: Some(parent),
                    training_run_id: Some(run),
                    dimension: artifact.embedding_dim,
                    artifact,
                    actor: "trainer".into(),
                    reason: "training run succeeded".into(),
                },
            )
            .await
            .unwrap()
        }
    };
    let child = register(
        store.put_dir(world.aligned.path()).await.unwrap(),
        "root",
        child_run,
    )
    .await;
    sqlx::query(
        "UPDATE training_runs SET model_version = $1, parent_version = 'root' WHERE id = $2",
    )
    .bind(&child)
    .bind(child_run)
    .execute(pool)
    .await
    .unwrap();
    lifecycle::gate(
        pool,
        &child,
        true,
        serde_json::json!({ "ndcg": 0.44 }),
        "trainer",
        "beats root",
    )
    .await
    .unwrap();
    lifecycle::transition(
        pool,
        &child,
        State::Indexed,
        "indexer",
        "embedded",
        serde_json::json!({}),
    )
    .await
    .unwrap();
    lifecycle::transition(
        pool,
        &child,
        State::Canary,
        "canary",
        "10% of traffic",
        serde_json::json!({ "weight": 0.1 }),
    )
    .await
    .unwrap();
    lifecycle::transition(
        pool,
        &child,
        State::Promoted,
        "canary",
        "CTR up with p < 0.01",
        serde_json::json!({ "ctr": { "control": 0.101, "canary": 0.118 }, "p": 0.004 }),
    )
    .await
    .unwrap();

    // a different artifact: the aligned encoder with one more file
    let variant = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(world.aligned.path()).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, variant.path().join(path.file_name().unwrap())).unwrap();
        }
    }
    std::fs::write(variant.path().join("notes.txt"), "grandchild").unwrap();
    let grandchild = register(
        store.put_dir(variant.path()).await.unwrap(),
        &child,
        grandchild_run,
    )
    .await;
    sqlx::query("UPDATE training_runs SET model_version = $1, parent_version = $2 WHERE id = $3")
        .bind(&grandchild)
        .bind(&child)
        .bind(grandchild_run)
        .execute(pool)
        .await
        .unwrap();
    lifecycle::gate(
        pool,
        &grandchild,
        false,
        serde_json::json!({ "ndcg": 0.38, "parent": 0.44 }),
        "trainer",
        "worse than its parent",
    )
    .await
    .unwrap();
    [grandchild, child, "root".to_owned()]
}

#[tokio::test]
async fn why_shows_the_whole_chain_and_kalonctl_prints_it() {
    let db = Db::new().await;
    let pool = &db.pool;
    let world = search_world(24);
    let tmp = tempfile::tempdir().unwrap();
    let (store, _) = file_store(tmp.path());
    let names = three_generations(pool, &world, &store).await;
    let [grandchild, child, root] = &names;

    let chain = lineage::why(pool, grandchild).await.unwrap();
    let json = serde_json::to_value(&chain).unwrap();
    let generations = json["generations"].as_array().unwrap();
    assert_eq!(generations.len(), 3);
    let versions: Vec<&str> = generations
        .iter()
        .map(|g| g["version"].as_str().unwrap())
        .collect();
    assert_eq!(
        versions,
        [grandchild.as_str(), child.as_str(), root.as_str()]
    );

    let g = &generations[0];
    assert_eq!(g["state"], "gated_failed");
    assert_eq!(g["parent"], child.as_str());
    assert_eq!(g["gate"]["ndcg"], 0.38);
    assert_eq!(g["run"]["trigger_id"], "manual:7c1e");
    assert_eq!(g["run"]["trigger"]["kind"], "manual");
    assert_eq!(g["run"]["trigger"]["requested_by"], "bob");
    assert_eq!(g["run"]["pair_counts"]["judgment"], 410);
    assert_eq!(g["run"]["device"], "cpu");
    assert!(g["run"]["window_start"].is_string() && g["run"]["window_end"].is_string());

    let c = &generations[1];
    assert_eq!(c["state"], "promoted");
    assert_eq!(c["run"]["trigger"]["kind"], "cron");
    assert_eq!(
        c["run"]["trigger"]["reason"],
        "1200 new pairs since the last run"
    );
    assert_eq!(c["run"]["pair_counts"]["click"], 900);
    assert_eq!(c["run"]["config"]["steps"], 400);
    assert_eq!(c["run"]["timings"]["train"], 31.5);
    let moves: Vec<&str> = c["transitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["to_state"].as_str().unwrap())
        .collect();
    assert_eq!(
        moves,
        ["trained", "gated_passed", "indexed", "canary", "promoted"]
    );
    assert_eq!(c["transitions"][4]["evidence"]["p"], 0.004);

    let r = &generations[2];
    assert!(r["run"].is_null());
    assert!(r["encoder_dir"].is_string());
    // root was promoted first, then retired by the child's promotion
    let root_moves: Vec<&str> = r["transitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["to_state"].as_str().unwrap())
        .collect();
    assert_eq!(root_moves, ["indexed", "promoted", "retired"]);

    let text = lineage::render(&chain);
    for name in &names {
        assert!(text.contains(name.as_str()), "{text}");
    }
    assert!(
        text.contains("manual:7c1e") && text.contains("cron:2026-12-07T03:00"),
        "{text}"
    );
    // one block per generation, each deeper than its child
    assert!(
        text.contains(&format!("\n    {child} [promoted]")),
        "{text}"
    );
    assert!(
        text.contains(&format!("\n        {root} [retired]")),
        "{text}"
    );

    // kalonctl models: why, show, list, promote, retire, on this database
    let bin = tokio::task::spawn_blocking(|| kalon_tests::workspace_binary("kalonctl"))
        .await
        .unwrap();
    let home = tempfile::tempdir().unwrap();
    let kalonctl = |args: &[&str]| {
        let out = Command::new(&bin)
            .args(["models"])
            .args(args)
            .current_dir(home.path())
            .env("DATABASE_URL", &db.url)
            .env("KALON_STATE_DIR", home.path().join(".kalon"))
            .env("USER", "carol")
            .env_remove("KALON_KAFKA_BROKERS")
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, stdout, stderr) = kalonctl(&["why", grandchild, "--json"]);
    assert!(ok, "{stderr}");
    let printed: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(printed, json);
    let (ok, stdout, stderr) = kalonctl(&["why", grandchild]);
    assert!(ok && stdout == text, "{stdout}{stderr}");

    let (ok, stdout, _) = kalonctl(&["list", "--json"]);
    let listed: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert!(ok);
    assert_eq!(listed.as_array().unwrap().len(), 3);
    let (ok, stdout, stderr) = kalonctl(&["show", child, "--json"]);
    assert!(ok, "{stderr}");
    let shown: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(shown["version"]["state"], "promoted");
    assert_eq!(shown["transitions"].as_array().unwrap().len(), 5);

    let (ok, _, stderr) = kalonctl(&["show", "never-registered"]);
    assert!(
        !ok && stderr.contains("never-registered is not registered"),
        "{stderr}"
    );
    // illegal for a person too: the error names both states
    let (ok, _, stderr) = kalonctl(&["promote", grandchild, "--reason", "I like it"]);
    assert!(
        !ok && stderr.contains("gated_failed") && stderr.contains("promoted"),
        "{stderr}"
    );
    let (ok, stdout, stderr) = kalonctl(&["retire", grandchild, "--reason", "failed its gate"]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("gated_failed -> retired"), "{stdout}");
    let last = lifecycle::history(pool, grandchild)
        .await
        .unwrap()
        .pop()
        .unwrap();
    assert_eq!(
        (last.to_state, last.actor.as_str(), last.reason.as_str()),
        (State::Retired, "carol (kalonctl)", "failed its gate")
    );
    db.cleanup().await;
}

/// Search's side (ONNX Runtime for the text towers; no Kafka): a replica
/// fetches a deployed artifact into its model cache, verifies it and
/// serves it; a tampered artifact (in the store or in the cache) is refused
/// and the routing in force keeps serving.
#[tokio::test]
async fn search_serves_a_verified_artifact_and_refuses_a_tampered_one() {
    use kalon_search::index::IndexParams;
    use kalon_search::{Live, Reloader};
    use std::sync::Arc;

    let db = Db::new().await;
    let pool = &db.pool;
    let world = search_world(24);
    let tmp = tempfile::tempdir().unwrap();
    let (store, store_dir) = file_store(tmp.path());
    store::register_version(
        pool,
        "root",
        &world.parent.path().display().to_string(),
        None,
        64,
    )
    .await
    .unwrap();
    fake_index(pool, &world, "root", 64).await;
    store::set_deployment(pool, "root", "control", 0.9)
        .await
        .unwrap();
    let stored = store.put_dir(world.aligned.path()).await.unwrap();
    let name = trained(pool, Some("root"), &stored).await;
    lifecycle::gate(
        pool,
        &name,
        true,
        serde_json::json!({}),
        "trainer",
        "passes",
    )
    .await
    .unwrap();
    let row = store::version(pool, &name).await.unwrap().unwrap();
    let dir = artifact::materialize(&row, &tmp.path().join("indexer-cache"))
        .await
        .unwrap();
    index_dir(pool, &world, &name, dir).await.unwrap();

    // a replica on another host, with its own model cache
    let cache = tmp.path().join("search-cache");
    let replica = |live: Live| Reloader {
        pool: pool.clone(),
        live: Arc::new(live),
        options: kalon_encoder::EncoderOptions::default(),
        params: IndexParams::default(),
        cache: cache.clone(),
    };
    let warm = replica(Live::default());
    assert!(warm.reload().await.unwrap().is_ready());

    // the canary's artifact tampered with in the store: refused, the
    // routing in force (control alone) keeps serving
    let onnx = object(&store_dir, &stored.sha256, "text.onnx");
    let original = std::fs::read(&onnx).unwrap();
    flip_a_byte(&onnx);
    store::set_deployment(pool, &name, "canary", 0.1)
        .await
        .unwrap();
    let error = warm.reload().await.unwrap_err().to_string();
    assert!(
        error.contains(&name) && error.contains(&stored.sha256),
        "{error}"
    );
    let serving = warm.live.current();
    assert_eq!(serving.variants.len(), 1);
    assert!(serving.is_ready() && serving.served("root").is_some());
    assert!(!cache.join(&stored.sha256).exists());

    // restored: fetched, verified, served from the cache
    std::fs::write(&onnx, &original).unwrap();
    let routing = warm.reload().await.unwrap();
    let canary = routing.served(&name).unwrap();
    assert_eq!(canary.source, format!("sha256:{}", stored.sha256));
    assert_eq!(
        canary.encoder_dir,
        cache.join(&stored.sha256).display().to_string()
    );
    assert_eq!(canary.ids.len(), 24);

    // the cached copy tampered with: a replica loading it refuses it (and
    // drops the copy); the next load fetches it again
    flip_a_byte(&cache.join(&stored.sha256).join("vocab.json"));
    let cold = replica(Live::default());
    let error = cold.reload().await.unwrap_err().to_string();
    assert!(error.contains(&stored.sha256), "{error}");
    assert!(!cold.live.current().is_ready());
    assert_eq!(cold.reload().await.unwrap().variants.len(), 2);

    // a loaded version is not loaded again while its source stays
    sqlx::query("UPDATE deployments SET weight = 0.5 WHERE variant = 'canary'")
        .execute(pool)
        .await
        .unwrap();
    let after = warm.reload().await.unwrap();
    assert!(Arc::ptr_eq(canary, after.served(&name).unwrap()));
    assert!((after.total_weight() - 1.4).abs() < 1e-9);
    db.cleanup().await;
}
