-- The monitoring table (idempotent): one row per metric, subject and window of a monitor run.
-- Same columns as sql/postgres/002_monitoring.sql; timestamps are ISO-8601 UTC text.

CREATE TABLE IF NOT EXISTS monitoring (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    run_date       TEXT    NOT NULL,
    source         TEXT    NOT NULL,
    metric         TEXT    NOT NULL,
    subject        TEXT    NOT NULL DEFAULT '',
    value          REAL,
    status         TEXT    NOT NULL CHECK (status IN ('ok', 'warn', 'alert', 'unknown')),
    window_start   TEXT,
    window_end     TEXT,
    reference      TEXT,
    model_version  TEXT,
    recorded_at    TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now')),
    UNIQUE (run_date, source, metric, subject)
);

CREATE INDEX IF NOT EXISTS monitoring_metric ON monitoring (metric, subject, run_date);
