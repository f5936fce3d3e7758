-- Bulk load of one version table from a CSV stream (pipeline.serving renders it with Arrow:
-- strings always quoted, NULL as an unquoted empty field, so '' and NULL stay distinct).
COPY {schema}.{table} (user_id, rank, item_id, score, reason, source, model_version, generated_at)
FROM STDIN WITH (FORMAT csv, HEADER false, ENCODING 'UTF8')
