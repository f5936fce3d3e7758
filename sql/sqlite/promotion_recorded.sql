-- Parameters: model_name, model_version. The newest recorded decision on that version, if any.
SELECT id, decision
FROM model_promotions
WHERE model_name = :model_name AND model_version = :model_version
ORDER BY id DESC
LIMIT 1
