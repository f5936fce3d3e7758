-- Bulk load of one version's assignments table (CSV as in copy_list_table.sql).
-- Placeholders: schema, assignments (identifiers).
COPY {schema}.{assignments} (user_id, experiment, variant)
FROM STDIN WITH (FORMAT csv, HEADER false, ENCODING 'UTF8', FREEZE true)
