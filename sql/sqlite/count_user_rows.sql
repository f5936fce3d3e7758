-- Erasure, dry run: how many rows of some users one table with a user_id column holds.
-- Placeholder: table (quoted identifier). Parameter: ids, a JSON array of user ids.
SELECT count(*) FROM {table} WHERE user_id IN (SELECT value FROM json_each(:ids))
