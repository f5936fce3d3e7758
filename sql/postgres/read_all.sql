SELECT user_id, rank, item_id, score, reason, source, model_version, generated_at, variant,
       experiment
FROM {schema}.{view}
ORDER BY user_id, rank
