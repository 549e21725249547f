-- The search side: model versions, the catalog's embeddings per version, and
-- the deployments that route traffic to versions.

-- One row per encoder version search can serve. `encoder_dir` is the encoder
-- directory (docs/ENCODER_CONTRACT.md) on the search host; `parent` is the
-- version an aligned one was derived from (an adapter on the parent's image
-- tower lets `kalonctl index` reuse the parent's embeddings).
CREATE TABLE model_versions (
    version        text COLLATE "C" PRIMARY KEY CHECK (version ~ '^[A-Za-z0-9._-]{1,64}$'),
    encoder_dir    text        NOT NULL,
    parent         text COLLATE "C" REFERENCES model_versions (version),
    embedding_dim  integer     NOT NULL CHECK (embedding_dim > 0),
    images_indexed integer     NOT NULL DEFAULT 0,
    indexed_at     timestamptz,
    -- how the embeddings were made: 'tower' or 'adapter-reuse', and timings
    index_notes    jsonb       NOT NULL DEFAULT '{}',
    created_at     timestamptz NOT NULL DEFAULT now()
);

-- The catalog's image embeddings per version: little-endian f32, unit
-- length, embedding_dim of them. bytea, not real[]: a quarter of the bytes
-- on the wire and no per-element parsing when search loads 100,000 rows.
CREATE TABLE image_embeddings (
    model_version text COLLATE "C" NOT NULL REFERENCES model_versions (version) ON DELETE CASCADE,
    image_id      text COLLATE "C" NOT NULL,
    embedding     bytea       NOT NULL,
    PRIMARY KEY (model_version, image_id)
);

-- The versions search serves and their share of traffic. A request goes to
-- one row by a stable hash of its session (or user), weighted by `weight`;
-- weight 0 keeps a version loaded but sends it nothing. Every change is also
-- announced on the model.deployment.v1 topic, so search replicas reload
-- without a restart.
CREATE TABLE deployments (
    model_version text COLLATE "C" PRIMARY KEY REFERENCES model_versions (version),
    variant       text        NOT NULL CHECK (variant ~ '^[A-Za-z0-9._-]{1,64}$'),
    weight        double precision NOT NULL CHECK (weight >= 0 AND weight <= 1000000),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (variant)
);
