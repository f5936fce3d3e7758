-- Parameters: decided_at (NULL: now()), model_name, model_version, decision, reason, metrics
-- (JSON text), triggered_by. Returns id.
INSERT INTO {schema}.model_promotions
       (decided_at, model_name, model_version, decision, reason, metrics, triggered_by)
VALUES (coalesce(%(decided_at)s, now()), %(model_name)s, %(model_version)s, %(decision)s,
        %(reason)s, %(metrics)s::jsonb, %(triggered_by)s)
RETURNING id
