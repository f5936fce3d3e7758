-- Points the CMS views at a new version: recommendations at its list table,
-- recommendation_assignments at its assignments table. Runs inside the short swap transaction,
-- followed by the catalog status update; CREATE OR REPLACE VIEW takes an ACCESS EXCLUSIVE lock
-- on each view, so lock_timeout bounds how long CMS readers can queue behind it.
-- model_version and generated_at (literals) are the version's constants: model_version is
-- stored per row only while an experiment runs, and the view falls back to the constant.
-- variant and experiment come after the original eight columns, so queries written for those
-- keep working. Placeholders: lock_timeout, model_version, generated_at, reader_role_lit
-- (literals); schema, view, assignments_view, table, assignments, reader_role (identifiers).
SET LOCAL lock_timeout = {lock_timeout};

CREATE OR REPLACE VIEW {schema}.{view} AS
SELECT user_id, rank, item_id, score, reason, source,
       coalesce(model_version, {model_version}::text) AS model_version,
       {generated_at}::timestamptz AS generated_at,
       variant, experiment
FROM {schema}.{table};

CREATE OR REPLACE VIEW {schema}.{assignments_view} AS
SELECT user_id, experiment, variant
FROM {schema}.{assignments};

-- Grants on a view survive CREATE OR REPLACE; re-granting keeps a fresh schema right.
DO $do$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = {reader_role_lit}) THEN
        GRANT SELECT ON {schema}.{view}, {schema}.{assignments_view} TO {reader_role};
    END IF;
END
$do$;
