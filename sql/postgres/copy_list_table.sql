-- Bulk load of one version table from a CSV stream (pipeline.serving renders it with Arrow:
-- strings always quoted, NULL as an unquoted empty field, so '' and NULL stay distinct).
-- FREEZE: the table was created in this transaction, so its rows can be written frozen and
-- all-visible; readers never rewrite its pages for hint bits and VACUUM has nothing to freeze.
-- Placeholders: schema, table (identifiers), columns (a list of identifiers: the six list
-- columns, plus model_version, variant, experiment when they are stored per row).
COPY {schema}.{table} ({columns})
FROM STDIN WITH (FORMAT csv, HEADER false, ENCODING 'UTF8', FREEZE true)
