-- Parameters: name (text or NULL: every experiment). Oldest record first.
SELECT id, name, version, action, config, changed_by, reason, changed_at
FROM {schema}.experiments
WHERE %(name)s::text IS NULL OR name = %(name)s::text
ORDER BY id
