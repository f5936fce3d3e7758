-- Planner statistics for the new table before it goes live (a sample, cost independent of size).
ANALYZE {schema}.{table};
