SELECT version, table_name, rows, users, model_version, logical_date, created_at, status,
       published_at
FROM recommendation_versions
WHERE status = 'live'
