-- Every table of the serving schema with a user_id column: the list tables of every kept
-- version and their assignments tables today, and whatever holds user ids tomorrow (an
-- erasure deletes from all of them). Views are left out: they read these tables.
SELECT c.relname
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_attribute a ON a.attrelid = c.oid
WHERE n.nspname = {schema_lit}
  AND c.relkind IN ('r', 'p')
  AND a.attname = 'user_id'
  AND NOT a.attisdropped
ORDER BY c.relname
