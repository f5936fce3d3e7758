-- Parameters: name, version, action, config (JSON text), changed_by, reason, changed_at (ISO
-- text or NULL: now). Idempotent per (name, version): a repeat inserts nothing, returns no row.
INSERT INTO experiments (name, version, action, config, changed_by, reason, changed_at)
VALUES (:name, :version, :action, :config, :changed_by, :reason,
        coalesce(:changed_at, strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now')))
ON CONFLICT (name, version) DO NOTHING
RETURNING id
