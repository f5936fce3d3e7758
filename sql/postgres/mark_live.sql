-- Catalog side of the swap (same transaction as swap_view.sql). Parameter: version.
UPDATE {schema}.recommendation_versions
SET status = 'retired', retired_at = now()
WHERE status = 'live' AND version <> %(version)s;

UPDATE {schema}.recommendation_versions
SET status = 'live', published_at = now(), error = NULL
WHERE version = %(version)s;
