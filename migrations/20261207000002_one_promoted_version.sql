-- At most one model version is promoted: kalon-registry's lifecycle retires
-- the previous one in the same transaction as it promotes the next, and
-- this index makes any other path that tries to keep two fail.
CREATE UNIQUE INDEX model_versions_one_promoted ON model_versions ((true))
    WHERE state = 'promoted';
