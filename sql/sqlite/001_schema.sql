-- Serving DB schema for the embedded SQLite file (idempotent; run by
-- pipeline.serving.ensure_schema on every publish). Same catalog, audit table, version tables and
-- view as PostgreSQL, without schemas and roles. Timestamps are ISO-8601 UTC text.
-- This file has no placeholders.

CREATE TABLE IF NOT EXISTS recommendation_versions (
    version        INTEGER PRIMARY KEY AUTOINCREMENT,
    table_name     TEXT    NOT NULL UNIQUE,
    rows           INTEGER NOT NULL CHECK (rows >= 0),
    users          INTEGER NOT NULL CHECK (users >= 0),
    model_version  TEXT    NOT NULL,
    logical_date   TEXT    NOT NULL,
    created_at     TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now')),
    status         TEXT    NOT NULL DEFAULT 'loading'
                   CHECK (status IN ('loading', 'live', 'retired', 'failed')),
    published_at   TEXT,
    retired_at     TEXT,
    dropped_at     TEXT,
    error          TEXT
);

-- At most one live version, enforced by the database.
CREATE UNIQUE INDEX IF NOT EXISTS recommendation_versions_one_live
    ON recommendation_versions (status) WHERE status = 'live';

CREATE TABLE IF NOT EXISTS model_promotions (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    decided_at     TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now')),
    model_name     TEXT    NOT NULL,
    model_version  TEXT    NOT NULL,
    decision       TEXT    NOT NULL CHECK (decision <> ''),
    reason         TEXT,
    metrics        TEXT    NOT NULL DEFAULT '{}' CHECK (json_valid(metrics)),
    triggered_by   TEXT
);

CREATE INDEX IF NOT EXISTS model_promotions_model
    ON model_promotions (model_name, decided_at);
