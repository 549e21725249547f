//! One leader among replicas, by a Postgres advisory lock: for jobs that
//! must run in one process at a time (the trainer, the preference builder).
//!
//! ```no_run
//! # async fn job(pool: sqlx::PgPool) -> anyhow::Result<()> {
//! let lock = kalon_service::LeaderLock::new("trainer");
//! if let Some(mut leader) = lock.try_acquire(&pool).await? {
//!     // ... each step: stop when leadership is gone
//!     if !leader.is_held().await {
//!         return Ok(());
//!     }
//!     leader.release().await?;
//! }
//! # Ok(())
//! # }
//! ```
//!
//! The lock is a session lock (`pg_try_advisory_lock`) taken on a
//! connection of its own, opened with the pool's settings but outside the
//! pool (a pooled connection would keep the lock when handed back). It is
//! held while that connection lives: [`LeaderGuard::release`] unlocks and
//! closes it; dropping the guard closes it, and Postgres frees the lock when
//! it sees the session end; so does a killed process or a terminated
//! backend. A network partition can leave the server holding the session
//! until TCP notices, so a leader that lost its connection must stop:
//! [`LeaderGuard::is_held`] says whether it still holds the lock.
//!
//! Advisory locks are per database: every replica must use the same one.

use sqlx::{Connection, PgConnection, PgPool};

/// A named lock; [`LeaderLock::try_acquire`] takes it when no one holds it.
#[derive(Debug, Clone)]
pub struct LeaderLock {
    name: String,
    key: i64,
}

impl LeaderLock {
    pub fn new(name: &str) -> Self {
        LeaderLock {
            name: name.to_owned(),
            key: lock_key(name),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The advisory lock's key: `pg_locks` shows it as `classid` (high 32
    /// bits) and `objid` (low 32 bits) with `objsubid` 1.
    pub fn key(&self) -> i64 {
        self.key
    }

    /// Takes the lock on a new connection, or `None` when another session
    /// holds it. Never waits for it.
    pub async fn try_acquire(&self, pool: &PgPool) -> Result<Option<LeaderGuard>, sqlx::Error> {
        let mut conn = PgConnection::connect_with(&pool.connect_options()).await?;
        let (taken, backend_pid): (bool, i32) =
            sqlx::query_as("SELECT pg_try_advisory_lock($1), pg_backend_pid()")
                .bind(self.key)
                .fetch_one(&mut conn)
                .await?;
        if !taken {
            conn.close().await?;
            return Ok(None);
        }
        tracing::info!(lock = %self.name, key = self.key, backend_pid, "leader lock taken");
        Ok(Some(LeaderGuard {
            lock: self.clone(),
            conn,
            backend_pid,
        }))
    }
}

/// The held lock: released by [`LeaderGuard::release`], or when dropped
/// (its connection closes).
#[derive(Debug)]
pub struct LeaderGuard {
    lock: LeaderLock,
    conn: PgConnection,
    backend_pid: i32,
}

impl LeaderGuard {
    pub fn lock(&self) -> &LeaderLock {
        &self.lock
    }

    /// The server process of the session holding the lock.
    pub fn backend_pid(&self) -> i32 {
        self.backend_pid
    }

    /// Whether this session still holds the lock: false once its connection
    /// is gone (the server ended the session, and with it the lock).
    pub async fn is_held(&mut self) -> bool {
        let held: Result<(bool,), _> = sqlx::query_as(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' \
             AND pid = pg_backend_pid() AND granted AND objsubid = 1 \
             AND (classid::bigint << 32) | objid::bigint = $1)",
        )
        .bind(self.lock.key)
        .fetch_one(&mut self.conn)
        .await;
        match held {
            Ok((held,)) => held,
            Err(error) => {
                tracing::warn!(lock = %self.lock.name, %error, "leader lock's connection failed: leadership lost");
                false
            }
        }
    }

    /// Unlocks and closes the connection.
    pub async fn release(mut self) -> Result<(), sqlx::Error> {
        sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(self.lock.key)
            .execute(&mut self.conn)
            .await?;
        self.conn.close().await?;
        tracing::info!(lock = %self.lock.name, "leader lock released");
        Ok(())
    }
}

/// The lock key of `name`: FNV-1a (64 bits) of `kalon:<name>`, the same in
/// every process and Postgres version.
pub fn lock_key(name: &str) -> i64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in b"kalon:".iter().chain(name.as_bytes()) {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_stable_and_differ_by_name() {
        // pinned: replicas of two releases must agree on the key
        assert_eq!(lock_key("trainer"), 1_945_902_888_808_230_461);
        assert_ne!(lock_key("trainer"), lock_key("preferences"));
    }
}
