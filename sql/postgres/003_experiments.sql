-- The experiments table (idempotent): the audit trail of A/B experiments, one row per start,
-- change or stop (pipeline.serving.store.record_experiment). Placeholders as in 001_schema.sql.
-- No grant: the CMS role reads the view only.
--
--   name        the experiment (pipeline.serving.experiments.Experiment.name)
--   version     the config's version: it grows with every change; (name, version) is unique,
--               so a retried task that records the same version again adds no row
--   action      'start' | 'change' | 'stop'
--   config      the whole config of that version (variants, shares, buckets, last_change)
--   changed_by  who: 'manual by alice', 'cli', 'dag recommendations_nightly', ...
--   reason      why, free text
--   changed_at  when it was recorded (the database clock unless given)

CREATE TABLE IF NOT EXISTS {schema}.experiments (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        text        NOT NULL CHECK (name <> ''),
    version     integer     NOT NULL CHECK (version >= 1),
    action      text        NOT NULL CHECK (action IN ('start', 'change', 'stop')),
    config      jsonb       NOT NULL,
    changed_by  text        NOT NULL CHECK (changed_by <> ''),
    reason      text,
    changed_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (name, version)
);

CREATE INDEX IF NOT EXISTS experiments_changed_at ON {schema}.experiments (changed_at);
