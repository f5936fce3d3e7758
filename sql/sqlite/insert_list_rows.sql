INSERT INTO {table} (user_id, rank, item_id, score, reason, source, model_version, generated_at,
                     variant, experiment)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
