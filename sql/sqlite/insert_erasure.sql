-- Parameters: request_id, requested_at (ISO text), requested_by, reason, users, removed (JSON
-- text), model_versions (JSON text). Idempotent per request_id: a repeat inserts nothing,
-- returns no row.
INSERT INTO erasures (request_id, requested_at, requested_by, reason, users, removed,
                      model_versions)
VALUES (:request_id, :requested_at, :requested_by, :reason, :users, :removed, :model_versions)
ON CONFLICT (request_id) DO NOTHING
RETURNING id
