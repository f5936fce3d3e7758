-- No parameters. Serialises writers of the experiments table for one transaction (the checks
-- "one running experiment" and "newer version" and the insert); readers are not blocked.
LOCK TABLE {schema}.experiments IN SHARE ROW EXCLUSIVE MODE
