//! The schema: migrations, the start-up check, partitions, deduplication.

use kalon_db::DbError;
use kalon_tests::{server_url, tag};

#[tokio::test]
async fn schema_check_refuses_an_unmigrated_database_then_passes() {
    let url = kalon_db::with_database(&server_url(), &format!("kalon_test_{}", tag()));
    kalon_db::create_database(&url).await.unwrap();
    let pool = kalon_db::connect(&url, 2).await.unwrap();
    let error = kalon_db::check_schema(&pool).await.unwrap_err();
    assert!(matches!(error, DbError::SchemaBehind { .. }), "{error}");
    assert!(error.to_string().contains("kalonctl migrate"));
    kalon_db::migrate(&pool).await.unwrap();
    kalon_db::check_schema(&pool).await.unwrap();
    // migrating twice is harmless
    kalon_db::migrate(&pool).await.unwrap();
    pool.close().await;
    kalon_db::drop_database(&url).await.unwrap();
}

#[tokio::test]
async fn unreachable_postgres_is_a_clear_error() {
    let port = kalon_tests::free_port();
    let error = kalon_db::connect(&format!("postgres://postgres:secret@127.0.0.1:{port}/x"), 1)
        .await
        .unwrap_err();
    let text = error.to_string();
    assert!(text.contains("cannot reach Postgres"), "{text}");
    assert!(!text.contains("secret"), "password redacted: {text}");
}

#[tokio::test]
async fn events_land_in_monthly_partitions_and_far_dates_in_the_default() {
    let (url, pool) = kalon_tests::fresh_database(&server_url()).await;
    let created = kalon_db::ensure_partitions(&pool, 2).await.unwrap();
    assert_eq!(
        created, 0,
        "migrations already made last month to two months ahead"
    );
    let id_now = uuid::Uuid::new_v4();
    let id_old = uuid::Uuid::new_v4();
    for (id, at) in [
        (id_now, "now()"),
        (id_old, "'1999-01-01T00:00:00Z'::timestamptz"),
    ] {
        let sql = format!(
            "INSERT INTO clicks (event_id, occurred_at, request_id, image_id, rank) VALUES ($1, {at}, 'r', 'i', 1)"
        );
        sqlx::query(&sql).bind(id).execute(&pool).await.unwrap();
    }
    let part = |id: uuid::Uuid| {
        let pool = pool.clone();
        async move {
            let (name,): (String,) =
                sqlx::query_as("SELECT tableoid::regclass::text FROM clicks WHERE event_id = $1")
                    .bind(id)
                    .fetch_one(&pool)
                    .await
                    .unwrap();
            name
        }
    };
    let now = chrono::Utc::now();
    assert_eq!(
        part(id_now).await,
        format!("clicks_y{}", now.format("%Ym%m"))
    );
    assert_eq!(part(id_old).await, "clicks_default");
    // the same event again is ignored, as ingest relies on
    let again = sqlx::query(
        "INSERT INTO clicks (event_id, occurred_at, request_id, image_id, rank) \
         SELECT event_id, occurred_at, request_id, image_id, rank FROM clicks WHERE event_id = $1 ON CONFLICT DO NOTHING",
    )
    .bind(id_now)
    .execute(&pool)
    .await
    .unwrap();
    assert_eq!(again.rows_affected(), 0);
    pool.close().await;
    kalon_db::drop_database(&url).await.unwrap();
}
