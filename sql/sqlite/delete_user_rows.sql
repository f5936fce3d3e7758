-- Erasure: delete the rows of some users from one table with a user_id column. Placeholder:
-- table (quoted identifier). Parameter: ids, a JSON array of user ids.
DELETE FROM {table} WHERE user_id IN (SELECT value FROM json_each(:ids))
