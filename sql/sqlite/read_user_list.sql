-- The CMS lookup with the fallback list, in one statement (one snapshot).
-- Parameters: user_id, default_user.
SELECT user_id, rank, item_id, score, reason, source, model_version, generated_at
FROM {view}
WHERE user_id = CASE
        WHEN EXISTS (SELECT 1 FROM {view} WHERE user_id = :user_id) THEN :user_id
        ELSE :default_user
      END
ORDER BY rank
