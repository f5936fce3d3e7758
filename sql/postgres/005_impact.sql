-- The impact table (idempotent): what the published lists did, one row per day, model version
-- and variant (see pipeline/monitoring/impact.py for the metrics). An impact run for an as-of
-- date replaces the rows of the days it attributed ([as_of - days, as_of)): late feedback
-- updates them.
-- Placeholders as in 001_schema.sql. No grant: the CMS role reads the views only.

CREATE TABLE IF NOT EXISTS {schema}.impact (
    day                    timestamptz NOT NULL,
    cutoff                 timestamptz NOT NULL,
    model_version          text        NOT NULL,
    variant                text        NOT NULL,
    users_served           bigint,
    users_active           bigint,
    impressions            bigint,
    clicks                 bigint,
    ctr                    double precision,
    engaged_users          bigint,
    engaged_share          double precision,
    converted_users        bigint,
    conversion             double precision,
    revenue                double precision,
    revenue_per_active     double precision,
    impressions_top3       bigint,
    clicks_top3            bigint,
    ctr_top3               double precision,
    engaged_users_top3     bigint,
    engaged_share_top3     double precision,
    converted_users_top3   bigint,
    conversion_top3        double precision,
    revenue_top3           double precision,
    revenue_per_active_top3 double precision,
    computed_as_of         timestamptz NOT NULL,
    recorded_at            timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (day, model_version, variant)
);
