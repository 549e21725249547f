-- The canary controller (services/canary): one row per candidate it rolls
-- out, every decision it (or an operator) takes with the evidence behind it,
-- and the LMM judge's verdicts it has paid for. Search reads
-- `deployments.interleave`: the share of a canary's traffic that gets a
-- team-draft interleaving of the stable and the candidate rankings.

ALTER TABLE deployments
    ADD COLUMN interleave double precision NOT NULL DEFAULT 0
        CHECK (interleave >= 0 AND interleave <= 1);

CREATE TABLE canaries (
    id bigserial PRIMARY KEY,
    candidate text NOT NULL UNIQUE REFERENCES model_versions (version),
    -- the promoted version it is compared with, fixed when it starts
    stable text REFERENCES model_versions (version),
    status text NOT NULL DEFAULT 'waiting'
        CHECK (status IN ('waiting', 'running', 'paused', 'promoted', 'rolled_back', 'superseded')),
    -- index into the configured ladder; the candidate's share is ladder[step]
    step integer NOT NULL DEFAULT 0 CHECK (step >= 0),
    step_started_at timestamptz,
    -- evidence counts from here (impressions, clicks, ratings, judgments)
    started_at timestamptz,
    finished_at timestamptz,
    -- a finished canary's end applied to serving and the lifecycle (until
    -- then every look tries again)
    settled_at timestamptz,
    -- why it waits, when it does (e.g. "no promoted version to compare with")
    note text,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- one canary in flight at a time
CREATE UNIQUE INDEX canaries_one_in_flight ON canaries ((true))
    WHERE status IN ('running', 'paused');

CREATE TABLE canary_decisions (
    id bigserial PRIMARY KEY,
    -- the event id of its canary.decision.v1 message (published from here)
    event_id uuid NOT NULL UNIQUE,
    canary_id bigint NOT NULL REFERENCES canaries (id),
    candidate text NOT NULL,
    stable text,
    action text NOT NULL
        CHECK (action IN ('start', 'hold', 'advance', 'promote', 'rollback', 'pause', 'resume', 'supersede')),
    step_from integer NOT NULL,
    step_to integer NOT NULL,
    -- the candidate's share of traffic after the decision, in [0, 1]
    share double precision NOT NULL,
    automatic boolean NOT NULL,
    actor text NOT NULL,
    reason text NOT NULL,
    evidence jsonb NOT NULL,
    at timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz
);

-- a step is entered once, and a canary ends once: a controller killed
-- between deciding and applying re-applies the stored decision, never a
-- second one
CREATE UNIQUE INDEX canary_decisions_once ON canary_decisions (canary_id, action, step_to)
    WHERE action IN ('start', 'advance', 'promote', 'rollback', 'supersede');
CREATE INDEX canary_decisions_by_canary ON canary_decisions (canary_id, id);
CREATE INDEX canary_decisions_unpublished ON canary_decisions (id) WHERE published_at IS NULL;

CREATE TABLE canary_judgments (
    canary_id bigint NOT NULL REFERENCES canaries (id),
    query text NOT NULL,
    aspect text NOT NULL CHECK (aspect IN ('aesthetic', 'relevance')),
    -- the candidate's row against the stable's: 1 win, 0 similar, -1 loss
    preference smallint NOT NULL CHECK (preference IN (-1, 0, 1)),
    tokens bigint NOT NULL DEFAULT 0,
    at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (canary_id, query, aspect)
);
