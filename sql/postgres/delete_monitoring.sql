-- Parameters: run_date, source. A monitor re-run replaces the rows of its run.
DELETE FROM {schema}.monitoring WHERE run_date = %(run_date)s AND source = %(source)s
