-- The live version's experiment assignments. Parameter: user_id (NULL: every user).
SELECT user_id, experiment, variant
FROM {assignments_view}
WHERE :user_id IS NULL OR user_id = :user_id
ORDER BY user_id
