-- The CMS lookup with the fallback list, in one statement (one snapshot, one view expansion).
-- Parameters: user_id, default_user.
SELECT user_id, rank, item_id, score, reason, source, model_version, generated_at
FROM {schema}.{view}
WHERE user_id = CASE
        WHEN EXISTS (SELECT 1 FROM {schema}.{view} WHERE user_id = %(user_id)s) THEN %(user_id)s
        ELSE %(default_user)s
      END
ORDER BY rank
