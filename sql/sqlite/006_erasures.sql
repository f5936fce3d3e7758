-- The erasures table (idempotent): one row per completed right-to-erasure request. Same
-- columns as sql/postgres/006_erasures.sql; removed and model_versions are JSON text,
-- timestamps ISO-8601 UTC text. No user id is stored here, only counts.

CREATE TABLE IF NOT EXISTS erasures (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id      TEXT    NOT NULL UNIQUE CHECK (request_id <> ''),
    requested_at    TEXT    NOT NULL,
    completed_at    TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now')),
    requested_by    TEXT    NOT NULL CHECK (requested_by <> ''),
    reason          TEXT,
    users           INTEGER NOT NULL CHECK (users >= 0),
    removed         TEXT    NOT NULL DEFAULT '{}' CHECK (json_valid(removed)),
    model_versions  TEXT    NOT NULL DEFAULT '[]' CHECK (json_valid(model_versions))
);
