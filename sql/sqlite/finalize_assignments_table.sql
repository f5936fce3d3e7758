-- After the load: one assignment per user (the unique index proves it), then statistics.
CREATE UNIQUE INDEX {index} ON {assignments} (user_id);
ANALYZE {assignments};
