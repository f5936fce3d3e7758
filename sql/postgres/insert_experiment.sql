-- Parameters: name, version, action, config (JSON text), changed_by, reason, changed_at (NULL:
-- now()). Idempotent per (name, version): a repeat inserts nothing and returns no row.
INSERT INTO {schema}.experiments (name, version, action, config, changed_by, reason, changed_at)
VALUES (%(name)s, %(version)s, %(action)s, %(config)s::jsonb, %(changed_by)s, %(reason)s,
        coalesce(%(changed_at)s::timestamptz, now()))
ON CONFLICT (name, version) DO NOTHING
RETURNING id
