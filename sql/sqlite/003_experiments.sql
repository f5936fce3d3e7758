-- The experiments table (idempotent): the audit trail of A/B experiments, one row per start,
-- change or stop. Same columns as sql/postgres/003_experiments.sql; config is JSON text,
-- timestamps are ISO-8601 UTC text.

CREATE TABLE IF NOT EXISTS experiments (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    name        TEXT    NOT NULL CHECK (name <> ''),
    version     INTEGER NOT NULL CHECK (version >= 1),
    action      TEXT    NOT NULL CHECK (action IN ('start', 'change', 'stop')),
    config      TEXT    NOT NULL CHECK (json_valid(config)),
    changed_by  TEXT    NOT NULL CHECK (changed_by <> ''),
    reason      TEXT,
    changed_at  TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now')),
    UNIQUE (name, version)
);

CREATE INDEX IF NOT EXISTS experiments_changed_at ON experiments (changed_at);
