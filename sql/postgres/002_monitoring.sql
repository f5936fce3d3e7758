-- The monitoring table (idempotent): one row per metric, subject and window of a monitor run.
-- Placeholders as in 001_schema.sql. No grant: the CMS role reads the view only.
--
--   run_date      the monitor run's as-of moment (the current window ends here)
--   source        what computed the row ('monitor'; a re-run of (run_date, source) replaces
--                 its rows)
--   metric        'psi', 'volume_ratio', 'late_share', 'quarantine_share', ...
--   subject       what the metric is about: a feature ('user.recency_days'), or '' for the run
--   value         the metric (NULL when it cannot be computed, status 'unknown')
--   status        'ok' | 'warn' | 'alert' | 'unknown' against the thresholds in force
--   window_start/window_end  the current window the value describes
--   reference     what it was compared with (the champion's training window), free text

CREATE TABLE IF NOT EXISTS {schema}.monitoring (
    id             bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_date       timestamptz NOT NULL,
    source         text        NOT NULL,
    metric         text        NOT NULL,
    subject        text        NOT NULL DEFAULT '',
    value          double precision,
    status         text        NOT NULL
                   CHECK (status IN ('ok', 'warn', 'alert', 'unknown')),
    window_start   timestamptz,
    window_end     timestamptz,
    reference      text,
    model_version  text,
    recorded_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (run_date, source, metric, subject)
);

CREATE INDEX IF NOT EXISTS monitoring_metric
    ON {schema}.monitoring (metric, subject, run_date);
