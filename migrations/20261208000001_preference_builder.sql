-- The preference builder (services/preferences).
--
-- Every input the builder consumes gets one row here, written in the same
-- transaction as the pairs it made: a click or rating by its event id, a
-- judgment by its judgment id. `outcome` is 'paired' (pairs were made, or
-- none were due, e.g. a click with nothing skipped), or the reason it was
-- refused (a click whose impression never arrived, a rank outside the list,
-- an unknown image, an unknown verdict...). A restart finds what is left by
-- the absence of a row, so nothing is built twice and nothing is skipped.
CREATE TABLE preference_inputs (
    source    text COLLATE "C" NOT NULL CHECK (source IN ('click', 'rating', 'judgment')),
    ref       text COLLATE "C" NOT NULL,
    outcome   text COLLATE "C" NOT NULL,
    detail    text,
    marked_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source, ref)
);
CREATE INDEX preference_inputs_refused ON preference_inputs (source, outcome)
    WHERE outcome <> 'paired';

-- D_po from live queries: each query.rephrased.v1 event waits here until its
-- pairs are stored (in the same transaction as `state = 'done'`). A failing
-- teacher leaves it pending with a backoff; nothing is lost.
CREATE TABLE dpo_queue (
    event_id        uuid PRIMARY KEY,
    query           text NOT NULL,
    rephrasings     jsonb NOT NULL,
    state           text NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'done', 'refused')),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error      text,
    model_version   text COLLATE "C",
    pairs           integer,
    created_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz
);
CREATE INDEX dpo_queue_due ON dpo_queue (next_attempt_at) WHERE state = 'pending';

-- Position bias estimated from the traffic: one row per estimation, the
-- newest is what click pairs are weighted with.
CREATE TABLE propensity_estimates (
    id           bigserial PRIMARY KEY,
    estimated_at timestamptz NOT NULL DEFAULT now(),
    method       text NOT NULL,
    window_start timestamptz NOT NULL,
    window_end   timestamptz NOT NULL,
    -- impressions and clicks the estimate saw
    impressions  bigint NOT NULL,
    clicks       bigint NOT NULL,
    estimate     jsonb NOT NULL
);

-- kalonctl pairs stats groups by source, day and serving version; a rating
-- group's rebuild finds its pairs by query.
CREATE INDEX preference_pairs_source ON preference_pairs (source, created_at);
CREATE INDEX preference_pairs_rating_query ON preference_pairs (query) WHERE source = 'rating';
