-- The erasures table (idempotent): one row per completed right-to-erasure request
-- (pipeline.erasure.forget_users). Placeholders as in 001_schema.sql. No grant: the CMS role
-- reads the views only. No user id is stored here, in clear or hashed: only counts.
--
--   request_id      the request (the Airflow run id, or a random id for the CLI); unique, so a
--                   retried task that records the same request again adds no row
--   requested_at    when the erasure started (a retry after a crash keeps the first time)
--   completed_at    when it was recorded (the database clock)
--   requested_by    who asked: 'manual by alice', 'dpo', ...
--   reason          why: the ticket or request reference, free text
--   users           how many user ids the request named
--   removed         rows (or files) removed per store (a JSON object: store -> count)
--   model_versions  registered versions of the model trained on data that still held them
--                   (they are replaced by the next nightly's retraining)

CREATE TABLE IF NOT EXISTS {schema}.erasures (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    request_id      text        NOT NULL UNIQUE CHECK (request_id <> ''),
    requested_at    timestamptz NOT NULL,
    completed_at    timestamptz NOT NULL DEFAULT now(),
    requested_by    text        NOT NULL CHECK (requested_by <> ''),
    reason          text,
    users           integer     NOT NULL CHECK (users >= 0),
    removed         jsonb       NOT NULL DEFAULT '{{}}'::jsonb,
    model_versions  jsonb       NOT NULL DEFAULT '[]'::jsonb
);
