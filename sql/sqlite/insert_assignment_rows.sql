INSERT INTO {assignments} (user_id, experiment, variant) VALUES (?, ?, ?)
