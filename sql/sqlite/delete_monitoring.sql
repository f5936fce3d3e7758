-- Parameters: run_date (ISO text), source. A monitor re-run replaces the rows of its run.
DELETE FROM monitoring WHERE run_date = :run_date AND source = :source
