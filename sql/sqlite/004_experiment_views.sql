-- A/B experiments in the views (idempotent). The conditional part, upgrading a view
-- recommendations from before experiments (no variant and experiment columns: NULLs are
-- added over the same live table), runs in pipeline.serving.sqlite (SqliteBackend.migrate):
-- SQLite has no procedural blocks. Here: the assignments view, empty until the next publish
-- swaps it to that version's assignments table.
CREATE VIEW IF NOT EXISTS recommendation_assignments AS
SELECT CAST(NULL AS TEXT) AS user_id, CAST(NULL AS TEXT) AS experiment,
       CAST(NULL AS TEXT) AS variant
WHERE 0;
