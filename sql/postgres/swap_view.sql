-- Points the CMS view at a new version table. Runs inside the short swap transaction, followed
-- by the catalog status update; CREATE OR REPLACE VIEW takes an ACCESS EXCLUSIVE lock on the
-- view, so lock_timeout bounds how long CMS readers can queue behind it.
-- model_version and generated_at (literals) are the version's constants (not stored per row).
-- Placeholders: lock_timeout, model_version, generated_at, reader_role_lit (literals); schema,
-- view, table, reader_role (identifiers).
SET LOCAL lock_timeout = {lock_timeout};

CREATE OR REPLACE VIEW {schema}.{view} AS
SELECT user_id, rank, item_id, score, reason, source,
       {model_version}::text AS model_version, {generated_at}::timestamptz AS generated_at
FROM {schema}.{table};

-- Grants on a view survive CREATE OR REPLACE; re-granting keeps a fresh schema right.
DO $do$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = {reader_role_lit}) THEN
        GRANT SELECT ON {schema}.{view} TO {reader_role};
    END IF;
END
$do$;
