-- The CMS lookup with the fallback lists, in one statement (one snapshot of both views, which
-- a publish swaps together). Parameters: user_id, default_user.
-- The user's own list; else, for a user a running experiment assigned (recommendation_
-- assignments), the variant's fallback '__default__:<variant>' (a holdout variant has none:
-- the user gets no rows, on purpose); else the default list '__default__'.
SELECT user_id, rank, item_id, score, reason, source, model_version, generated_at, variant,
       experiment
FROM {schema}.{view}
WHERE user_id = CASE
        WHEN EXISTS (SELECT 1 FROM {schema}.{view} WHERE user_id = %(user_id)s) THEN %(user_id)s
        ELSE coalesce((SELECT %(default_user)s || ':' || a.variant
                       FROM {schema}.{assignments_view} AS a
                       WHERE a.user_id = %(user_id)s),
                      %(default_user)s)
      END
ORDER BY rank
