-- Parameters: since (timestamptz or NULL), source (text or NULL). Oldest run first.
SELECT run_date, source, metric, subject, value, status, window_start, window_end, reference,
       model_version
FROM {schema}.monitoring
WHERE (%(since)s::timestamptz IS NULL OR run_date >= %(since)s::timestamptz)
  AND (%(source)s::text IS NULL OR source = %(source)s::text)
ORDER BY run_date, source, metric, subject
