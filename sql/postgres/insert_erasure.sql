-- Parameters: request_id, requested_at, requested_by, reason, users, removed (JSON text),
-- model_versions (JSON text). Idempotent per request_id: a repeat inserts nothing, returns no
-- row.
INSERT INTO {schema}.erasures
       (request_id, requested_at, requested_by, reason, users, removed, model_versions)
VALUES (%(request_id)s, %(requested_at)s, %(requested_by)s, %(reason)s, %(users)s,
        %(removed)s::jsonb, %(model_versions)s::jsonb)
ON CONFLICT (request_id) DO NOTHING
RETURNING id
