-- Like swap_view.sql, for when CREATE OR REPLACE VIEW refuses (a column's type or collation
-- differs from the live table's, e.g. after a change of create_list_table.sql): drop and create
-- the views in the same short transaction. Readers queued behind the lock look the name up
-- again and read the new view. Placeholders: as in swap_view.sql.
SET LOCAL lock_timeout = {lock_timeout};

DROP VIEW IF EXISTS {schema}.{view};

DROP VIEW IF EXISTS {schema}.{assignments_view};

CREATE VIEW {schema}.{view} AS
SELECT user_id, rank, item_id, score, reason, source,
       coalesce(model_version, {model_version}::text) AS model_version,
       {generated_at}::timestamptz AS generated_at,
       variant, experiment
FROM {schema}.{table};

CREATE VIEW {schema}.{assignments_view} AS
SELECT user_id, experiment, variant
FROM {schema}.{assignments};

DO $do$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = {reader_role_lit}) THEN
        GRANT SELECT ON {schema}.{view}, {schema}.{assignments_view} TO {reader_role};
    END IF;
END
$do$;
