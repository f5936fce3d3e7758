-- The pseudonym mapping (idempotent): pseudonym (ps_ + 32 hex digits of HMAC-SHA256(key, CMS
-- id)) -> the CMS's id. Same columns as sql/postgres/007_pseudonyms.sql; first_seen is
-- ISO-8601 UTC text. Written at ingest, read at publish; an erasure deletes a user's row.

CREATE TABLE IF NOT EXISTS user_pseudonyms (
    pseudonym   TEXT NOT NULL PRIMARY KEY CHECK (pseudonym <> ''),
    user_id     TEXT NOT NULL CHECK (user_id <> ''),
    first_seen  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now'))
);

CREATE INDEX IF NOT EXISTS user_pseudonyms_user_id ON user_pseudonyms (user_id);
