-- After the load: the CMS lookup index of the assignments; unique, so it also proves one
-- assignment per user. Then planner statistics. Placeholders: schema, assignments, index.
CREATE UNIQUE INDEX {index} ON {schema}.{assignments} (user_id);

ANALYZE {schema}.{assignments};
