-- Reserves the next version number and records it as loading. Parameters: schema (its name, as
-- a value: quote_ident builds the catalog's qualified name for the identity sequence), rows,
-- users, model_version, logical_date. Returns version, table_name.
INSERT INTO {schema}.recommendation_versions
       (version, table_name, rows, users, model_version, logical_date, status)
SELECT v, 'recommendations_v' || v, %(rows)s, %(users)s, %(model_version)s, %(logical_date)s, 'loading'
FROM (SELECT nextval(pg_get_serial_sequence(quote_ident(%(schema)s) || '.recommendation_versions',
                                         'version'))::integer AS v) AS next_version
RETURNING version, table_name
