-- Parameters: since (ISO text or NULL), source (text or NULL). Oldest run first.
SELECT run_date, source, metric, subject, value, status, window_start, window_end, reference,
       model_version
FROM monitoring
WHERE (:since IS NULL OR run_date >= :since)
  AND (:source IS NULL OR source = :source)
ORDER BY run_date, source, metric, subject
