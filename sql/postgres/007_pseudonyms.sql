-- The pseudonym mapping (idempotent): the only way back from a user id as the pipeline stores
-- it (a keyed HMAC pseudonym, pipeline.core.privacy) to the CMS's own id. Written at ingest
-- (pipeline.serving.pseudonyms.record_pseudonyms, before the rows enter the lake), read at
-- publish (lists computed for pseudonyms are served under the CMS's ids) and by the demo's
-- simulated CMS; an erasure deletes a user's row (it has a user_id column, user_tables.sql).
-- Placeholders as in 001_schema.sql.
--
-- No grant: cms_reader reads the views only. Whoever reads this table can re-identify every
-- pseudonym in the lake, run folders and model bundles: keep it with the serving data, never
-- export it with the lake. PUBLIC's default privileges are revoked explicitly.
--
--   pseudonym   ps_ + 32 hex digits of HMAC-SHA256(key, CMS id)
--   user_id     the CMS's id
--   first_seen  when the pair was first recorded (the database clock)

CREATE TABLE IF NOT EXISTS {schema}.user_pseudonyms (
    pseudonym   text        PRIMARY KEY CHECK (pseudonym <> ''),
    user_id     text        NOT NULL CHECK (user_id <> ''),
    first_seen  timestamptz NOT NULL DEFAULT now()
);

-- Erasure deletes by CMS id.
CREATE INDEX IF NOT EXISTS user_pseudonyms_user_id ON {schema}.user_pseudonyms (user_id);

REVOKE ALL ON {schema}.user_pseudonyms FROM PUBLIC;
