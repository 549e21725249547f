-- Event tables of the loop: one row per accepted event, keyed by event_id.
--
-- The tables grow with traffic, so they are range-partitioned by month on
-- occurred_at from the start: old months can be detached or dropped without
-- vacuum storms, and time-bounded queries prune partitions. A partitioned
-- table's primary key must contain the partition key, so the key is
-- (event_id, occurred_at); a redelivered event carries the same bytes, hence
-- the same occurred_at, and is ignored by ON CONFLICT DO NOTHING.
-- Identifier and query columns use the "C" collation: they are compared for
-- equality and grouping, never sorted for people, and byte comparison keeps
-- their indexes cheap to maintain at ingest rates.
-- Monthly partitions are created ahead of time by kalon_ensure_partitions
-- (called by migrations and at ingest start); anything outside them lands in
-- the DEFAULT partition instead of failing.

CREATE TABLE impressions (
    event_id      uuid        NOT NULL,
    occurred_at   timestamptz NOT NULL,
    request_id    text COLLATE "C"        NOT NULL,
    session_id    text COLLATE "C"        NOT NULL,
    user_id       text COLLATE "C",
    query         text COLLATE "C"        NOT NULL,
    model_version text COLLATE "C"        NOT NULL,
    variant       text COLLATE "C"        NOT NULL,
    -- [{"image_id": .., "rank": .., "score": ..}, ...] as the event carried it.
    -- json, not jsonb: building jsonb took a third of the database's CPU at
    -- ingest rates (kalonctl bench ingest); readers use json_array_elements.
    results       json        NOT NULL,
    ingested_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (event_id, occurred_at)
) PARTITION BY RANGE (occurred_at);

CREATE TABLE clicks (
    event_id    uuid        NOT NULL,
    occurred_at timestamptz NOT NULL,
    request_id  text COLLATE "C"        NOT NULL,
    image_id    text COLLATE "C"        NOT NULL,
    rank        integer     NOT NULL CHECK (rank >= 1),
    dwell_ms    bigint      CHECK (dwell_ms >= 0),
    ingested_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (event_id, occurred_at)
) PARTITION BY RANGE (occurred_at);

CREATE TABLE ratings (
    event_id    uuid        NOT NULL,
    occurred_at timestamptz NOT NULL,
    request_id  text COLLATE "C",
    query       text COLLATE "C"        NOT NULL,
    image_id    text COLLATE "C"        NOT NULL,
    stars       smallint    NOT NULL CHECK (stars BETWEEN 1 AND 5),
    aspect      text        NOT NULL CHECK (aspect IN ('aesthetic', 'relevance')),
    ingested_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (event_id, occurred_at)
) PARTITION BY RANGE (occurred_at);

-- By query (preference building groups by query), by request (clicks join
-- their impression), by time (BRIN: nearly free to maintain on append-mostly
-- data, and enough for range scans inside a month).
CREATE INDEX impressions_query_idx   ON impressions (query);
CREATE INDEX impressions_request_idx ON impressions (request_id);
CREATE INDEX impressions_time_brin   ON impressions USING brin (occurred_at);
CREATE INDEX clicks_request_idx      ON clicks (request_id);
CREATE INDEX clicks_time_brin        ON clicks USING brin (occurred_at);
CREATE INDEX ratings_query_idx       ON ratings (query);
CREATE INDEX ratings_request_idx     ON ratings (request_id);
CREATE INDEX ratings_time_brin       ON ratings USING brin (occurred_at);

CREATE TABLE impressions_default PARTITION OF impressions DEFAULT;
CREATE TABLE clicks_default      PARTITION OF clicks DEFAULT;
CREATE TABLE ratings_default     PARTITION OF ratings DEFAULT;

-- Creates the monthly partitions of the event tables for `months` months
-- starting with the month of `start`; existing ones are left alone. Returns
-- how many were created.
CREATE FUNCTION kalon_ensure_partitions(start timestamptz, months integer)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    parent text;
    month_start date;
    part text;
    created integer := 0;
BEGIN
    FOREACH parent IN ARRAY ARRAY['impressions', 'clicks', 'ratings'] LOOP
        FOR i IN 0 .. months - 1 LOOP
            month_start := (date_trunc('month', start AT TIME ZONE 'UTC') + make_interval(months => i))::date;
            part := format('%s_y%sm%s', parent, to_char(month_start, 'YYYY'), to_char(month_start, 'MM'));
            IF to_regclass(part) IS NULL THEN
                EXECUTE format(
                    'CREATE TABLE %I PARTITION OF %I FOR VALUES FROM (%L) TO (%L)',
                    part, parent,
                    (month_start::timestamp AT TIME ZONE 'UTC'),
                    ((month_start + interval '1 month')::timestamp AT TIME ZONE 'UTC'));
                created := created + 1;
            END IF;
        END LOOP;
    END LOOP;
    RETURN created;
END;
$$;

SELECT kalon_ensure_partitions(now() - interval '1 month', 4);
