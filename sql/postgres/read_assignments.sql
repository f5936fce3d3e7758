-- The live version's experiment assignments. Parameter: user_id (NULL: every user).
SELECT user_id, experiment, variant
FROM {schema}.{assignments_view}
WHERE %(user_id)s::text IS NULL OR user_id = %(user_id)s::text
ORDER BY user_id
