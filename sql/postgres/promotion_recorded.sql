-- Parameters: model_name, model_version. The newest recorded decision on that version, if any.
SELECT id, decision
FROM {schema}.model_promotions
WHERE model_name = %(model_name)s AND model_version = %(model_version)s
ORDER BY id DESC
LIMIT 1
