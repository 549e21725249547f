-- The enricher's tables: a durable queue of queries to rephrase, the LLM's
-- rephrasings, malformed answers, and LMM judgments.

-- One row per normalised query seen in impressions. The consumer only
-- upserts here (so it never waits on the LLM); workers claim due rows with
-- a lease, so a crashed worker's query is picked up again when the lease
-- runs out. 'pending' rows wait for next_attempt_at (backoff while the LLM
-- fails); 'done' rows are asked again only after the TTL.
CREATE TABLE enrich_queries (
    query           text COLLATE "C" PRIMARY KEY,
    status          text        NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'done')),
    attempts        integer     NOT NULL DEFAULT 0,
    first_seen_at   timestamptz NOT NULL DEFAULT now(),
    last_seen_at    timestamptz NOT NULL DEFAULT now(),
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    lease_until     timestamptz,
    enriched_at     timestamptz,
    last_error      text
);
CREATE INDEX enrich_queries_due_idx ON enrich_queries (next_attempt_at) WHERE status = 'pending';

-- The LLM's rephrasing of a query in one prompt variant, with what it cost.
CREATE TABLE query_rephrasings (
    query             text COLLATE "C" NOT NULL,
    variant           text        NOT NULL,
    rephrasing        text        NOT NULL,
    model             text        NOT NULL,
    latency_ms        double precision NOT NULL,
    prompt_tokens     bigint      NOT NULL,
    completion_tokens bigint      NOT NULL,
    -- answered only to the strict prompt (the first answer was malformed)
    strict            boolean     NOT NULL,
    raw_response      text        NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (query, variant)
);

-- Every model answer that could not be parsed, kept for diagnosis; the
-- last of a task's answers is dead_lettered when the strict retry failed too.
CREATE TABLE llm_malformed (
    id            bigserial PRIMARY KEY,
    task          text        NOT NULL,
    query         text COLLATE "C" NOT NULL,
    variant       text,
    strict        boolean     NOT NULL,
    error         text        NOT NULL,
    raw_response  text        NOT NULL,
    dead_lettered boolean     NOT NULL DEFAULT false,
    created_at    timestamptz NOT NULL DEFAULT now()
);

-- LMM judgments of two result rows: order-consistent comparisons (verdict
-- from both orders) and 1-5 scores (averaged over both orders).
CREATE TABLE lmm_judgments (
    judgment_id       uuid PRIMARY KEY,
    query             text COLLATE "C" NOT NULL,
    aspect            text        NOT NULL CHECK (aspect IN ('accuracy', 'aesthetic')),
    kind              text        NOT NULL CHECK (kind IN ('compare', 'score')),
    row_a             jsonb       NOT NULL,
    row_b             jsonb       NOT NULL,
    verdict           text CHECK (verdict IN ('win', 'loss', 'similar')),
    a_first           text CHECK (a_first IN ('A', 'B')),
    b_first           text CHECK (b_first IN ('A', 'B')),
    score_a           double precision,
    score_b           double precision,
    model             text        NOT NULL,
    prompt_tokens     bigint      NOT NULL,
    completion_tokens bigint      NOT NULL,
    cost_usd          double precision NOT NULL,
    latency_ms        double precision NOT NULL,
    raw_responses     jsonb       NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX lmm_judgments_query_idx ON lmm_judgments (query);
