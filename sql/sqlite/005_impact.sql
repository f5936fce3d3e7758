-- The impact table (idempotent): what the published lists did, one row per day, model version
-- and variant (see pipeline/monitoring/impact.py for the metrics). An impact run for an as-of
-- date replaces the rows of the days it attributed ([as_of - days, as_of)): late feedback
-- updates them.
-- Same columns as sql/postgres/005_impact.sql; timestamps are ISO-8601 UTC text.

CREATE TABLE IF NOT EXISTS impact (
    day                    TEXT    NOT NULL,
    cutoff                 TEXT    NOT NULL,
    model_version          TEXT    NOT NULL,
    variant                TEXT    NOT NULL,
    users_served           INTEGER,
    users_active           INTEGER,
    impressions            INTEGER,
    clicks                 INTEGER,
    ctr                    REAL,
    engaged_users          INTEGER,
    engaged_share          REAL,
    converted_users        INTEGER,
    conversion             REAL,
    revenue                REAL,
    revenue_per_active     REAL,
    impressions_top3       INTEGER,
    clicks_top3            INTEGER,
    ctr_top3               REAL,
    engaged_users_top3     INTEGER,
    engaged_share_top3     REAL,
    converted_users_top3   INTEGER,
    conversion_top3        REAL,
    revenue_top3           REAL,
    revenue_per_active_top3 REAL,
    computed_as_of         TEXT    NOT NULL,
    recorded_at            TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now')),
    PRIMARY KEY (day, model_version, variant)
);
