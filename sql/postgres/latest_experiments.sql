-- No parameters. The newest record (highest version) of every experiment, oldest first; those
-- whose action is not 'stop' are running.
SELECT e.id, e.name, e.version, e.action, e.config, e.changed_by, e.reason, e.changed_at
FROM {schema}.experiments AS e
WHERE e.version = (SELECT max(n.version) FROM {schema}.experiments AS n WHERE n.name = e.name)
ORDER BY e.id
