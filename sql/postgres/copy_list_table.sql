-- Bulk load of one version table from a CSV stream (pipeline.serving renders it with Arrow:
-- strings always quoted, NULL as an unquoted empty field, so '' and NULL stay distinct).
-- FREEZE: the table was created in this transaction, so its rows can be written frozen and
-- all-visible; readers never rewrite its pages for hint bits and VACUUM has nothing to freeze.
COPY {schema}.{table} (user_id, rank, item_id, score, reason, source)
FROM STDIN WITH (FORMAT csv, HEADER false, ENCODING 'UTF8', FREEZE true)
