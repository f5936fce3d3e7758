-- A/B experiments in the views (idempotent; run with the other migrations before every
-- publish). Placeholders as in 001_schema.sql, plus view / assignments_view (identifiers) and
-- view_lit / assignments_view_lit (the same names as literals).
--
-- 1. A view recommendations from before experiments (eight columns, over a version table
--    without variant and experiment) gets both as NULL columns after the others, over the same
--    table and definition: the live version keeps being served unchanged, and readers that ask
--    for the new columns work at once. The next publish's swap points it at a new table that
--    stores them (swap_view.sql). CREATE OR REPLACE may append columns; grants survive it.
-- 2. The view recommendation_assignments (user_id, experiment, variant), granted to the reader
--    role like recommendations, is created empty when missing (the live version then predates
--    experiments: nobody is assigned); the next swap points it at the new version's
--    assignments table.
DO $do$
DECLARE
    view_oid    oid;
    definition  text;
    saved_path  text := current_setting('search_path');
BEGIN
    SELECT c.oid INTO view_oid
    FROM pg_class c
    JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = {schema_lit} AND c.relname = {view_lit} AND c.relkind = 'v';

    IF view_oid IS NOT NULL AND NOT EXISTS (
        SELECT 1 FROM pg_attribute
        WHERE attrelid = view_oid AND attname = 'variant' AND NOT attisdropped
    ) THEN
        -- An empty search_path makes the definition name every table with its schema.
        PERFORM set_config('search_path', '', true);
        definition := rtrim(btrim(pg_get_viewdef(view_oid)), ';');
        PERFORM set_config('search_path', saved_path, true);
        EXECUTE format('CREATE OR REPLACE VIEW %I.%I AS SELECT previous.*, '
                       'NULL::text AS variant, NULL::text AS experiment FROM (%s) AS previous',
                       {schema_lit}, {view_lit}, definition);
        RAISE NOTICE 'view %.% upgraded: variant and experiment (NULL) added to the live version',
            {schema_lit}, {view_lit};
    END IF;

    IF to_regclass(format('%I.%I', {schema_lit}, {assignments_view_lit})) IS NULL THEN
        CREATE VIEW {schema}.{assignments_view} AS
        SELECT NULL::text COLLATE "C" AS user_id, NULL::text AS experiment,
               NULL::text AS variant
        WHERE false;
        IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = {reader_role_lit}) THEN
            GRANT SELECT ON {schema}.{assignments_view} TO {reader_role};
        END IF;
    END IF;
END
$do$;
