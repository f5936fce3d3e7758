-- Rows of one user in a version table (an index probe). Parameter: user_id.
SELECT count(*) FROM {schema}.{table} WHERE user_id = %(user_id)s
