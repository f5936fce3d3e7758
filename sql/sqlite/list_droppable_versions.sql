-- Version tables still present, newest first (pipeline.serving keeps the newest keep_versions
-- live/retired ones and drops the rest, failed leftovers included).
SELECT version, table_name, status
FROM recommendation_versions
WHERE dropped_at IS NULL AND status <> 'loading'
ORDER BY version DESC
