-- Catalog side of the swap (same transaction as swap_view.sql). Parameter: version.
UPDATE recommendation_versions
SET status = 'retired', retired_at = strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now')
WHERE status = 'live' AND version <> :version;

UPDATE recommendation_versions
SET status = 'live', published_at = strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now'), error = NULL
WHERE version = :version;
