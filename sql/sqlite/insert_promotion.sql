-- Parameters: decided_at (NULL: now), model_name, model_version, decision, reason, metrics
-- (JSON text), triggered_by. Returns id.
INSERT INTO model_promotions
       (decided_at, model_name, model_version, decision, reason, metrics, triggered_by)
VALUES (coalesce(:decided_at, strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now')), :model_name,
        :model_version, :decision, :reason, :metrics, :triggered_by)
RETURNING id
