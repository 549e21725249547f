//! Kalon's Postgres schema: the migrations under `migrations/`, embedded in
//! every binary, and the checks services run at start.

use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};

/// All of Kalon's migrations, embedded at build time.
pub static MIGRATOR: Migrator = sqlx::migrate!("../../migrations");

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("invalid database URL {url:?}: {source}")]
    BadUrl { url: String, source: sqlx::Error },
    #[error("cannot reach Postgres at {url}: {source}")]
    Unreachable { url: String, source: sqlx::Error },
    #[error("database schema is behind this binary ({missing} migration(s) not applied, first: {first}); run `kalonctl migrate`")]
    SchemaBehind { missing: usize, first: String },
    #[error("database has migration {version} that this binary does not know; is an older binary running against a newer database?")]
    SchemaAhead { version: i64 },
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error(transparent)]
    Sql(#[from] sqlx::Error),
}

pub type Result<T, E = DbError> = std::result::Result<T, E>;

/// Parses a database URL.
pub fn options(url: &str) -> Result<PgConnectOptions> {
    url.parse::<PgConnectOptions>()
        .map(|o| o.log_statements(tracing::log::LevelFilter::Debug))
        .map_err(|source| DbError::BadUrl {
            url: redact(url),
            source,
        })
}

/// A pool to `url`, failing fast with a clear error when Postgres is not there.
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool> {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(options(url)?)
        .await
        .map_err(|source| DbError::Unreachable {
            url: redact(url),
            source,
        })
}

/// Applies every pending migration.
pub async fn migrate(pool: &PgPool) -> Result<()> {
    MIGRATOR.run(pool).await?;
    Ok(())
}

/// Fails unless the database has exactly the migrations this binary embeds.
pub async fn check_schema(pool: &PgPool) -> Result<()> {
    let applied: Vec<(i64,)> =
        match sqlx::query_as("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version")
            .fetch_all(pool)
            .await
        {
            Ok(rows) => rows,
            // 42P01: undefined_table, nothing was ever migrated
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P01") => Vec::new(),
            Err(e) => return Err(e.into()),
        };
    let applied: Vec<i64> = applied.into_iter().map(|(v,)| v).collect();
    if let Some(&version) = applied
        .iter()
        .find(|v| !MIGRATOR.iter().any(|m| m.version == **v))
    {
        return Err(DbError::SchemaAhead { version });
    }
    let missing: Vec<_> = MIGRATOR
        .iter()
        .filter(|m| !m.migration_type.is_down_migration() && !applied.contains(&m.version))
        .collect();
    match missing.first() {
        None => Ok(()),
        Some(first) => Err(DbError::SchemaBehind {
            missing: missing.len(),
            first: format!("{} {}", first.version, first.description),
        }),
    }
}

/// Creates monthly partitions of the event tables from last month to
/// `months_ahead` months ahead. Returns how many were created.
pub async fn ensure_partitions(pool: &PgPool, months_ahead: i32) -> Result<i32> {
    let (created,): (i32,) =
        sqlx::query_as("SELECT kalon_ensure_partitions(now() - interval '1 month', $1)")
            .bind(months_ahead + 2)
            .fetch_one(pool)
            .await?;
    Ok(created)
}

/// Rows in each event table, in the order of `EventKind::ALL`.
pub async fn event_counts(pool: &PgPool) -> Result<[i64; 3]> {
    let mut counts = [0; 3];
    for kind in kalon_events::EventKind::ALL {
        let sql = format!("SELECT count(*) FROM {}", kind.table());
        let (n,): (i64,) = sqlx::query_as(&sql).fetch_one(pool).await?;
        counts[kind.index()] = n;
    }
    Ok(counts)
}

/// Creates the database named in `url` when it does not exist, connecting to
/// the server's `postgres` database to do so.
pub async fn create_database(url: &str) -> Result<()> {
    let target = options(url)?;
    let name = target.get_database().unwrap_or("postgres").to_owned();
    let mut admin = PgConnection::connect_with(&target.clone().database("postgres"))
        .await
        .map_err(|source| DbError::Unreachable {
            url: redact(url),
            source,
        })?;
    let exists: Option<(i32,)> = sqlx::query_as("SELECT 1 FROM pg_database WHERE datname = $1")
        .bind(&name)
        .fetch_optional(&mut admin)
        .await?;
    if exists.is_none() {
        let statement = format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\""));
        match sqlx::query(&statement).execute(&mut admin).await {
            Ok(_) => {}
            // 42P04: duplicate_database, created meanwhile by someone else
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P04") => {}
            Err(e) => return Err(e.into()),
        }
    }
    admin.close().await?;
    Ok(())
}

/// Drops the database named in `url`, disconnecting its sessions (tests).
pub async fn drop_database(url: &str) -> Result<()> {
    let target = options(url)?;
    let name = target.get_database().unwrap_or("postgres").to_owned();
    let mut admin = PgConnection::connect_with(&target.database("postgres")).await?;
    let statement = format!(
        "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
        name.replace('"', "\"\"")
    );
    sqlx::query(&statement).execute(&mut admin).await?;
    admin.close().await?;
    Ok(())
}

/// The URL with any password replaced by `***`, for messages and logs: the
/// one in the user part and a query parameter that names a secret
/// (`password=`, and for HTTP endpoints such as an LLM proxy's `key=`,
/// `api-key=`, `api_key=`, `token=`, `secret=`, `sig=`). A string that is
/// not a URL with a host part (`scheme://...`) prints as `[unparsable URL]`:
/// a password could be anywhere in it.
pub fn redact(url: &str) -> String {
    let mut parsed = match url::Url::parse(url) {
        Ok(parsed) if !parsed.cannot_be_a_base() => parsed,
        _ => return "[unparsable URL]".to_owned(),
    };
    if parsed.password().is_some() {
        let _ = parsed.set_password(Some("***"));
    }
    let secret = |key: &str| {
        let key = key.to_ascii_lowercase();
        [
            "password", "key", "api-key", "api_key", "apikey", "token", "secret", "sig",
        ]
        .contains(&key.as_str())
    };
    if parsed.query_pairs().any(|(key, _)| secret(&key)) {
        let pairs: Vec<(String, String)> = parsed
            .query_pairs()
            .map(|(key, value)| {
                let value = if secret(&key) { "***".into() } else { value };
                (key.into_owned(), value.into_owned())
            })
            .collect();
        parsed.query_pairs_mut().clear().extend_pairs(pairs);
    }
    parsed.to_string()
}

/// The same URL pointing at another database.
pub fn with_database(url: &str, database: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) => {
            parsed.set_path(&format!("/{database}"));
            parsed.to_string()
        }
        Err(_) => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords_and_swaps_databases() {
        assert_eq!(
            redact("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(
            redact("postgres://u@h/db?sslmode=require&password=secret"),
            "postgres://u@h/db?sslmode=require&password=***"
        );
        assert_eq!(
            redact("https://user:sk-1@llm.example/v1?api-key=sk-2&deployment=d"),
            "https://user:***@llm.example/v1?api-key=***&deployment=d"
        );
        assert_eq!(redact("u:secret@h/db"), "[unparsable URL]");
        assert_eq!(redact("not a url: secret"), "[unparsable URL]");
        assert_eq!(redact("postgres://u:p@ss@h/db"), "postgres://u:***@h/db");
        assert_eq!(
            with_database("postgres://u@h:1/a?sslmode=disable", "b"),
            "postgres://u@h:1/b?sslmode=disable"
        );
    }

    #[test]
    fn migrations_are_embedded() {
        assert!(MIGRATOR.iter().count() >= 1);
    }
}
