-- Reserves the next version number (AUTOINCREMENT never reuses one) and records it as loading.
INSERT INTO recommendation_versions (table_name, rows, users, model_version, logical_date, status)
VALUES ('pending', :rows, :users, :model_version, :logical_date, 'loading')
RETURNING version
