-- The erasure records, oldest first (removed and model_versions as JSON text).
SELECT id, request_id, requested_at, completed_at, requested_by, reason, users, removed,
       model_versions
FROM erasures
ORDER BY id
