-- After the load and the validation: the CMS lookup index, then planner statistics.
CREATE UNIQUE INDEX {index} ON {schema}.{table} (user_id, rank);
ANALYZE {schema}.{table};
