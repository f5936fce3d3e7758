-- Parameters: name (text or NULL: every experiment). Oldest record first.
SELECT id, name, version, action, config, changed_by, reason, changed_at
FROM experiments
WHERE :name IS NULL OR name = :name
ORDER BY id
