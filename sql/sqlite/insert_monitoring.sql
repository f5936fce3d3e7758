-- Parameters: one monitoring row (see 002_monitoring.sql), timestamps as ISO text.
INSERT INTO monitoring
       (run_date, source, metric, subject, value, status, window_start, window_end, reference,
        model_version)
VALUES (:run_date, :source, :metric, :subject, :value, :status, :window_start, :window_end,
        :reference, :model_version)
