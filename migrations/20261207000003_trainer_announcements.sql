-- The trainer's outbox: a run's version is announced on model.registered.v1
-- after the registration committed; `announced_at` stays NULL until the
-- broker acknowledged, so a broker outage delays the event, never loses it.
ALTER TABLE training_runs ADD COLUMN announced_at timestamptz;
CREATE INDEX training_runs_unannounced ON training_runs (finished_at)
    WHERE state = 'succeeded' AND announced_at IS NULL;
