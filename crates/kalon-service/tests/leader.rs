//! The leader lock against a real Postgres (`DATABASE_URL`'s server, else
//! 127.0.0.1:5432), in a database of the test's own.

use std::time::{Duration, Instant};

use kalon_service::{LeaderLock, DEFAULT_DATABASE_URL};
use sqlx::PgPool;

/// A fresh database on the test server, dropped by [`TestDb::drop_it`].
struct TestDb {
    url: String,
    pool: PgPool,
}

impl TestDb {
    async fn new() -> TestDb {
        let server = std::env::var("DATABASE_URL").unwrap_or_else(|_| DEFAULT_DATABASE_URL.into());
        let name = format!("kalon_service_test_{:016x}", random());
        let url = kalon_db::with_database(&server, &name);
        kalon_db::create_database(&url)
            .await
            .expect("create test database");
        let pool = kalon_db::connect(&url, 2).await.expect("connect");
        TestDb { url, pool }
    }

    async fn drop_it(self) {
        self.pool.close().await;
        kalon_db::drop_database(&self.url)
            .await
            .expect("drop test database");
    }
}

/// A random number (std's hasher keys are random per process and hasher).
fn random() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now())
}

/// Tries `lock` until it is taken, for at most 10 s.
async fn acquire_within(lock: &LeaderLock, pool: &PgPool) -> kalon_service::LeaderGuard {
    let start = Instant::now();
    loop {
        if let Some(guard) = lock.try_acquire(pool).await.unwrap() {
            return guard;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the lock was never freed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn one_holder_at_a_time_until_released_or_dropped() {
    let db = TestDb::new().await;
    let lock = LeaderLock::new("trainer");
    let mut first = lock
        .try_acquire(&db.pool)
        .await
        .unwrap()
        .expect("free at first");
    assert!(first.is_held().await);
    assert!(lock.try_acquire(&db.pool).await.unwrap().is_none());
    // another name is another lock
    let other = LeaderLock::new("preferences")
        .try_acquire(&db.pool)
        .await
        .unwrap();
    assert!(other.is_some());

    first.release().await.unwrap();
    let second = lock
        .try_acquire(&db.pool)
        .await
        .unwrap()
        .expect("free once released");
    assert!(lock.try_acquire(&db.pool).await.unwrap().is_none());

    drop(second);
    let mut third = acquire_within(&lock, &db.pool).await;
    assert!(third.is_held().await);
    third.release().await.unwrap();
    drop(other);
    db.drop_it().await;
}

#[tokio::test]
async fn a_killed_connection_frees_the_lock_and_its_holder_knows() {
    let db = TestDb::new().await;
    let lock = LeaderLock::new("preference-builder");
    let mut first = lock
        .try_acquire(&db.pool)
        .await
        .unwrap()
        .expect("free at first");
    assert!(lock.try_acquire(&db.pool).await.unwrap().is_none());

    let (killed,): (bool,) = sqlx::query_as("SELECT pg_terminate_backend($1)")
        .bind(first.backend_pid())
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(killed);
    let mut second = acquire_within(&lock, &db.pool).await;
    assert!(!first.is_held().await, "the killed session no longer leads");
    assert!(second.is_held().await);
    second.release().await.unwrap();
    drop(first);
    db.drop_it().await;
}
