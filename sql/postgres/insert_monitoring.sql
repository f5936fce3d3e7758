-- Parameters: one monitoring row (see 002_monitoring.sql).
INSERT INTO {schema}.monitoring
       (run_date, source, metric, subject, value, status, window_start, window_end, reference,
        model_version)
VALUES (%(run_date)s, %(source)s, %(metric)s, %(subject)s, %(value)s, %(status)s,
        %(window_start)s, %(window_end)s, %(reference)s, %(model_version)s)
