-- Parameters: name, version. The record of that version, if any.
SELECT id, name, version, action, config, changed_by, reason, changed_at
FROM experiments
WHERE name = :name AND version = :version
