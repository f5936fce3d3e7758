-- Every table with a user_id column: the list tables of every kept version and their
-- assignments tables today, and whatever holds user ids tomorrow (an erasure deletes from
-- all of them). Views are left out: they read these tables.
SELECT m.name
FROM sqlite_master m
WHERE m.type = 'table'
  AND EXISTS (SELECT 1 FROM pragma_table_info(m.name) p WHERE p.name = 'user_id')
ORDER BY m.name
