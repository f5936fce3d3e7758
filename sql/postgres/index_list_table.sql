-- After the load: the CMS lookup index; unique, so it also proves one row per (user, rank).
-- Placeholders: schema, table, index (identifiers), memory (literal, e.g. '256MB').
SET LOCAL maintenance_work_mem = {memory};

CREATE UNIQUE INDEX {index} ON {schema}.{table} (user_id, rank);
