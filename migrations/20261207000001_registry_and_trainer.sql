-- The loop's middle: a model version's lifecycle and lineage, the
-- preference pairs it is trained on, and the trainer's triggers and runs.

-- A version is either a person's encoder directory on the search host
-- (`kalonctl index`, as before) or an artifact in the object store
-- addressed by the sha256 of its content (the trainer's; search fetches and
-- verifies it). A version a person registers enters as 'indexed'; the
-- trainer's enter as 'trained'. Only kalon-registry's lifecycle module
-- changes `state`, and every change is a row of model_transitions.
ALTER TABLE model_versions
    ALTER COLUMN encoder_dir DROP NOT NULL,
    ADD COLUMN state text NOT NULL DEFAULT 'indexed' CHECK (state IN (
        'trained', 'gated_passed', 'gated_failed', 'indexed', 'canary',
        'promoted', 'rolled_back', 'retired')),
    ADD COLUMN artifact_uri text,
    ADD COLUMN artifact_sha256 text CHECK (artifact_sha256 ~ '^[0-9a-f]{64}$'),
    ADD COLUMN training_run_id uuid,
    -- the offline gate's figures and verdict (the trainer's versions)
    ADD COLUMN gate jsonb,
    ADD CONSTRAINT model_versions_has_encoder CHECK (
        encoder_dir IS NOT NULL OR (artifact_uri IS NOT NULL AND artifact_sha256 IS NOT NULL));

CREATE INDEX model_versions_state ON model_versions (state);

-- Every state change of a version: who, when, why, and the figures behind
-- it (a gate's, a canary's). from_state is NULL for the row that created it.
CREATE TABLE model_transitions (
    id            bigserial PRIMARY KEY,
    model_version text COLLATE "C" NOT NULL REFERENCES model_versions (version) ON DELETE CASCADE,
    from_state    text,
    to_state      text        NOT NULL,
    actor         text        NOT NULL CHECK (actor <> ''),
    reason        text        NOT NULL CHECK (reason <> ''),
    evidence      jsonb       NOT NULL DEFAULT '{}',
    at            timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX model_transitions_version ON model_transitions (model_version, id);

-- Weighted preference pairs, from every source. The preference builder
-- writes click / rating / judgment / dpo pairs; `id` is derived from what
-- made the pair (source, rule, event ids), so rebuilding writes the same
-- ids and redelivery never doubles one. `created_at` places a pair in a
-- training run's data window.
CREATE TABLE preference_pairs (
    id            text COLLATE "C" PRIMARY KEY,
    source        text        NOT NULL CHECK (source IN ('dpo', 'click', 'rating', 'judgment')),
    weight        double precision NOT NULL CHECK (weight > 0 AND weight < 'Infinity'),
    query         text        NOT NULL CHECK (query <> ''),
    winner        text COLLATE "C" NOT NULL,
    loser         text COLLATE "C" NOT NULL CHECK (loser <> winner),
    -- the version and variant that served the list the pair came from
    model_version text COLLATE "C",
    variant       text,
    provenance    jsonb       NOT NULL DEFAULT '{}',
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX preference_pairs_created ON preference_pairs (created_at);

-- What asked for training: a cron tick with enough new pairs, or a person
-- (`kalonctl train now`). The id names the trigger ('cron:<tick>',
-- 'manual:<uuid>'), so replicas racing to create one create one.
CREATE TABLE training_triggers (
    id           text COLLATE "C" PRIMARY KEY,
    kind         text        NOT NULL CHECK (kind IN ('cron', 'manual')),
    requested_by text        NOT NULL,
    reason       text        NOT NULL,
    state        text        NOT NULL DEFAULT 'pending'
                 CHECK (state IN ('pending', 'done', 'skipped', 'failed')),
    attempts     integer     NOT NULL DEFAULT 0,
    created_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz
);
CREATE INDEX training_triggers_pending ON training_triggers (created_at) WHERE state = 'pending';

-- One attempt at a trigger. A trainer killed mid-run leaves 'running' with a
-- stale heartbeat; the next leader marks it 'interrupted' and attempts the
-- trigger again. At most one attempt of a trigger succeeds.
CREATE TABLE training_runs (
    id             uuid PRIMARY KEY,
    trigger_id     text COLLATE "C" NOT NULL REFERENCES training_triggers (id),
    attempt        integer     NOT NULL CHECK (attempt > 0),
    state          text        NOT NULL DEFAULT 'running'
                   CHECK (state IN ('running', 'succeeded', 'skipped', 'failed', 'interrupted')),
    reason         text,
    parent_version text COLLATE "C",
    model_version  text COLLATE "C",
    window_start   timestamptz,
    window_end     timestamptz,
    -- pairs by source, and those skipped (unknown images)
    pair_counts    jsonb       NOT NULL DEFAULT '{}',
    config         jsonb       NOT NULL DEFAULT '{}',
    device         text,
    -- the last step's figures: step, steps, loss, pair_accuracy
    progress       jsonb       NOT NULL DEFAULT '{}',
    -- seconds per phase: load, train, export, gate, upload
    timings        jsonb       NOT NULL DEFAULT '{}',
    gate           jsonb,
    owner          text        NOT NULL,
    heartbeat_at   timestamptz NOT NULL DEFAULT now(),
    started_at     timestamptz NOT NULL DEFAULT now(),
    finished_at    timestamptz,
    UNIQUE (trigger_id, attempt)
);
CREATE UNIQUE INDEX training_runs_one_success ON training_runs (trigger_id) WHERE state = 'succeeded';
CREATE INDEX training_runs_started ON training_runs (started_at);

ALTER TABLE model_versions
    ADD CONSTRAINT model_versions_training_run_fkey
        FOREIGN KEY (training_run_id) REFERENCES training_runs (id);
CREATE UNIQUE INDEX model_versions_one_per_run ON model_versions (training_run_id)
    WHERE training_run_id IS NOT NULL;
