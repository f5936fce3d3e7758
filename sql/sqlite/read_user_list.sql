-- The CMS lookup with the fallback lists, in one statement (one snapshot); the rule of
-- sql/postgres/read_user_list.sql. Parameters: user_id, default_user.
SELECT user_id, rank, item_id, score, reason, source, model_version, generated_at, variant,
       experiment
FROM {view}
WHERE user_id = CASE
        WHEN EXISTS (SELECT 1 FROM {view} WHERE user_id = :user_id) THEN :user_id
        ELSE coalesce((SELECT :default_user || ':' || a.variant
                       FROM {assignments_view} AS a
                       WHERE a.user_id = :user_id),
                      :default_user)
      END
ORDER BY rank
