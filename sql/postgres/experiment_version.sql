-- Parameters: name, version. The record of that version, if any.
SELECT id, name, version, action, config, changed_by, reason, changed_at
FROM {schema}.experiments
WHERE name = %(name)s AND version = %(version)s
